"""Checkpoint loading that fails in one line: weights_only, `module.` prefixes stripped, wrapped dicts unwrapped."""
from __future__ import annotations

import torch
import torch.nn as nn

from ptqkit.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_SHOW = 3


def read_state_dict(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}': file not found") from None
    except Exception as exc:  # corrupt file, pickle with code objects, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint '{path}': cannot be read as a weights-only torch file ({reason})") from None
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint '{path}': expected a state_dict (name -> tensor), "
                              f"or a dict holding one under one of {', '.join(_WRAPPER_KEYS)}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str, model_name: str = "model") -> None:
    state = read_state_dict(path)
    own = model.state_dict()
    # Old checkpoints lack BN's `num_batches_tracked`, which does not affect evaluation.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def part(label, keys):
            if not keys:
                return None
            more = f", ... {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
            return f"{len(keys)} {label} ({', '.join(keys[:_SHOW])}{more})"
        parts = [p for p in (part("missing", missing), part("unexpected", unexpected),
                             part("shape-mismatched", mismatched)) if p]
        raise CheckpointError(f"checkpoint '{path}' does not match model '{model_name}': " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
