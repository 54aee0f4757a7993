"""Save a quantized model (its config, weights and quantizer state) and rebuild it later without re-quantizing:
the config re-creates the same prepared graph, then the saved state is loaded into it.

A freshly prepared graph does not have the shapes or the attributes a calibrated one has, so loading needs more
than `load_state_dict`:
- per-channel scales, zero points and observer ranges are created with shape [1] or [] and only take their real
  shape [C] during calibration: those tensors are resized to the saved shape before loading;
- quantizer attributes that are not tensors (integer range, keep probability, learned-rounding mode) are not in the
  state dict: they are saved beside it and restored, so the reloaded model computes what was evaluated;
- a multi-bit activation quantizer (PTMQ) is rebuilt as one from the ordinary quantizer the config creates, with
  its bit set and its selected bit-width, before its per-bit steps are loaded;
- a weight quantizer still in learned-rounding mode (not hardened) keeps its `alpha`: the reloaded quantizer is
  put back in that mode with the saved `alpha`.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ptqkit.errors import CheckpointError

FORMAT = "ptqkit-quantized-v1"


def _quantizer_attrs(qmodel: nn.Module) -> dict:
    from algorithms.quantizers import ActQuantizer, MultiBitActQuantizer, WeightQuantizer, fake_quantizers
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


def save_quantized(qmodel: nn.Module, cfg, path: str) -> None:
    blob = {"format": FORMAT, "config": cfg.to_dict(), "state_dict": qmodel.state_dict(),
            "quantizers": _quantizer_attrs(qmodel)}
    tmp = path + ".tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _restore_attrs(quantizers: dict, attrs: dict, state: dict, path: str) -> None:
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


def _match_quantizer_shapes(qmodel: nn.Module, quantizer_names, state: dict) -> None:
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
                param.data = torch.empty(saved.shape, dtype=param.dtype, device=param.device)
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            buf = owner._buffers[attr]
            if buf.shape != saved.shape:
                owner._buffers[attr] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)


def read_blob(path: str, what: str, fmt: str, writer: str, missing_hint: str = "") -> dict:
    """A file this toolkit wrote with `torch.save`, read weights-only; any problem is one CheckpointError line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} '{path}': not found{missing_hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what} '{path}': cannot be read ({str(exc).splitlines()[0]})") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise CheckpointError(f"{what} '{path}': not a file written by {writer} ({fmt})")
    return blob


def load_quantized(path: str, device="cpu") -> tuple[nn.Module, object]:
    """The quantized model (as it was evaluated when saved, observers off, eval mode) and its config."""
    from algorithms.quantizers import fake_quantizers, make_multibit
    from models import build_model
    from ptqkit.config import validate
    from ptqkit.quantize import prepare_quantized
    blob = read_blob(path, "quantized model", FORMAT, "save_quantized")
    cfg = validate(blob["config"])
    fp = build_model(cfg.model.name, **cfg.model.kwargs).eval()
    qmodel, _ = prepare_quantized(fp, cfg.quant, cfg.model.leaf_modules)
    state = blob["state_dict"]
    attrs = blob.get("quantizers", {})
    built = dict(fake_quantizers(qmodel))
    for name, entry in attrs.items():
        if "bit_set" in entry and name in built:
            # The config builds ordinary activation quantizers; PTMQ made these multi-bit after preparation.
            make_multibit(qmodel, name, entry["bit_set"], entry["bitwidth"])
    quantizers = dict(fake_quantizers(qmodel))
    # Files saved before the attributes were recorded rely on the config's bit conventions alone.
    _restore_attrs(quantizers, attrs, state, path)
    _match_quantizer_shapes(qmodel, quantizers, state)
    try:
        missing, unexpected = qmodel.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"quantized model '{path}': state does not match its config ({detail})") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"quantized model '{path}': state does not match its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for q in quantizers.values():
        # The fake-quant switches come back from the state as saved; observing would move the loaded ranges.
        q.observer_enabled[0] = 0
    return qmodel.to(device).eval(), cfg
