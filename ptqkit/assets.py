"""Where the pretrained models and images a config names live: the assets root.

A path in a config that starts with `assets:` (`assets:cifar10/resnet20-12fca82f.th`) is relative to the assets
root, so that one config runs on every machine. The root is the folder named by the environment variable
`PTQKIT_ASSETS`, else the fetcher's per-user cache (`$XDG_CACHE_HOME/ptqkit/assets`, by default
`~/.cache/ptqkit/assets`), which `python -m ptqkit.tools.fetch` fills. Configs keep the `assets:` form (the run
folder's config.yaml too, so a run folder names no path of the machine that made it); it is resolved where a file
is opened.

The layout under the root (what the fetcher writes, docs/ASSETS.md):

    cifar10/resnet{20,32,44,56}-<sha256 prefix>.th    the CIFAR-10 ResNets (checkpoints of akamaster/pytorch_resnet_cifar10)
    cifar10/test/<class>/*.png, cifar10/train/<class>/*.png    CIFAR-10 as ImageFolder class folders
    imagenet/...                                      an ImageNet MobileNetV2 and sample images: not fetched (see the docs)
"""
from __future__ import annotations

import os

from ptqkit.errors import UserError

PREFIX = "assets:"
ENV = "PTQKIT_ASSETS"

# Which fetch group provides the files under each top folder of the root (the error for a missing asset names it).
FETCH_GROUPS = {"cifar10": "cifar10"}
FETCH_COMMAND = "python -m ptqkit.tools.fetch"


def root() -> str:
    """The assets root: $PTQKIT_ASSETS, else the per-user cache the fetcher fills."""
    env = os.environ.get(ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ptqkit", "assets")


def is_asset(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def relative(path: str) -> str:
    """The part of an `assets:` path under the root."""
    return path[len(PREFIX):].lstrip("/")


def resolve(path):
    """A path as the file system knows it: `assets:` paths under the root, anything else as given."""
    if not is_asset(path):
        return path
    return os.path.join(root(), relative(path))


def fetch_hint(path: str) -> str:
    """What to do about a missing `assets:` path: the fetch command that provides it, or where the docs say how."""
    top = relative(path).split("/", 1)[0]
    group = FETCH_GROUPS.get(top)
    where = f"under the assets root {root()} (${ENV}, else the per-user cache)"
    if group is None:
        return f"{where}; not fetched by this toolkit: docs/ASSETS.md says where it comes from"
    return f"{where}; fetch it with: {FETCH_COMMAND} {group}"


def missing_error(path: str, key: str, kind: str) -> UserError:
    """One line for an `assets:` file or folder that is not there."""
    return UserError(f"config key '{key}': {kind} '{path}' not found {fetch_hint(path)}")
