"""`ptq_reconstruction(model, cali_data, config, graph_module_list=None)`: MQBench's drop-in call on this toolkit.

MQBench's signature and return value, on a model `mqbench.prepare_by_platform` prepared and that was calibrated the
MQBench way. `config` is MQBench's reconstruction config (an EasyDict or a dict), read as `ptqkit.mqbench_config`
reads `quantize.reconstruction`; `algorithm: <name>` and that method's own keys pick any method registered here
(PD-Quant, MRECG, ...). By default the call computes what MQBench's own loop computes here, iteration for
iteration on one numpy seed (tests/test_mqbench.py): `bound_grad` (`quant.a.bound_grad`) is what MQBench's fake
quantizer does under the running torch (`stop` on torch 2.14, docs/MQBENCH_GAP.md) and `batch_draw` is `fixed`;
`bound_grad: pass` and `batch_draw: random` give the papers' gradient and the BRECQ / QDrop code's batches.
MQBench's fake quantizers are replaced by this toolkit's with the same calibrated state.
"""
from __future__ import annotations

import collections
import copy
import os
import sys

import torch
import torch.fx as fx
import torch.nn as nn
from mqbench.fake_quantize.quantize_base import QuantizeBase
from mqbench.utils.state import enable_calibration_woquantization

from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.registry import get_algorithm
from ptqkit.config import BOUND_GRADS, validate
from ptqkit.errors import ConfigError
from ptqkit.mqbench_config import algorithm_section, translate  # noqa: F401  (translate: one import for users)
from ptqkit.quant import prepare as pq
from ptqkit.quant.quantizers import ActQuantizer, WeightQuantizer, fake_quantizers

def _as_ours(q: QuantizeBase, cls: type) -> QuantizeBase:
    """MQBench fake quantizer `q` as one of ours with the same calibrated state (scale, zero point, range)."""
    new = cls.__new__(cls)
    new.__dict__ = copy.copy(q.__dict__)
    new._parameters, new._buffers = dict(q._parameters), dict(q._buffers)
    new._modules = dict(q._modules)
    scale = new._parameters.pop("scale", None)
    scale = new._buffers.pop("scale", None) if scale is None else scale
    zero_point = new._parameters.pop("zero_point", None)
    zero_point = new._buffers.pop("zero_point", None) if zero_point is None else zero_point
    if cls is ActQuantizer:
        new._parameters["scale"] = nn.Parameter(scale.detach().clone())
        new.prob = 1.0
    else:
        new._buffers["scale"] = scale.detach().clone()
        new.adaround = False
    new._buffers["zero_point"] = zero_point.detach().clone().to(torch.int)
    new.read_switches()            # built without __init__: its Python switches come from the copied buffers
    new.disable_observer()
    new.enable_fake_quant()
    return new


def convert_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of an MQBench-prepared, calibrated model with every fake quantizer replaced by this toolkit's."""
    qmodel = copy.deepcopy(gm)
    for name, module in list(qmodel.named_modules()):
        if isinstance(module, QuantizeBase) and not isinstance(module, (WeightQuantizer, ActQuantizer)):
            cls = WeightQuantizer if name.endswith("weight_fake_quant") else ActQuantizer
            parent, _, child = name.rpartition(".")
            setattr(qmodel.get_submodule(parent) if parent else qmodel, child, _as_ours(module, cls))
    return qmodel


@torch.no_grad()
def calibrate_as_mqbench(model: fx.GraphModule, cali_data: list) -> None:
    """Calibrate an MQBench-prepared model as MQBench's PTQ example does before `ptq_reconstruction`: activation
    observers on every batch, then weight observers on the first (the per-channel MSE search once)."""
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in cali_data]
    device = next(model.parameters()).device
    enable_calibration_woquantization(model, quantizer_type="act_fake_quant")
    for b in batches:
        model(b.to(device))
    enable_calibration_woquantization(model, quantizer_type="weight_fake_quant")
    model(batches[0].to(device))


def mqbench_bound_grad() -> str:
    """The gradient MQBench's activation fake quantizer gives, under the running torch, to a value rounded onto
    the grid's lowest or highest level: its `torch.clamp` passes 1 there up to torch 2.13 and 0 from 2.14
    (docs/MQBENCH_GAP.md), so `pass` or `stop`."""
    v = torch.zeros(1, requires_grad=True)
    torch.clamp(v, 0.0, 1.0).sum().backward()
    return "pass" if float(v.grad) == 1.0 else "stop"


def _bits(quantizers) -> int | None:
    counts = collections.Counter(q.bitwidth for q in quantizers)
    return counts.most_common(1)[0][0] if counts else None


def _scheme(quantizers) -> dict:
    q = next(iter(quantizers), None)
    return {} if q is None else {"symmetric": bool(q.is_symmetric_quant), "per_channel": bool(q.is_per_channel)}


def ptq_reconstruction(model: fx.GraphModule, cali_data: list, config, graph_module_list: list | None = None):
    """MQBench's `mqbench.advanced_ptq.ptq_reconstruction`, on this toolkit's engine and methods.

    model: prepared by `mqbench.prepare_by_platform` and calibrated (observers run, as MQBench's example does);
    cali_data: the calibration batches (tensors, or tuples whose first element is the images);
    config: MQBench's reconstruction config (EasyDict or dict), optionally with `algorithm` and its keys.
    Returns a reconstructed copy in quantization mode; as MQBench does, `model` itself is left with every
    quantizer disabled (the full-precision reference)."""
    if graph_module_list is not None:
        raise ConfigError("graph_module_list", "None (partial quantization of chosen child modules is not "
                          "supported: pass the whole prepared GraphModule)", graph_module_list)
    if not isinstance(model, fx.GraphModule):
        raise ConfigError("model", "a GraphModule prepared by mqbench.prepare_by_platform", type(model).__name__)
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in cali_data]
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise ConfigError("cali_data", "a non-empty list of image batches (tensors)", type(cali_data).__name__)
    device = next(model.parameters()).device
    qmodel = convert_quantizers(model).eval()
    fp_model = model.eval()
    for _, q in fake_quantizers(fp_model):   # MQBench: disable_all(fp32_model)
        q.disable_observer()
        q.disable_fake_quant()
    weights = [m for n, m in qmodel.named_modules() if isinstance(m, WeightQuantizer)]
    acts = [m for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer)]
    # MQBench's FixedFakeQuantize on activations: steps stay as calibrated (its AdaRound), as translate() reads it
    learnable = not any(type(m).__name__ == "FixedFakeQuantize" for n, m in model.named_modules()
                        if isinstance(m, QuantizeBase) and not n.endswith("weight_fake_quant"))
    config = dict(config)
    bound_grad = config.pop("bound_grad", None) or mqbench_bound_grad()
    if bound_grad not in BOUND_GRADS:
        raise ConfigError("config.bound_grad", " or ".join(BOUND_GRADS) + " (quant.a.bound_grad)", bound_grad)
    algorithm = algorithm_section(config, learnable, path="config")
    algorithm.setdefault("batch_size", len(batches[0]))
    algorithm.setdefault("batch_draw", "fixed")     # MQBench's loop: one of its batches per iteration, numpy's draw
    tree = {"model": {"name": "resnet18"},      # not built: the prepared model is given
            "data": {"root": os.getcwd(), "calibration": {"split": None, "batch_size": len(batches[0]),
                                                          "num_images": sum(len(b) for b in batches)},
                     "evaluation": {"split": None}},
            "quant": {"w": {"bits": _bits(weights), **_scheme(weights)},
                      "a": {"bits": _bits(acts), **_scheme(acts), "bound_grad": bound_grad}},
            "algorithm": algorithm}
    cfg = validate(tree)
    if "cle" in cfg.algorithm.prepasses:
        raise ConfigError("config.prepasses", "no cle (equalization changes the FP model before quantizers go "
                          "in; run it before prepare_by_platform)", cfg.algorithm.prepasses)
    for q in acts:
        q.bound_grad = cfg.quant.a.bound_grad
    method = get_algorithm(cfg.algorithm.name)(cfg.algorithm)
    if not hasattr(method, "calibrated_model"):
        raise ConfigError("config.algorithm", "a reconstruction method (naive is calibration alone, which "
                          "MQBench's flow has already done)", cfg.algorithm.name)
    images = torch.cat([b.detach().cpu() for b in batches])
    ctx = RunContext(cfg=cfg, fp_model=fp_model, calib_images=images, calib_labels=torch.zeros(len(images)),
                     device=device, prepared=qmodel, show_progress=sys.stderr.isatty())
    quantized = method.run(ctx)
    pq.freeze(quantized)
    quantized.ptq_results = ctx.results       # per-unit losses and times, as results.json's algorithm_results
    return quantized
