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

from mqbench.prepare_by_platform import BackendType, CustomedTracer, prepare_by_platform

from ptqkit import distributed
from ptqkit.errors import ConfigError, TraceError
from ptqkit.quant import layer_bits
from ptqkit.quant.observers import HistogramMSEObserver
from ptqkit.quant.quantizers import (ActQuantizer, act_quantizers, calibration_mode, fake_quantizers, quant_state,
                                     set_bits, weight_quantizers)

log = logging.getLogger(__name__)

_MQ_OBSERVERS = {"minmax": "MinMaxObserver", "mse": "MSEObserver", "ema_minmax": "EMAMinMaxObserver",
                 "ema_mse": "EMAMSEObserver"}
_LP_OBSERVERS = {"mse", "ema_mse"}


def _quiet_mqbench():
    # MQBench logs every inserted quantizer at INFO; keep our log readable.
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)


def _observer(tq):
    if tq.observer == "hist_mse":
        return HistogramMSEObserver.__name__, {"p": tq.p}   # registered in MQBench's table by ptqkit.quant.observers
    return _MQ_OBSERVERS[tq.observer], ({"p": tq.p} if tq.observer in _LP_OBSERVERS else {})


def _qconfig_dict(qcfg) -> dict:
    w_obs, w_args = _observer(qcfg.w)
    a_obs, a_args = _observer(qcfg.a)
    return {
        "w_observer": w_obs, "a_observer": a_obs,
        "w_fakequantize": "PTQWeightQuantizer", "a_fakequantize": "PTQActQuantizer",
        "w_qscheme": {"bit": qcfg.w.bits, "symmetry": qcfg.w.symmetric, "per_channel": qcfg.w.per_channel,
                      "pot_scale": False},
        # weight-only: MQBench inserts activation quantizers anyway (removed after preparation)
        "a_qscheme": {"bit": 8 if qcfg.a.bits is None else qcfg.a.bits, "symmetry": qcfg.a.symmetric,
                      "per_channel": qcfg.a.per_channel, "pot_scale": False},
        "w_observer_extra_args": w_args, "a_observer_extra_args": a_args,
    }


ACT_BOUNDARY = "ptqkit_act_boundary"   # node meta key: an activation quantizer sat on this value (weight-only)


@dataclass
class QuantLayout:
    """Where the convention-bearing quantizers sit in a prepared model."""
    first_layers: list[str] = field(default_factory=list)     # module names
    last_layer: str | None = None
    input_quantizers: list[str] = field(default_factory=list)  # quantizer module names on the network input
    last_input_quantizer: str | None = None
    layer_act_quantizers: list[str] = field(default_factory=list)  # activation quantizers quant.layers set


def _leaf_classes(model: nn.Module, names) -> tuple:
    classes = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in classes]
    if missing:
        raise ConfigError("model.leaf_modules", "class names of modules inside the model", missing[0])
    return tuple(classes[n] for n in names)


def trace(model: nn.Module, leaf_modules=()) -> torch.fx.GraphModule:
    """The FP model as a GraphModule (MQBench's tracer, `leaf_modules` class names kept whole)."""
    trace_check(model, leaf_modules)
    graph = CustomedTracer(customed_leaf_module=_leaf_classes(model, leaf_modules)).trace(model)
    return torch.fx.GraphModule(model, graph)


def trace_check(model: nn.Module, leaf_modules=()) -> None:
    """Fail early, in one line, if torch.fx cannot trace the model."""
    try:
        CustomedTracer(customed_leaf_module=_leaf_classes(model, leaf_modules)).trace(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, RuntimeError, ... on dynamic control flow
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"torch.fx cannot trace model '{type(model).__name__}': {reason} "
            "(hint: list the offending module classes in model.leaf_modules)") from None


def layout_of(gm: torch.fx.GraphModule) -> QuantLayout:
    """Where the first/last layers and the network-input quantizers of a prepared model are."""
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


def _weight_only(gm: torch.fx.GraphModule, layout: QuantLayout, qcfg) -> QuantLayout:
    """Every activation quantizer out of the graph: activations stay in full precision. Where one was, the value it
    quantized is marked (`node.meta[ACT_BOUNDARY]`): reconstruction units are cut there as in the quantized graph,
    so that weight-only BRECQ reconstructs blocks, not the whole network as one unit."""
    names = {name for name, q in fake_quantizers(gm) if isinstance(q, ActQuantizer)}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in names and isinstance(node.args[0], torch.fx.Node):
            node.args[0].meta[ACT_BOUNDARY] = True
    _remove_quantizers(gm, list(names))
    conventions = [key for key in ("last_layer_a_bits", "input_bits") if getattr(qcfg, key) is not None]
    if conventions:
        log.info("weight-only quantization (quant.a.bits null): %s ignored, activations stay in full precision",
                 " and ".join(f"quant.{key}" for key in conventions))
    layout.input_quantizers, layout.last_input_quantizer = [], None
    return layout


def _remove_quantizers(gm: torch.fx.GraphModule, names: list[str]) -> None:
    names = set(names)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in names:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for name in names:
        delattr(gm, name)
    gm.recompile()


def prepare_quantized(fp_model: nn.Module, qcfg, leaf_modules=()) -> tuple[torch.fx.GraphModule, QuantLayout]:
    """A deep copy of `fp_model` with MQBench fake quantizers inserted and the bit conventions applied."""
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
    layout = layout_of(gm)
    modules = dict(gm.named_modules())
    w_bits = {name: qcfg.first_layer_w_bits for name in layout.first_layers}
    if layout.last_layer is not None:
        w_bits[layout.last_layer] = qcfg.last_layer_w_bits
    for name, bits in w_bits.items():
        set_bits(modules[name].weight_fake_quant, qcfg.w.bits if bits is None else bits)
    if qcfg.a.bits is None:
        return gm, _apply_layers(gm, _weight_only(gm, layout, qcfg), qcfg, fp_model)
    for q in act_quantizers(gm):
        # null outside a validated config (which resolves it to the method's own): the quantizer's default
        q.bound_grad = qcfg.a.bound_grad or q.bound_grad
    if layout.last_input_quantizer is not None:
        bits = qcfg.last_layer_a_bits
        set_bits(modules[layout.last_input_quantizer], qcfg.a.bits if bits is None else bits)
    for name in list(layout.input_quantizers):
        if qcfg.input_bits is None:
            _remove_quantizers(gm, [name])
            layout.input_quantizers.remove(name)
        else:
            if name != layout.last_input_quantizer:
                set_bits(modules[name], qcfg.input_bits)
            modules[name].learn_step = qcfg.learn_input_step
    return gm, _apply_layers(gm, layout, qcfg, fp_model)


def _apply_layers(gm, layout: QuantLayout, qcfg, fp_model) -> QuantLayout:
    """`quant.layers` (per-layer settings, ptqkit.quant.layer_bits) over the conventions."""
    applied = layer_bits.apply(gm, layout, qcfg, _qconfig_dict, type(fp_model).__name__)
    layout.layer_act_quantizers = list(applied.activations)
    return layout


@torch.no_grad()
def calibrate(qmodel: nn.Module, images: torch.Tensor, batch_size: int, device, progress=None) -> None:
    """Observe ranges on full-precision values (fake quantization off), then switch every quantizer to quantize.

    Weight ranges are observed on the first batch only: weights do not change, and MSE searches are not free.
    Under torchrun each process observes its share of the batches and the activation ranges are merged.
    """
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
                    q.disable_observer()
            qmodel(images[start:start + batch_size].to(device))
            if progress is not None:
                progress.update(min(batch_size, len(images) - start))
    merge_ranges(act_quantizers(qmodel))
    freeze(qmodel)


def freeze(qmodel: nn.Module) -> None:
    """Observers off, fake quantization on, everywhere: the calibrated model as it is evaluated and saved."""
    for _, q in fake_quantizers(qmodel):
        q.disable_observer()
        q.enable_fake_quant()


@torch.no_grad()
def merge_ranges(quantizers) -> None:
    """Every process's observations merged, and the scale / zero point recomputed from them: the union of the
    ranges (MinMax, MSE), or of the histograms (hist_mse: the search then runs over all processes' values)."""
    if distributed.world_size() == 1:
        return
    for q in quantizers:
        obs = q.activation_post_process
        if isinstance(obs, HistogramMSEObserver) and obs.ch_axis == -1:
            obs.merge_histograms(distributed.all_gather_object(obs.histogram_state()))
        else:
            distributed.all_reduce(obs.min_val, distributed.ReduceOp.MIN)
            distributed.all_reduce(obs.max_val, distributed.ReduceOp.MAX)
        scale, zero_point = q.calculate_qparams()
        if q.scale.shape != scale.shape:
            # resized in place, the same Parameter: a multi-bit quantizer's `scale` is also its `scale_b<bits>`
            q.scale.set_(torch.ones_like(scale))
            q.zero_point.resize_(zero_point.shape)
        q.scale.copy_(scale.to(q.scale.device))
        q.zero_point.copy_(zero_point.to(q.zero_point.device))
