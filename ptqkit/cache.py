"""Where the toolkit keeps what it may reuse between runs: `PTQKIT_CACHE`, else ~/.cache/ptqkit."""
from __future__ import annotations

import os


def cache_dir(kind: str) -> str:
    """The folder for one kind of cached thing (created on first use by whoever writes there)."""
    root = os.environ.get("PTQKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ptqkit")
    return os.path.join(root, kind)
