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

import torch.nn as nn

from ptqkit.algorithms.prepass import equalize
from ptqkit.config import validate
from ptqkit.errors import CheckpointError
from ptqkit.files import read_blob, save_atomic
from ptqkit.models import build_model
from ptqkit.quant.prepare import prepare_quantized
from ptqkit.quant.quantizers import fake_quantizers, make_multibit, reselect_bits
from ptqkit.quant.state import add_missing_biases, match_quantizer_shapes, quantizer_attrs, restore_attrs

FORMAT = "ptqkit-quantized-v1"


def save_quantized(qmodel: nn.Module, cfg, path: str) -> None:
    save_atomic({"format": FORMAT, "config": cfg.to_dict(), "state_dict": qmodel.state_dict(),
                 "quantizers": quantizer_attrs(qmodel)}, path)


def load_quantized(path: str, device="cpu") -> tuple[nn.Module, object]:
    """The quantized model (as it was evaluated when saved, observers off, eval mode) and its config."""
    blob = read_blob(path, "quantized model", FORMAT, "save_quantized")
    cfg = validate(blob["config"])
    fp = build_model(cfg.model.name, **cfg.model.kwargs).eval()
    if "cle" in cfg.algorithm.prepasses:
        equalize(fp, cfg.model.leaf_modules)   # the modules it swaps in; their weights and bounds come from the state
    qmodel, _ = prepare_quantized(fp, cfg.quant, cfg.model.leaf_modules)
    state = blob["state_dict"]
    add_missing_biases(qmodel, state)          # bias correction gives biases to layers built without
    attrs = blob.get("quantizers", {})
    built = dict(fake_quantizers(qmodel))
    for name, entry in attrs.items():
        if "bit_set" in entry and name in built:
            # The config builds ordinary activation quantizers; PTMQ made these multi-bit after preparation.
            make_multibit(qmodel, name, entry["bit_set"], entry["bitwidth"])
    quantizers = dict(fake_quantizers(qmodel))
    # Files saved before the attributes were recorded rely on the config's bit conventions alone.
    restore_attrs(quantizers, attrs, state, path)
    match_quantizer_shapes(qmodel, quantizers, state)
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
        q.disable_observer()
    qmodel.to(device)
    reselect_bits(qmodel)                      # the move gave the multi-bit quantizers' zero points new objects
    return qmodel.eval(), cfg
