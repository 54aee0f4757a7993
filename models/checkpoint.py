"""Checkpoint loading that fails in one line: weights_only, `module.` prefixes stripped, wrapped dicts unwrapped,
the papers' checkpoint names (models.names) mapped onto the zoo's."""
from __future__ import annotations

import collections
from typing import Optional

import torch
import torch.nn as nn

from ptqkit import assets
from ptqkit.errors import CheckpointError
from ptqkit.models.names import Naming, namings_for

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_SHOW = 3


def read_state_dict(path: str) -> dict:
    try:
        obj = torch.load(assets.resolve(path), map_location="cpu", weights_only=True)
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


def _mismatch(state: dict, own: dict) -> tuple[list[str], list[str], list[str]]:
    # Old checkpoints lack BN's `num_batches_tracked`, which does not affect evaluation.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    return missing, unexpected, mismatched


def _renamed(state: dict, naming: Naming) -> Optional[dict]:
    out = {}
    for key, value in state.items():
        new = naming.rename(key)
        if new is None or new in out:
            return None
        out[new] = value
    return out


def load_checkpoint(model: nn.Module, path: str, model_name: str = "model") -> Optional[str]:
    """Load `path` into `model`. A file whose names are not the model's own is accepted when one of the known
    namings (models.names: BRECQ's and timm's releases) maps all of its keys onto the model's with the right shapes;
    returns that naming's label (None: the model's own names)."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing, unexpected, mismatched = _mismatch(state, own)
    used = None
    if missing or unexpected or mismatched:
        tried = namings_for(model)
        for naming in tried:
            renamed = _renamed(state, naming)
            if renamed is not None and not any(_mismatch(renamed, own)):
                state, used = renamed, naming.label
                break
        else:
            def part(label, keys):
                if not keys:
                    return None
                more = f", ... {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
                return f"{len(keys)} {label} ({', '.join(keys[:_SHOW])}{more})"
            parts = [p for p in (part("missing", missing), part("unexpected", unexpected),
                                 part("shape-mismatched", mismatched)) if p]
            also = f"; nor does it have the names of {' or '.join(n.label for n in tried)} checkpoints" if tried else ""
            raise CheckpointError(f"checkpoint '{path}' does not match model '{model_name}': " + "; ".join(parts)
                                  + also)
    # Keys and shapes are those of the model as built, so every module reads the file as written in its own current
    # format (torchvision's MNASNet refuses a state_dict that does not say which of its two layouts it holds).
    state = collections.OrderedDict(state)
    state._metadata = {name: {"version": m._version} for name, m in model.named_modules()}
    model.load_state_dict(state, strict=False)
    return used
