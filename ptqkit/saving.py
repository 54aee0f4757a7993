"""Save a quantized model (its config, rounded weights and quantizer state) and rebuild it later without
re-quantizing: the config re-creates the same prepared graph, then the state is loaded into it."""
from __future__ import annotations

import torch
import torch.nn as nn

from ptqkit.errors import CheckpointError

FORMAT = "ptqkit-quantized-v1"


def save_quantized(qmodel: nn.Module, cfg, path: str) -> None:
    tmp = path + ".tmp"
    torch.save({"format": FORMAT, "config": cfg.to_dict(), "state_dict": qmodel.state_dict()}, tmp)
    import os
    os.replace(tmp, path)


def load_quantized(path: str, device="cpu") -> tuple[nn.Module, object]:
    """The quantized model (fake quantizers on) and its config."""
    from algorithms.quantizers import fake_quantizers
    from models import build_model
    from ptqkit.config import validate
    from ptqkit.quantize import prepare_quantized
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"quantized model '{path}': cannot be read ({str(exc).splitlines()[0]})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"quantized model '{path}': not a file written by save_quantized ({FORMAT})")
    cfg = validate(blob["config"])
    fp = build_model(cfg.model.name, **cfg.model.kwargs).eval()
    qmodel, _ = prepare_quantized(fp, cfg.quant, cfg.model.leaf_modules)
    state = blob["state_dict"]
    # Learned-rounding parameters never survive: rounding is hardened into the weights before saving.
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"quantized model '{path}': state does not match its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for _, q in fake_quantizers(qmodel):
        q.observer_enabled[0] = 0
        q.fake_quant_enabled[0] = 1
    return qmodel.to(device).eval(), cfg
