"""The state of a prepared model's quantizers beyond its state_dict: what saving, reloading and resuming need.

A freshly prepared graph does not have the shapes or the attributes a calibrated one has, so loading needs more
than `load_state_dict`: per-channel scales, zero points and observer ranges are created with shape [1] or [] and
only take their real shape [C] during calibration (`match_quantizer_shapes` resizes them to the saved shapes), and
quantizer attributes that are not tensors (integer range, keep probability, MQBench's learned-rounding mode) are
saved beside the state dict (`quantizer_attrs`) and put back (`restore_attrs`).

Bias correction (ptqkit.algorithms.prepass) keeps each corrected layer's full-precision bias in an `fp_bias` buffer
(`correct_bias`), outside the saved state; `fp_biases` swaps those back in for a scope.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ptqkit.errors import CheckpointError
from ptqkit.quant.quantizers import ActQuantizer, MultiBitActQuantizer, WeightQuantizer, fake_quantizers


def quantizer_attrs(qmodel: nn.Module) -> dict:
    attrs = {}
    for name, q in fake_quantizers(qmodel):
        entry = {"quant_min": int(q.quant_min), "quant_max": int(q.quant_max), "bitwidth": int(q.bitwidth)}
        if isinstance(q, ActQuantizer):
            entry["keep_prob"] = float(q.keep_prob)
        if isinstance(q, MultiBitActQuantizer):
            entry["bit_set"] = list(q.bit_set)
        if isinstance(q, WeightQuantizer) and getattr(q, "adaround", False):
            entry["learned_rounding"] = True
            entry["round_mode"] = str(q.round_mode)
            entry["gamma"], entry["zeta"] = float(q.gamma), float(q.zeta)
        attrs[name] = entry
    return attrs


def restore_attrs(quantizers: dict, attrs: dict, state: dict, path: str) -> None:
    """Put the saved non-tensor attributes back into the quantizers of a freshly prepared model."""
    for name, entry in attrs.items():
        q = quantizers.get(name)
        if q is None:
            raise CheckpointError(f"quantized model '{path}': quantizer '{name}' does not exist in the model "
                                  "its config builds")
        q.quant_min, q.quant_max, q.bitwidth = entry["quant_min"], entry["quant_max"], entry["bitwidth"]
        q.activation_post_process.quant_min = entry["quant_min"]
        q.activation_post_process.quant_max = entry["quant_max"]
        if "keep_prob" in entry:
            q.keep_prob = entry["keep_prob"]
        if entry.get("learned_rounding"):
            alpha = state.get(f"{name}.alpha")
            if alpha is None:
                raise CheckpointError(f"quantized model '{path}': quantizer '{name}' is in learned-rounding mode "
                                      "but its alpha is not saved")
            q.adaround, q.round_mode = True, entry["round_mode"]
            q.gamma, q.zeta = entry["gamma"], entry["zeta"]
            q.alpha = nn.Parameter(torch.empty_like(alpha))


def match_quantizer_shapes(qmodel: nn.Module, quantizer_names, state: dict) -> None:
    """Give per-channel tensors inside quantizers (scale, zero point, observer min/max) their saved shapes."""
    modules = dict(qmodel.named_modules())
    prefixes = tuple(n + "." for n in quantizer_names)
    for key, saved in state.items():
        if not key.startswith(prefixes):
            continue
        owner_name, attr = key.rsplit(".", 1)
        owner = modules.get(owner_name)
        if owner is None:
            continue
        if attr in owner._parameters and owner._parameters[attr] is not None:
            param = owner._parameters[attr]
            if param.shape != saved.shape:
                # resized in place, the same Parameter: a multi-bit quantizer's `scale` is also its `scale_b<bits>`
                with torch.no_grad():
                    param.set_(torch.empty(saved.shape, dtype=param.dtype, device=param.device))
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            buf = owner._buffers[attr]
            if buf.shape != saved.shape:
                owner._buffers[attr] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)


# -------------------------------------------------------------------------------------- corrected biases
FP_BIAS = "fp_bias"


def fp_bias(layer: nn.Module) -> torch.Tensor | None:
    """The full-precision bias of a bias-corrected layer (its `fp_bias` buffer); None for a layer never corrected."""
    return getattr(layer, FP_BIAS, None)


def correct_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    """Add `delta` to `layer`'s bias (a layer without one gets one). The first correction keeps the full-precision
    bias (zeros where there was none) in the layer's `fp_bias` buffer, for `fp_biases`. The buffer is not persistent:
    the saved state holds the corrected bias only, which is what the quantized model computes with."""
    if fp_bias(layer) is None:
        fp = (torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device)
              if layer.bias is None else layer.bias.detach().clone())
        layer.register_buffer(FP_BIAS, fp, persistent=False)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                              device=layer.weight.device), requires_grad=False)
    with torch.no_grad():
        layer.bias.add_(delta.to(layer.bias))


@contextlib.contextmanager
def fp_biases(module: nn.Module):
    """Inside: every corrected bias in `module` is its full-precision value again (`fp_bias`).

    The values are swapped through `bias.data`, for this scope alone: each layer keeps its Parameter object, and
    autograd does not see the swap."""
    swapped = []
    for m in module.modules():
        fp = fp_bias(m)
        if fp is not None:
            swapped.append((m, m.bias.data))
            m.bias.data = fp.to(m.bias)
    try:
        yield
    finally:
        for m, data in swapped:
            m.bias.data = data


def add_missing_biases(qmodel: nn.Module, state: dict) -> None:
    """Zero biases where a saved (bias-corrected) model has one and a freshly prepared one has none."""
    for name, m in qmodel.named_modules():
        key = f"{name}.bias" if name else "bias"
        if key in state and hasattr(m, "weight") and getattr(m, "bias", 0) is None:
            m.bias = nn.Parameter(torch.zeros_like(state[key]), requires_grad=False)
