"""Quantizer insertion through MQBench's `prepare_by_platform`, and the bit-width conventions around it.

MQBench's Academic backend puts a weight quantizer on every conv/linear and an activation quantizer on every input
of a conv/linear (so after each ReLU and each residual add), and hard-codes 8 bits for the first and last layer
weights, the network input and the last layer's input. Here those four are explicit config keys
(`quant.first_layer_w_bits`, `last_layer_w_bits`, `input_bits`, `last_layer_a_bits`) applied after preparation.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
from torch.fx.experimental.optimization import fuse as fx_fold_bn

from algorithms.quantizers import ActQuantizer, WeightQuantizer, set_bits
from ptqkit.errors import TraceError

log = logging.getLogger(__name__)

_MQ_OBSERVERS = {"minmax": "MinMaxObserver", "mse": "MSEObserver", "ema_minmax": "EMAMinMaxObserver",
                 "ema_mse": "EMAMSEObserver"}
_LP_OBSERVERS = {"mse", "ema_mse"}


def _quiet_mqbench():
    # MQBench logs every inserted quantizer at INFO; keep our log readable.
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)


def _observer(tq):
    if tq.observer == "hist_mse":
        from ptqkit.observers import HistogramMSEObserver  # registered into MQBench's table on import
        return "HistogramMSEObserver", {"p": tq.p}
    return _MQ_OBSERVERS[tq.observer], ({"p": tq.p} if tq.observer in _LP_OBSERVERS else {})


def _qconfig_dict(qcfg) -> dict:
    w_obs, w_args = _observer(qcfg.w)
    a_obs, a_args = _observer(qcfg.a)
    return {
        "w_observer": w_obs, "a_observer": a_obs,
        "w_fakequantize": "PTQWeightQuantizer", "a_fakequantize": "PTQActQuantizer",
        "w_qscheme": {"bit": qcfg.w.bits, "symmetry": qcfg.w.symmetric, "per_channel": qcfg.w.per_channel,
                      "pot_scale": False},
        "a_qscheme": {"bit": qcfg.a.bits, "symmetry": qcfg.a.symmetric, "per_channel": qcfg.a.per_channel,
                      "pot_scale": False},
        "w_observer_extra_args": w_args, "a_observer_extra_args": a_args,
    }


@dataclass
class QuantLayout:
    """Where the convention-bearing quantizers sit in a prepared model."""
    first_layers: list[str] = field(default_factory=list)     # module names
    last_layer: str | None = None
    input_quantizers: list[str] = field(default_factory=list)  # quantizer module names on the network input
    last_input_quantizer: str | None = None


def _leaf_classes(model: nn.Module, names) -> tuple:
    classes = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in classes]
    if missing:
        from ptqkit.errors import ConfigError
        raise ConfigError("model.leaf_modules", "class names of modules inside the model", missing[0])
    return tuple(classes[n] for n in names)


def trace_check(model: nn.Module, leaf_modules=()) -> None:
    """Fail early, in one line, if torch.fx cannot trace the model."""
    from mqbench.prepare_by_platform import CustomedTracer
    try:
        CustomedTracer(customed_leaf_module=_leaf_classes(model, leaf_modules)).trace(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, RuntimeError, ... on dynamic control flow
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"torch.fx cannot trace model '{type(model).__name__}': {reason} "
            "(hint: list the offending module classes in model.leaf_modules)") from None


def _layout(gm: torch.fx.GraphModule) -> QuantLayout:
    modules = dict(gm.named_modules())
    layout = QuantLayout()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        for user in ph.users:
            if user.op == "call_module" and isinstance(modules[user.target], ActQuantizer):
                layout.input_quantizers.append(user.target)
                layout.first_layers += [u.target for u in user.users if u.op == "call_module"
                                        and hasattr(modules[u.target], "weight_fake_quant")]
            elif user.op == "call_module" and hasattr(modules[user.target], "weight_fake_quant"):
                layout.first_layers.append(user.target)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    last = output.args[0]
    if isinstance(last, torch.fx.Node) and last.op == "call_module" and \
            hasattr(modules[last.target], "weight_fake_quant"):
        layout.last_layer = last.target
        for arg in last.args:
            if isinstance(arg, torch.fx.Node) and arg.op == "call_module" and \
                    isinstance(modules[arg.target], ActQuantizer):
                layout.last_input_quantizer = arg.target
    return layout


def _remove_quantizer(gm: torch.fx.GraphModule, name: str) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == name:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    delattr(gm, name)
    gm.recompile()


def prepare_quantized(fp_model: nn.Module, qcfg, leaf_modules=()) -> tuple[torch.fx.GraphModule, QuantLayout]:
    """A deep copy of `fp_model` with MQBench fake quantizers inserted and the bit conventions applied."""
    from mqbench.prepare_by_platform import BackendType, prepare_by_platform
    _quiet_mqbench()
    model = copy.deepcopy(fp_model).eval()
    leaves = _leaf_classes(model, leaf_modules)
    trace_check(model, leaf_modules)
    if qcfg.fold_bn:
        model = fx_fold_bn(model)
    custom = {"extra_qconfig_dict": _qconfig_dict(qcfg), "leaf_module": list(leaves)}
    backend = {"academic": BackendType.Academic}[qcfg.backend]
    gm = prepare_by_platform(model, backend, custom)
    gm.eval()
    layout = _layout(gm)
    modules = dict(gm.named_modules())
    w_bits = {name: qcfg.first_layer_w_bits for name in layout.first_layers}
    if layout.last_layer is not None:
        w_bits[layout.last_layer] = qcfg.last_layer_w_bits
    for name, bits in w_bits.items():
        set_bits(modules[name].weight_fake_quant, qcfg.w.bits if bits is None else bits)
    if layout.last_input_quantizer is not None:
        bits = qcfg.last_layer_a_bits
        set_bits(modules[layout.last_input_quantizer], qcfg.a.bits if bits is None else bits)
    for name in list(layout.input_quantizers):
        if qcfg.input_bits is None:
            _remove_quantizer(gm, name)
            layout.input_quantizers.remove(name)
        else:
            if name != layout.last_input_quantizer:
                set_bits(modules[name], qcfg.input_bits)
            modules[name].learn_step = qcfg.learn_input_step
    return gm, layout


@torch.no_grad()
def calibrate(qmodel: nn.Module, images: torch.Tensor, batch_size: int, device, progress=None) -> None:
    """Observe ranges on full-precision values (fake quantization off), then switch every quantizer to quantize.

    Weight ranges are observed on the first batch only: weights do not change, and MSE searches are not free.
    Under torchrun each process observes its share of the batches and the activation ranges are merged.
    """
    from algorithms.quantizers import act_quantizers, calibration_mode, quant_state, weight_quantizers
    from ptqkit import distributed
    shard = distributed.shard_batches(images, batch_size)   # all of them in a single process
    if len(shard) == 0:
        # Fewer batches than processes: this one observes no activation, but every process needs its weight ranges.
        with calibration_mode(qmodel), quant_state(qmodel, only=act_quantizers(qmodel), observe=False):
            qmodel(images[:batch_size].to(device))
    images = shard
    with calibration_mode(qmodel):
        for i, start in enumerate(range(0, len(images), batch_size)):
            if i == 1:
                for q in weight_quantizers(qmodel):
                    q.observer_enabled[0] = 0
            qmodel(images[start:start + batch_size].to(device))
            if progress is not None:
                progress.update(min(batch_size, len(images) - start))
    distributed.merge_ranges(act_quantizers(qmodel))
    for _, q in _iter_quantizers(qmodel):
        q.observer_enabled[0] = 0
        q.fake_quant_enabled[0] = 1


def _iter_quantizers(model):
    from algorithms.quantizers import fake_quantizers
    return fake_quantizers(model)


def describe_quantizers(gm: nn.Module) -> list[tuple[str, str, int]]:
    """(name, kind, bits) of every fake quantizer, for logs and dry runs."""
    rows = []
    for name, q in _iter_quantizers(gm):
        kind = "weight" if isinstance(q, WeightQuantizer) else "act"
        rows.append((name, kind, q.bitwidth))
    return rows
