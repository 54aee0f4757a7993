"""Pre-passes any method can run first (`algorithm.prepasses`): the two data-free-quantization steps of Nagel et
al. (ICCV 2019) that AIMET and MQBench also offer.

`cle` — cross-layer equalization, on a copy of the FP model before quantizers go in. For each pair of layers
conv1 → [BN] → [ReLU] → conv2 whose middle values feed nothing else, output channel i of conv1 is divided by
s_i and input channel i of conv2 multiplied by it, with s_i = sqrt(r1_i / r2_i) (r1_i: the largest |weight| of
channel i of conv1 with its BN folded in; r2_i: of conv2's input channel i), so that both ranges become
sqrt(r1_i · r2_i); the network computes the same function (ReLU is positively homogeneous). Pairs are swept
until the scales settle. Where a BN follows conv1 the division goes into the BN's γ and β (the convolution's
weights stay, and BN stays for PD-Quant's correction); with `quant.fold_bn: true` the folded weights are then
the equalized ones. ReLU6 is not homogeneous: as in the paper it becomes ReLU in an equalized pair (logged; the
FP model the quantized one is compared with keeps its ReLU6). Depthwise convolutions take part on either side.

`bias_correction` — empirical, after calibration: layer by layer in network order, the mean over images and
positions of each output channel of the weight-quantized layer (activations in full precision, earlier layers
already corrected) is compared with the FP layer's on the same images, and the difference is taken off the
layer's bias (a layer without one gets one). That removes the shift weight rounding puts into each channel's
mean. The FP network the reconstruction engine targets is not changed: the FP biases are kept beside
(`ptqkit.quant.state.fp_bias`) and swapped back in wherever the engine computes in full precision.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
import torch.fx as fx
import torch.nn as nn

from ptqkit.algorithms.graph import prefix_module
from ptqkit.quant import state
from ptqkit.quant.prepare import trace
from ptqkit.quant.quantizers import act_quantizers, quant_state

log = logging.getLogger(__name__)

PREPASSES = ("cle", "bias_correction")
_HOMOGENEOUS = (nn.ReLU, nn.ReLU6, nn.Identity)


# ------------------------------------------------------------------------------------------------------ CLE
def _single_user_chain(gm: fx.GraphModule, node: fx.Node, modules: dict):
    """conv1 → [BN] → [act] → conv2 from `node` (conv1), each value used once; else None."""
    bn = act = None
    cur = node
    while True:
        if len(cur.users) != 1:
            return None
        (nxt,) = cur.users
        if nxt.op != "call_module":
            return None
        m = modules[nxt.target]
        if isinstance(m, nn.BatchNorm2d) and bn is None and act is None:
            bn, cur = nxt.target, nxt
        elif isinstance(m, _HOMOGENEOUS) and act is None:
            act, cur = nxt.target, nxt
        elif isinstance(m, nn.Conv2d):
            return bn, act, nxt.target
        else:
            return None


def _equalizable(conv1: nn.Conv2d, conv2: nn.Conv2d) -> bool:
    depthwise2 = conv2.groups == conv2.in_channels == conv2.out_channels
    return conv1.groups in (1, conv1.in_channels) and (conv2.groups == 1 or depthwise2) and \
        conv1.out_channels == conv2.in_channels


def find_pairs(model: nn.Module, leaf_modules=()) -> list[tuple[str, str | None, str | None, str]]:
    """(conv1, bn or None, activation or None, conv2) names of every equalizable pair."""
    gm = trace(model, leaf_modules)
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            chain = _single_user_chain(gm, node, modules)
            if chain is not None and _equalizable(modules[node.target], modules[chain[2]]):
                pairs.append((node.target, *chain))
    return pairs


def _out_ranges(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    w = conv.weight.detach().flatten(1)
    if bn is not None:
        w = w * (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).unsqueeze(1)
    return w.abs().amax(1)


def _in_ranges(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach()
    if conv.groups == 1:
        return w.abs().transpose(0, 1).flatten(1).amax(1)
    return w.abs().flatten(1).amax(1)              # depthwise: input channel i is output channel i's kernel


@torch.no_grad()
def _scale_pair(conv1: nn.Conv2d, bn: nn.BatchNorm2d | None, conv2: nn.Conv2d, s: torch.Tensor) -> None:
    if bn is not None:
        bn.weight.div_(s)
        bn.bias.div_(s)
    else:
        conv1.weight.div_(s.view(-1, *([1] * (conv1.weight.dim() - 1))))
        if conv1.bias is not None:
            conv1.bias.div_(s)
    if conv2.groups == 1:
        conv2.weight.mul_(s.view(1, -1, *([1] * (conv2.weight.dim() - 2))))
    else:
        conv2.weight.mul_(s.view(-1, *([1] * (conv2.weight.dim() - 1))))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def equalize(model: nn.Module, leaf_modules=(), sweeps: int = 20, tol: float = 1e-4) -> dict:
    """Cross-layer equalization of `model` in place; returns what was done (for the log and results.json)."""
    pairs = find_pairs(model, leaf_modules)
    modules = dict(model.named_modules())
    relu6 = sorted({act for _, _, act, _ in pairs if act is not None and isinstance(modules[act], nn.ReLU6)})
    for name in relu6:
        _set_module(model, name, nn.ReLU(inplace=modules[name].inplace))
    before = after = 0.0
    for sweep in range(sweeps):
        largest = 0.0
        for c1, b, _, c2 in pairs:
            conv1, bn, conv2 = modules[c1], modules[b] if b else None, modules[c2]
            r1, r2 = _out_ranges(conv1, bn), _in_ranges(conv2)
            if sweep == 0:
                before += float((torch.maximum(r1, r2) / torch.minimum(r1, r2).clamp_min(1e-12)).mean())
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-12)), torch.ones_like(r1))
            _scale_pair(conv1, bn, conv2, s)
            largest = max(largest, float((s - 1).abs().max()))
        if largest < tol:
            break
    for c1, b, _, c2 in pairs:
        r1, r2 = _out_ranges(modules[c1], modules[b] if b else None), _in_ranges(modules[c2])
        after += float((torch.maximum(r1, r2) / torch.minimum(r1, r2).clamp_min(1e-12)).mean())
    n = max(len(pairs), 1)
    report = {"pairs": len(pairs), "sweeps": sweep + 1, "relu6_to_relu": len(relu6),
              "mean_range_ratio_before": round(before / n, 4), "mean_range_ratio_after": round(after / n, 4)}
    log.info("cle: %d layer pairs equalized in %d sweeps (mean range ratio %.3g -> %.3g)%s", len(pairs),
             report["sweeps"], report["mean_range_ratio_before"], report["mean_range_ratio_after"],
             f"; {len(relu6)} ReLU6 in them replaced by ReLU" if relu6 else "")
    return report


def equalized(fp_model: nn.Module, leaf_modules=()) -> tuple[nn.Module, dict]:
    """An equalized copy of `fp_model` (the original is untouched)."""
    model = copy.deepcopy(fp_model)
    return model, equalize(model, leaf_modules)


# ------------------------------------------------------------------------------------------- bias correction
@torch.no_grad()
def correct_bias(gm: fx.GraphModule, images: torch.Tensor, batch: int, device) -> dict:
    """Empirical bias correction of every weight layer of the calibrated `gm`, in place (see the module doc)."""
    modules = dict(gm.named_modules())
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and hasattr(modules[n.target], "weight_fake_quant")]
    acts = act_quantizers(gm)
    shifts = []

    def channel_means(node, quantize_weights: bool) -> torch.Tensor:
        prefix = prefix_module(gm, [node])
        total, count = None, 0
        weights = [modules[n.target].weight_fake_quant for n in layers]
        with quant_state(gm, only=acts, quantize=False), quant_state(gm, only=weights, quantize=quantize_weights), \
                (contextlib.nullcontext() if quantize_weights else state.fp_biases(gm)):
            for start in range(0, len(images), batch):
                (y,) = prefix(images[start:start + batch].to(device))
                dims = [0] + list(range(2, y.dim()))
                s = y.double().sum(dims)
                total = s if total is None else total + s
                count += y.numel() // y.shape[1]
        return (total / count).float()

    with quant_state(gm, observe=False):
        for node in layers:
            layer = modules[node.target]
            shift = channel_means(node, True) - channel_means(node, False)
            state.correct_bias(layer, -shift)
            shifts.append(float(shift.abs().mean()))
    log.info("bias correction: %d layers, mean |shift| per channel %.3g (first layer %.3g, last %.3g)",
             len(layers), sum(shifts) / max(len(shifts), 1), shifts[0] if shifts else 0.0,
             shifts[-1] if shifts else 0.0)
    return {"layers": len(layers), "mean_abs_shift": round(sum(shifts) / max(len(shifts), 1), 6)}
