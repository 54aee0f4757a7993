"""Files this toolkit writes (quantized models, progress, results.json): written atomically, read weights-only
with every problem reported in one line."""
from __future__ import annotations

import json
import os

import torch

from ptqkit.errors import CheckpointError


def write_json(path: str, obj) -> None:
    """JSON through a temporary file: a kill while writing leaves the previous file whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_atomic(obj, path: str) -> None:
    """torch.save through a temporary file: a kill while writing leaves the previous file whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
