"""The size of a quantized model: average weight bits, weight bytes, bit-operations (BOPs).

Counted over the conv/linear layers (those with a weight quantizer), per image at the input size of `example`:

- parameters: weight elements (biases, BN and quantizer scales / zero points are not counted);
- average weight bits: sum(params x weight bits) / sum(params);
- weight bytes: sum(params x weight bits) / 8;
- MACs: multiply-accumulates of the layer for one image (conv: output elements x in_channels / groups x kernel
  area; linear: output features x input features);
- BOPs: sum(MACs x weight bits x input-activation bits), the input bits being those of the quantizer on the layer's
  input (ptqkit.quant.layer_bits), 32 where the input is not quantized. Other operations (BN, adds, pooling) are
  not counted.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ptqkit.quant.quantizers import fp_mode

FP_BITS = 32


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor, layers: list[str] | None = None) -> dict[str, int]:
    """MACs per image of every conv/linear layer (or of `layers`), from one forward pass of `example` (quantizers
    off when `model` is prepared)."""
    modules = dict(model.named_modules())
    names = layers if layers is not None else [n for n, m in modules.items()
                                               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    macs: dict[str, int] = {}
    hooks = []
    for name in names:
        def hook(module, inputs, output, name=name):
            per_image = output[0].numel() if output.dim() > 1 else output.numel()
            if isinstance(module, nn.Linear):
                macs[name] = macs.get(name, 0) + per_image * module.in_features
            else:
                k = math.prod(module.kernel_size)
                macs[name] = macs.get(name, 0) + per_image * (module.in_channels // module.groups) * k
        hooks.append(modules[name].register_forward_hook(hook))
    try:
        with fp_mode(model):
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs


def layer_cost(kind: str, params: int, macs: int, w_bits: int, a_bits: int | None) -> int:
    """One layer's share of a budget, in integer units: weight bits (avg_w_bits, w_bytes) or BOPs."""
    if kind in ("avg_w_bits", "w_bytes"):
        return params * w_bits
    if kind == "bops":
        return macs * w_bits * (FP_BITS if a_bits is None else a_bits)
    raise ValueError(f"unknown budget {kind!r}")


def capacity(kind: str, value: float, total_params: int) -> int:
    """A budget in the integer units of `layer_cost`."""
    if kind == "avg_w_bits":
        return math.floor(value * total_params + 1e-9)
    if kind == "w_bytes":
        return math.floor(value * 8 + 1e-9)
    if kind == "bops":
        return math.floor(value + 1e-9)
    raise ValueError(f"unknown budget {kind!r}")


def in_budget_units(kind: str, used: int, total_params: int) -> float:
    """`layer_cost` units back in the budget's own: average bits, bytes, BOPs."""
    return used / total_params if kind == "avg_w_bits" else used / 8 if kind == "w_bytes" else float(used)


def model_size(records: list[dict], macs: dict[str, int]) -> dict:
    """Totals over per-layer records (ptqkit.quant.layer_bits.layer_records: params, w_bits, a_bits)."""
    params = sum(r["params"] for r in records)
    w_bits_total = sum(r["params"] * r["w_bits"] for r in records)
    bops = sum(layer_cost("bops", r["params"], macs.get(r["layer"], 0), r["w_bits"], r["a_bits"]) for r in records)
    return {"params": params, "macs": sum(macs.get(r["layer"], 0) for r in records),
            "avg_w_bits": w_bits_total / max(params, 1), "w_bytes": w_bits_total / 8, "bops": bops,
            "counted": "conv/linear weights; BOPs = MACs x w bits x input a bits (32 unquantized), per image"}
