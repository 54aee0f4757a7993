"""Pre-passes any method can run first (`algorithm.prepasses`): the two data-free-quantization steps of Nagel et
al. (ICCV 2019) that AIMET and MQBench also offer.

`cle` — cross-layer equalization, on a copy of the FP model before quantizers go in. For each pair of layers
conv1 → [BN] → [ReLU] → conv2 whose middle values feed nothing else, output channel i of conv1 is divided by
s_i and input channel i of conv2 multiplied by it, with s_i = sqrt(r1_i / r2_i) (r1_i: the largest |weight| of
channel i of conv1 with its BN folded in; r2_i: of conv2's input channel i), so that both ranges become
sqrt(r1_i · r2_i); the network computes the same function (ReLU is positively homogeneous). Pairs are swept
until the scales settle. Where a BN follows conv1 the division goes into the BN's γ and β (the convolution's
weights stay, and BN stays for PD-Quant's correction); with `quant.fold_bn: true` the folded weights are then
the equalized ones. ReLU6 is not homogeneous: the paper replaces it by ReLU, which changes the FP network itself
(benchmarks/results/prepasses.md measures what that costs a MobileNetV2); here a ReLU6 in an equalized pair becomes
a ReLU clipped per channel at 6 / s_i (`ChannelClippedReLU`), so the equalized network computes exactly the
original function.
Depthwise convolutions take part on either side.

`bias_correction` — empirical, after calibration: layer by layer in network order, the mean over images and
positions of each output channel of the weight-quantized layer (activations in full precision, earlier layers
already corrected) is compared with the FP layer's on the same images, and the difference is taken off the
layer's bias (a layer without one gets one). That removes the shift weight rounding puts into each channel's
mean. The FP network the reconstruction engine targets is not changed: each corrected layer keeps its FP bias in
its `fp_bias` buffer (`ptqkit.quant.state.correct_bias`), swapped back in wherever the engine computes in full
precision (`ptqkit.quant.state.fp_biases`).
"""
from __future__ import annotations

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


class ChannelClippedReLU(nn.Module):
    """min(max(x, 0), upper_c) per channel: a ReLU6 after its input channels were divided by s_c (upper = 6 / s).
    `like`: a tensor of the model it goes into (its conv's weight), whose device and dtype the bounds take."""

    def __init__(self, channels: int, upper: float = 6.0, like: torch.Tensor | None = None):
        super().__init__()
        kind = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.register_buffer("upper", torch.full((channels,), float(upper), **kind))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.minimum(x.clamp_min(0), self.upper.view(shape))


_HOMOGENEOUS = (nn.ReLU, nn.ReLU6, nn.Identity, ChannelClippedReLU)


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


def _act_ranges(bn: nn.BatchNorm2d, act: nn.Module | None) -> torch.Tensor:
    """Per channel, the BN-estimated top of the activation: beta + 3 |gamma|, at least 0, clipped as the
    activation clips (ReLU6 at 6, a per-channel clipped ReLU at its bounds)."""
    top = (bn.bias.detach() + 3 * bn.weight.detach().abs()).clamp_min(0)
    if isinstance(act, nn.ReLU6):
        top = top.clamp_max(act.max_val)
    elif isinstance(act, ChannelClippedReLU):
        top = torch.minimum(top, act.upper)
    return top


def _in_ranges(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach()
    if conv.groups == 1:
        return w.abs().transpose(0, 1).flatten(1).amax(1)
    return w.abs().flatten(1).amax(1)              # depthwise: input channel i is output channel i's kernel


@torch.no_grad()
def _scale_pair(conv1: nn.Conv2d, bn: nn.BatchNorm2d | None, act: nn.Module | None, conv2: nn.Conv2d,
                s: torch.Tensor) -> None:
    if isinstance(act, ChannelClippedReLU):
        act.upper.div_(s)
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
        conv = next(modules[c1] for c1, _, act, _ in pairs if act == name)
        # on the model's device and in its dtype: a CUDA model's scales meet these bounds in place
        _set_module(model, name, ChannelClippedReLU(conv.out_channels, modules[name].max_val, like=conv.weight))
    modules = dict(model.named_modules())
    before = _spread(pairs, modules)
    for sweep in range(sweeps):
        largest = 0.0
        for c1, b, act, c2 in pairs:
            conv1, bn, conv2 = modules[c1], modules[b] if b else None, modules[c2]
            r1, r2 = _out_ranges(conv1, bn), _in_ranges(conv2)
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-12)), torch.ones_like(r1))
            if bn is not None:
                # A channel with small weights but a large BN shift is nearly constant; dividing it by a small s
                # would blow up the per-tensor activation range the next quantizer must cover (MobileNetV2 W8A8
                # per-tensor: 77.6 -> 1.2 without this bound). Channels are not scaled beyond the largest
                # activation range of the layer before equalization (BN-estimated: beta + 3 |gamma|, ReLU6 at 6).
                a = _act_ranges(bn, modules[act] if act else None)
                s = torch.maximum(s, a / a.max().clamp_min(1e-12))
            _scale_pair(conv1, bn, modules[act] if act else None, conv2, s)
            largest = max(largest, float((s - 1).abs().max()))
        if largest < tol:
            break
    after = _spread(pairs, modules)
    report = {"pairs": len(pairs), "sweeps": sweep + 1, "relu6_clipped_per_channel": len(relu6),
              "range_ratio_before": round(before, 4), "range_ratio_after": round(after, 4)}
    log.info("cle: %d layer pairs equalized in %d sweeps (geometric mean over channels of max/min of the two "
             "ranges %.3g -> %.3g)%s", len(pairs), report["sweeps"], before, after,
             f"; {len(relu6)} ReLU6 in them clipped per channel" if relu6 else "")
    return report


def _spread(pairs, modules) -> float:
    """Geometric mean, over the live channels of every pair, of the larger of its two ranges over the smaller
    (1 = equalized; dead channels, with a zero range, are left out)."""
    logs = []
    for c1, b, _, c2 in pairs:
        r1, r2 = _out_ranges(modules[c1], modules[b] if b else None), _in_ranges(modules[c2])
        live = (r1 > 1e-8) & (r2 > 1e-8)
        logs.append((r1[live].log() - r2[live].log()).abs())
    return float(torch.cat(logs).mean().exp()) if logs else 1.0


def equalized(fp_model: nn.Module, leaf_modules=()) -> tuple[nn.Module, dict]:
    """An equalized copy of `fp_model` (the original is untouched)."""
    model = copy.deepcopy(fp_model)
    return model, equalize(model, leaf_modules)


# ------------------------------------------------------------------------------------------- bias correction
@torch.no_grad()
def correct_bias(gm: fx.GraphModule, images: torch.Tensor, batch: int, device) -> dict:
    """Empirical bias correction of every weight layer of the calibrated `gm`, in place (see the module doc).
    The FP means of all layers come from one pass; the weight-quantized means layer by layer, each after the
    layers before it are corrected (a forward of the prefix up to the layer)."""
    modules = dict(gm.named_modules())
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and hasattr(modules[n.target], "weight_fake_quant")]
    acts = act_quantizers(gm)
    weights = [modules[n.target].weight_fake_quant for n in layers]
    batches = [images[i:i + batch].to(device) for i in range(0, len(images), batch)]

    fp_sums: dict[str, list] = {n.target: [None, 0] for n in layers}

    def record(name):
        def hook(module, inputs, output):
            dims = [0] + list(range(2, output.dim()))
            entry = fp_sums[name]
            s = output.double().sum(dims)
            entry[0] = s if entry[0] is None else entry[0] + s
            entry[1] += output.numel() // output.shape[1]
        return hook

    handles = [modules[n.target].register_forward_hook(record(n.target)) for n in layers]
    try:
        with quant_state(gm, observe=False, quantize=False), state.fp_biases(gm):
            for x in batches:
                gm(x)
    finally:
        for h in handles:
            h.remove()

    shifts = []
    with quant_state(gm, observe=False), quant_state(gm, only=acts, quantize=False), \
            quant_state(gm, only=weights, quantize=True):
        for node in layers:
            prefix = prefix_module(gm, [node])
            total, count = None, 0
            for x in batches:
                (y,) = prefix(x)
                s = y.double().sum([0] + list(range(2, y.dim())))
                total = s if total is None else total + s
                count += y.numel() // y.shape[1]
            fp_total, fp_count = fp_sums[node.target]
            shift = (total / count - fp_total / fp_count).float()
            state.correct_bias(modules[node.target], -shift)
            shifts.append(float(shift.abs().mean()))
    log.info("bias correction: %d layers, mean |shift| per channel %.3g (first layer %.3g, last %.3g)",
             len(layers), sum(shifts) / max(len(shifts), 1), shifts[0] if shifts else 0.0,
             shifts[-1] if shifts else 0.0)
    return {"layers": len(layers), "mean_abs_shift": round(sum(shifts) / max(len(shifts), 1), 6)}
