"""Download the assets this toolkit can fetch into the assets root (`ptqkit.assets`), verified by checksum.

Group `cifar10`: the four CIFAR-10 ResNets of akamaster/pytorch_resnet_cifar10 (sha256 of each file) and the
official CIFAR-10 python tarball (torchvision's URL and md5), which is laid out as ImageFolder class folders of
lossless PNGs, `cifar10/test/<class>/NNNNN.png` and `cifar10/train/<class>/NNNNN.png`, and then deleted.

Guarantees:
- a download streams into `<dest>.part` beside its destination, its checksum computed on the way, and is moved into
  place (`os.replace`) only when complete and verified; every failure (HTTP error, refused connection, unknown
  host, timeout, a transfer shorter than its Content-Length, a checksum mismatch) deletes the partial file and
  raises a one-line `UserError` naming the URL, what went wrong and what to do. A `.part` left by an interrupted
  earlier call is removed and the file fetched again;
- an image folder is written into a hidden sibling (`cifar10/.partial-test`) and renamed into place only when
  complete, so `cifar10/test` and `cifar10/train` are either whole or absent;
- what is there already is not fetched again: a file whose checksum matches, an image folder holding the ten class
  folders with images (any copy: PNG or JPEG). A call that finds everything makes no network request; a file with
  the wrong checksum is reported and fetched again.

`mirror=BASE_URL` fetches every file from `BASE_URL/<file name>` instead of its source; `manifest=` replaces the
built-in list of files (the tests use it to serve small files with their own checksums).
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import shutil
import socket
import ssl
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from torchvision.datasets import CIFAR10
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from ptqkit import assets
from ptqkit.errors import UserError

log = logging.getLogger("ptq.fetch")

AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
AKAMASTER_SOURCE = "akamaster/pytorch_resnet_cifar10, BSD-2-Clause"
CIFAR10_SOURCE = "CIFAR-10, official python version (torchvision's URL and md5)"
# The CIFAR-10 classes in label order; sorted by name (ImageFolder's order) they keep that order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_SPLITS = {"test": ("test_batch",), "train": tuple(f"data_batch_{i}" for i in range(1, 6))}

TIMEOUT = 60          # seconds without an answer before a download is given up
CHUNK = 1 << 16
USER_AGENT = "ptqkit-fetch/0.1"
FILE = "file"                      # kept as it is
CIFAR10_PYTHON = "cifar10-python"  # the CIFAR-10 python tarball: laid out as class folders, then deleted


@dataclass(frozen=True)
class Entry:
    """One file of a fetch group: stored as `<root>/<group>/<name>`, served by a mirror as `<mirror>/<name>`."""
    group: str
    name: str
    url: str
    algorithm: str      # a hashlib name: "sha256", "md5"
    digest: str         # hex
    size: int | None = None   # bytes: for --list, and the progress bar when the server sends no Content-Length
    kind: str = FILE
    source: str = ""          # where it comes from, its licence

    def path(self, root: str) -> str:
        return os.path.join(root, self.group, self.name)

    def relative(self) -> str:
        return f"{self.group}/{self.name}"

    def source_url(self, mirror: str | None = None) -> str:
        return f"{mirror.rstrip('/')}/{self.name}" if mirror else self.url

    def outputs(self) -> tuple[str, ...]:
        """What the file is turned into, relative to the root (the tarball's image folders)."""
        return tuple(f"{self.group}/{s}" for s in CIFAR10_SPLITS) if self.kind == CIFAR10_PYTHON else ()


def default_manifest() -> dict[str, tuple[Entry, ...]]:
    """The files this toolkit fetches, by group."""
    checkpoints = [
        ("resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", 1099231),
        ("resnet32-d509ac18.th", "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850", 1890043),
        ("resnet44-014dd654.th", "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4", 2680855),
        ("resnet56-4bfd9763.th", "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367", 3471733),
    ]
    cifar = [Entry("cifar10", name, AKAMASTER_URL + name, "sha256", digest, size, FILE, AKAMASTER_SOURCE)
             for name, digest, size in checkpoints]
    cifar.append(Entry("cifar10", CIFAR10.filename, CIFAR10.url, "md5", CIFAR10.tgz_md5, 170498071, CIFAR10_PYTHON,
                       CIFAR10_SOURCE))
    return {"cifar10": tuple(cifar)}


@dataclass
class Outcome:
    """What happened to one file or image folder; `path` is relative to the root."""
    path: str
    status: str        # "fetched", "already there", "written"
    detail: str = ""

    def line(self) -> str:
        return f"{self.status:<13} {self.path}" + (f"  ({self.detail})" if self.detail else "")


@dataclass
class Report:
    root: str
    outcomes: list[Outcome] = field(default_factory=list)
    downloads: int = 0         # network requests made


def fetch(groups: Sequence[str] = ("cifar10",), root: str | None = None, mirror: str | None = None,
          manifest: Mapping[str, Iterable[Entry]] | None = None, progress: bool | None = True,
          keep_archive: bool = False, timeout: float = TIMEOUT,
          on_outcome: Callable[[Outcome], None] | None = None) -> Report:
    """Fetch `groups` into `root` (default: the assets root). `progress`: tqdm bars (None: only on a terminal).
    `keep_archive` keeps the CIFAR-10 tarball after extraction. `on_outcome` is called with each file's outcome as
    it is known. Raises UserError (one line) on any failure; what is already in place stays."""
    manifest = default_manifest() if manifest is None else {g: tuple(es) for g, es in manifest.items()}
    unknown = [g for g in groups if g not in manifest]
    if unknown:
        raise UserError(f"unknown fetch group {', '.join(map(repr, unknown))}; the groups are "
                        f"{', '.join(manifest)} (the ImageNet assets are not fetched: docs/ASSETS.md says where they "
                        "come from)")
    root = os.path.abspath(os.path.expanduser(root or assets.root()))
    report = Report(root)
    ctx = _Context(root, mirror, progress, keep_archive, timeout, report, on_outcome)
    entries = [e for g in dict.fromkeys(groups) for e in manifest[g]]
    for entry in entries:        # before any download: an image folder in the way stops the call
        if entry.kind == CIFAR10_PYTHON:
            for split in CIFAR10_SPLITS:
                _image_folder_count(os.path.join(root, entry.group, split))
    for entry in entries:
        if entry.kind == FILE:
            _fetch_file(ctx, entry)
        elif entry.kind == CIFAR10_PYTHON:
            _fetch_cifar10_images(ctx, entry)
        else:
            raise ValueError(f"unknown manifest entry kind {entry.kind!r}")
    return report


def describe(groups: Sequence[str] | None = None, root: str | None = None, mirror: str | None = None,
             manifest: Mapping[str, Iterable[Entry]] | None = None) -> list[str]:
    """Lines listing each group's files: size, checksum, source and where they go. Touches no network."""
    manifest = default_manifest() if manifest is None else {g: tuple(es) for g, es in manifest.items()}
    root = os.path.abspath(os.path.expanduser(root or assets.root()))
    lines = []
    for group in groups or manifest:
        if group not in manifest:
            raise UserError(f"unknown fetch group {group!r}; the groups are {', '.join(manifest)}")
        lines.append(f"{group}: into {os.path.join(root, group)}")
        for e in manifest[group]:
            size = _megabytes(e.size) if e.size else "size unknown"
            lines.append(f"  {e.name}  {size}  {e.algorithm} {e.digest}")
            lines.append(f"      from {e.source_url(mirror)}" + (f"  [{e.source}]" if e.source else ""))
            if e.kind == CIFAR10_PYTHON:
                lines.append(f"      laid out as {' and '.join(e.outputs())} (class folders of PNG images), "
                             "then deleted")
    return lines


# ---------------------------------------------------------------------------------------------------- files
@dataclass
class _Context:
    root: str
    mirror: str | None
    progress: bool | None
    keep_archive: bool
    timeout: float
    report: Report
    on_outcome: Callable[[Outcome], None] | None

    def add(self, outcome: Outcome) -> None:
        self.report.outcomes.append(outcome)
        log.info("%s", outcome.line())
        if self.on_outcome is not None:
            self.on_outcome(outcome)


def _fetch_file(ctx: _Context, entry: Entry, add: bool = True) -> Outcome:
    """The file in place and verified: kept when its checksum matches, else downloaded. `add`: report the
    outcome now (else the caller does)."""
    dest = entry.path(ctx.root)
    _remove(dest + ".part")       # left by an interrupted earlier call
    if os.path.isfile(dest):
        got = _file_digest(dest, entry.algorithm)
        if got == entry.digest.lower():
            outcome = Outcome(entry.relative(), "already there", f"{entry.algorithm} verified")
            if add:
                ctx.add(outcome)
            return outcome
        log.warning("%s has %s %s, expected %s: fetching it again", dest, entry.algorithm, got, entry.digest)
    url = entry.source_url(ctx.mirror)
    size = download(url, dest, entry.algorithm, entry.digest, progress=ctx.progress, timeout=ctx.timeout,
                    expected_size=entry.size, report=ctx.report)
    outcome = Outcome(entry.relative(), "fetched", f"{_megabytes(size)}, {entry.algorithm} verified, from {url}")
    if add:
        ctx.add(outcome)
    return outcome


def download(url: str, dest: str, algorithm: str, digest: str, *, progress: bool | None = True,
             timeout: float = TIMEOUT, expected_size: int | None = None, report: Report | None = None) -> int:
    """Stream `url` into `dest` (through `dest.part`), checking its `algorithm` checksum; returns its size in bytes.
    On any failure nothing is left at `dest` or `dest.part` and a one-line UserError says what to do."""
    part = dest + ".part"
    todo = (f"retry, or download the file by hand to {dest}, or point {assets.ENV} at a folder that has it")

    def error(what: str) -> UserError:
        return UserError(f"could not fetch {url}: {_one_line(what)}; {todo}")

    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _remove(part)
        if report is not None:
            report.downloads += 1
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise error(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise error(_network_reason(exc.reason, timeout)) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise error(_network_reason(exc, timeout)) from None
        with response:
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.strip().isdigit() else None
            hasher = hashlib.new(algorithm)
            got = 0
            with open(part, "wb") as out, tqdm(total=total or expected_size, unit="B", unit_scale=True,
                                               unit_divisor=1024, desc=os.path.basename(dest), leave=False,
                                               disable=None if progress is None else not progress) as bar:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except http.client.IncompleteRead as exc:
                        raise error(f"the transfer stopped after {got + len(exc.partial)} of {total} bytes") \
                            from None
                    except (OSError, http.client.HTTPException) as exc:
                        raise error(f"the transfer broke off after {got} bytes: "
                                    f"{_network_reason(exc, timeout)}") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    hasher.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got != total:
            raise error(f"the transfer stopped after {got} of {total} bytes")
        if hasher.hexdigest() != digest.lower():
            raise error(f"the {algorithm} of the download is {hasher.hexdigest()}, expected {digest} (the source "
                        "or mirror serves another file)")
        os.replace(part, dest)
        return got
    except OSError as exc:        # writing: the network's OSErrors are turned into UserErrors above
        raise UserError(f"could not write {part}: {_one_line(exc.strerror or str(exc))}") from None
    finally:
        _remove(part)


def _network_reason(exc, timeout: float) -> str:
    if isinstance(exc, socket.gaierror):
        return f"the host name could not be resolved ({exc.strerror or exc}; no internet connection?)"
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _file_digest(path: str, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------------------- CIFAR-10
def _image_folder_count(folder: str) -> int | None:
    """Images in a complete ImageFolder of the ten CIFAR-10 classes, None when the folder is absent; a folder
    that lacks a class or its images raises (it is not ours to replace)."""
    if not os.path.exists(folder):
        return None
    count = 0
    for cls in CIFAR10_CLASSES:
        sub = os.path.join(folder, cls)
        n = sum(1 for e in os.scandir(sub) if e.name.lower().endswith(IMG_EXTENSIONS)) if os.path.isdir(sub) else 0
        if n == 0:
            raise UserError(f"{folder} exists but is not a complete CIFAR-10 image folder (no images in "
                            f"{cls}/); move it away and fetch again, or complete it")
        count += n
    return count


def _fetch_cifar10_images(ctx: _Context, entry: Entry) -> None:
    """`<group>/test` and `<group>/train` as class folders of PNGs from the tarball, unless they are there."""
    folder = os.path.join(ctx.root, entry.group)
    for split in CIFAR10_SPLITS:
        _remove(os.path.join(folder, f".partial-{split}"))
    _remove(os.path.join(folder, ".partial-extract"))
    missing = []
    for split in CIFAR10_SPLITS:
        count = _image_folder_count(os.path.join(folder, split))
        if count is None:
            missing.append(split)
        else:
            ctx.add(Outcome(f"{entry.group}/{split}", "already there",
                            f"{count:,} images in {len(CIFAR10_CLASSES)} class folders, left as they are"))
    archive = entry.path(ctx.root)
    if not missing:
        return
    tarball = _fetch_file(ctx, entry, add=False)
    extract = os.path.join(folder, ".partial-extract")
    written = []
    try:
        batches = _read_batches(archive, extract, [b for s in missing for b in CIFAR10_SPLITS[s]])
        names = batches.pop("batches.meta")
        for split in missing:
            count = _write_split(folder, split, [batches[b] for b in CIFAR10_SPLITS[split]], names, ctx.progress)
            written.append(Outcome(f"{entry.group}/{split}", "written",
                                   f"{count:,} PNG images in {len(names)} class folders, from {entry.name}"))
    except OSError as exc:
        raise UserError(f"could not write the CIFAR-10 images into {folder}: "
                        f"{_one_line(exc.strerror or str(exc))}") from None
    finally:
        _remove(extract)
    if not ctx.keep_archive:
        os.remove(archive)
    tarball.detail += "; kept" if ctx.keep_archive else "; deleted after extraction"
    for outcome in [tarball, *written]:
        ctx.add(outcome)


def _read_batches(archive: str, extract: str, batches: list[str]) -> dict:
    """The tarball's python batches {name: (data N x 3072 uint8, labels)} and "batches.meta": the label names.
    The tarball's checksum was verified: unpickling its contents is safe."""
    base = CIFAR10.base_folder
    wanted = [f"{base}/{name}" for name in [*batches, CIFAR10.meta["filename"]]]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [tar.getmember(name) for name in wanted]
            # "data" filter: regular files under `extract` only (Python >= 3.11.4; the members are named ones)
            filters = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(extract, members=members, **filters)
        out = {}
        for name in batches:
            d = _load_pickle(os.path.join(extract, base, name))
            data = np.asarray(d["data"], dtype=np.uint8)
            labels = [int(x) for x in d["labels"]]
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                raise ValueError(f"{name} holds data of shape {data.shape} and {len(labels)} labels")
            out[name] = (data, labels)
        meta = _load_pickle(os.path.join(extract, base, CIFAR10.meta["filename"]))
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[CIFAR10.meta["key"]])
    except (tarfile.TarError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise UserError(f"{archive} is not the CIFAR-10 python archive ({_one_line(str(exc))}); delete it and "
                        "fetch again") from None
    if names != CIFAR10_CLASSES:
        raise UserError(f"{archive}: its label names are {', '.join(names)}, expected {', '.join(CIFAR10_CLASSES)}")
    out["batches.meta"] = names
    return out


def _load_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")   # written by Python 2: its numpy arrays need latin1
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _write_split(folder: str, split: str, batches: list, names: Sequence[str], progress: bool | None) -> int:
    """`folder/split/<class>/NNNNN.png` (NNNNN: the image's index in the split), built in a hidden sibling and
    moved into place when complete."""
    data = np.concatenate([d for d, _ in batches])
    labels = [label for _, ls in batches for label in ls]
    tmp = os.path.join(folder, f".partial-{split}")
    _remove(tmp)
    try:
        for name in names:
            os.makedirs(os.path.join(tmp, name))
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for i in tqdm(range(len(images)), desc=f"{split} images", unit="img", leave=False,
                      disable=None if progress is None else not progress):
            Image.fromarray(np.ascontiguousarray(images[i])).save(
                os.path.join(tmp, names[labels[i]], f"{i:05d}.png"), format="PNG")
        os.replace(tmp, os.path.join(folder, split))
    finally:
        _remove(tmp)
    return len(images)


# ---------------------------------------------------------------------------------------------------- helpers
def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size:,} bytes"


__all__ = ["Entry", "Outcome", "Report", "default_manifest", "fetch", "describe", "download", "CIFAR10_CLASSES"]
