"""Fetch the assets this toolkit can download into the assets root, verified by checksum.

    python -m ptqkit.tools.fetch [GROUP ...] [--root DIR] [--mirror URL] [--keep-archive] [--list] [--quiet]

Groups (default: all of them):
    cifar10   the CIFAR-10 ResNet-20/32/44/56 checkpoints of akamaster/pytorch_resnet_cifar10, and CIFAR-10 itself
              (the official python tarball), laid out as cifar10/test/<class>/*.png and cifar10/train/<class>/*.png

The root is --root, else $PTQKIT_ASSETS, else ~/.cache/ptqkit/assets ($XDG_CACHE_HOME/ptqkit/assets). Files whose
checksum matches, and image folders that are complete, are left as they are: a second call makes no network
request. --mirror BASE_URL fetches every file from BASE_URL/<file name> instead of its source. --list prints the
groups, files, sizes, checksums and sources without touching the network. The ImageNet MobileNetV2 and sample
images are not fetched: docs/ASSETS.md says where they come from.

Prints one line per file; errors are one line `error: ...` on stderr with exit status 2, and leave nothing
half-written behind.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from ptqkit import assets, fetch
from ptqkit.errors import UserError


def main(argv=None, *, manifest=None) -> int:
    """The command; `manifest` replaces the built-in list of files (tests)."""
    parser = argparse.ArgumentParser(prog="python -m ptqkit.tools.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="*", metavar="GROUP", help="what to fetch (default: every group: cifar10)")
    parser.add_argument("--root", help=f"assets root to fill (default: ${assets.ENV}, else ~/.cache/ptqkit/assets)")
    parser.add_argument("--mirror", metavar="URL", help="fetch every file from URL/<file name> instead")
    parser.add_argument("--keep-archive", action="store_true",
                        help="keep the CIFAR-10 tarball after laying out its images")
    parser.add_argument("--list", action="store_true", help="list the groups and their files; no download")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the one line per file stays)")
    args = parser.parse_args(argv)

    try:
        root = os.path.abspath(os.path.expanduser(args.root)) if args.root else assets.root()
        if args.list:
            for line in fetch.describe(args.groups or None, root, args.mirror, manifest):
                print(line)
            return 0
        groups = args.groups or list(fetch.default_manifest() if manifest is None else manifest)
        fetch.fetch(groups, root, mirror=args.mirror, manifest=manifest, progress=False if args.quiet else None,
                    keep_archive=args.keep_archive, on_outcome=lambda outcome: print(outcome.line(), flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if root != assets.root():
        print(f"the toolkit reads the assets root from ${assets.ENV}: export {assets.ENV}={shlex.quote(root)}")
    return 0


if __name__ == "__main__":
    # warnings only (a file with the wrong checksum, fetched again): the outcome lines are the command's output
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
