"""ImageFolder datasets, preprocessing presets, seeded calibration / evaluation subsets, and the evaluation images
of a run decoded once.

Calibration images are drawn once, with their own seed, and held in memory as one tensor: every algorithm
consumes exactly the same images. When calibration and evaluation read the same folder (the ImageNet
sample asset: one image per class), the folder is split with the calibration seed into two disjoint parts and the
evaluation never sees a calibration image.

Evaluation images are decoded once per run, before any calibration, into uint8 tensors after the preset's resize
and crop (`EvaluationSet`); the FP32 and the quantized evaluation then read them from memory, and normalisation
runs on whole batches (the same arithmetic as torchvision's ToTensor + Normalize per image, so the same values).
A set larger than `data.evaluation.cache_mb` once decoded is streamed instead, after a first pass that reads every
file. Either way an unreadable image stops the run there, in one line naming the file, and the set gets a digest
of its files' bytes, its labels and the preset: what the FP32 result is reused by (ptqkit.pipeline).
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from ptqkit import assets
from ptqkit.errors import ConfigError, DataError

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# preset -> (resize and crop of the PIL image, or None; mean; std)
_PRESETS = {
    "imagenet": ((256, 224), _IMAGENET_MEAN, _IMAGENET_STD),
    "imagenet_pm1": ((256, 224), (0.5,) * 3, (0.5,) * 3),   # TF-slim / TFLite models: inputs in [-1, 1]
    "cifar10": (None, _IMAGENET_MEAN, _IMAGENET_STD),
}


def _preset(preset: str):
    if preset not in _PRESETS:
        raise ConfigError("data.preset", "one of " + ", ".join(_PRESETS), preset)
    return _PRESETS[preset]


def geometry(preset: str):
    """The preset's resize and crop of a PIL image (None: the image is used as it is)."""
    size, _, _ = _preset(preset)
    if size is None:
        return None
    resize, crop = size
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])


def preprocessing(preset: str):
    """The whole per-image transform (PIL -> normalised float tensor)."""
    size, mean, std = _preset(preset)
    steps = [geometry(preset)] if size is not None else []
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def normalise(batch: torch.Tensor, preset: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float: ToTensor's x / 255, then Normalize's (x - mean) / std, on the whole batch."""
    _, mean, std = _preset(preset)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(-1, 1, 1)
    return batch.to(torch.float32).div(255).sub_(mean).div_(std)


def decode(content: bytes, path: str, preset: str) -> torch.Tensor:
    """One image file's bytes -> uint8 (C, H, W) after the preset's resize and crop; DataError names the file."""
    try:
        with Image.open(io.BytesIO(content)) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"image '{path}': cannot be decoded ({reason})") from None
    shape = geometry(preset)
    if shape is not None:
        img = shape(img)
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"image '{path}': cannot be read ({exc.strerror or exc})") from None


def image_folder(root: str, split: str | None, preset: str) -> datasets.ImageFolder:
    root = assets.resolve(root)
    folder = root if split is None else os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"data folder '{folder}': not found")
    try:
        return datasets.ImageFolder(folder, transform=preprocessing(preset))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data folder '{folder}': not an ImageFolder of class subfolders with images ({exc})") from None


@dataclass
class Splits:
    """Indices into the calibration and evaluation folders."""
    calibration: datasets.ImageFolder
    calibration_pool: list[int]
    evaluation: datasets.ImageFolder
    evaluation_indices: list[int]
    preset: str = "imagenet"


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def make_splits(data_cfg) -> Splits:
    cal = image_folder(data_cfg.root, data_cfg.calibration.split, data_cfg.preset)
    if data_cfg.shared_folder:
        order = _permutation(len(cal), data_cfg.calibration.seed)
        n_cal = int(round(len(cal) * data_cfg.calibration_fraction))
        pool, evaluation = sorted(order[:n_cal]), sorted(order[n_cal:])
        ev = cal
    else:
        ev = image_folder(data_cfg.root, data_cfg.evaluation.split, data_cfg.preset)
        pool, evaluation = list(range(len(cal))), list(range(len(ev)))
    limit = data_cfg.evaluation.limit
    if limit is not None and limit < len(evaluation):
        # A seeded, class-balanced-in-expectation subset rather than the first classes in folder order.
        keep = _permutation(len(evaluation), 0)[:limit]
        evaluation = sorted(evaluation[i] for i in keep)
    return Splits(cal, pool, ev, evaluation, data_cfg.preset)


def _load(folder: datasets.ImageFolder, indices: list[int], preset: str, workers: int) -> list[torch.Tensor]:
    paths = [folder.samples[i][0] for i in indices]
    # PIL decodes with the GIL released: threads overlap file reads and decoding without a process pool's start-up
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda p: decode(read_file(p), p, preset), paths))


def draw_calibration(splits: Splits, cal_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded calibration images as one (N, C, H, W) float tensor, with their labels."""
    pool = splits.calibration_pool
    targets = splits.calibration.targets
    if cal_cfg.per_class is not None:
        by_class: dict[int, list[int]] = {}
        for i in pool:
            by_class.setdefault(targets[i], []).append(i)
        gen = torch.Generator().manual_seed(cal_cfg.seed)
        chosen = []
        for cls in sorted(by_class):
            members = by_class[cls]
            order = torch.randperm(len(members), generator=gen).tolist()
            chosen += [members[j] for j in order[: cal_cfg.per_class]]
    else:
        if cal_cfg.num_images > len(pool):
            raise ConfigError("data.calibration.num_images",
                              f"at most {len(pool)} (the images available for calibration)", cal_cfg.num_images)
        order = _permutation(len(pool), cal_cfg.seed)
        chosen = [pool[j] for j in order[: cal_cfg.num_images]]
    images = torch.stack(_load(splits.calibration, chosen, splits.preset, 2))
    return normalise(images, splits.preset), torch.tensor([targets[i] for i in chosen])


# ------------------------------------------------------------------------------------------ evaluation set
class _Streamed(Dataset):
    def __init__(self, folder, indices, preset):
        self.samples = [folder.samples[i] for i in indices]
        self.preset = preset

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, k):
        path, label = self.samples[k]
        try:
            return decode(read_file(path), path, self.preset), label, None
        except DataError as exc:   # raised in the main process, as one line, by EvaluationSet.batches
            return torch.zeros(0, dtype=torch.uint8), label, str(exc)


def _collate(items):
    for _, _, error in items:
        if error is not None:
            raise DataError(error)
    return torch.stack([i for i, _, _ in items]), torch.tensor([label for _, label, _ in items])


class EvaluationSet:
    """The images a run evaluates on (this process's share of them), decoded once.

    `batches()` yields normalised float batches and labels. `digest` identifies the set by content (the files'
    bytes in order, the labels, the preset); `images` is None when the set is streamed."""

    def __init__(self, splits: Splits, eval_cfg, shard=None):
        indices = shard(splits.evaluation_indices) if shard else splits.evaluation_indices
        self.folder, self.indices, self.preset = splits.evaluation, list(indices), splits.preset
        self.batch_size, self.workers = eval_cfg.batch_size, eval_cfg.workers
        self.labels = torch.tensor([self.folder.targets[i] for i in self.indices], dtype=torch.long)
        paths = [self.folder.samples[i][0] for i in self.indices]
        digest = hashlib.sha256(f"{self.preset}|{self.labels.tolist()}".encode())
        self.images: Optional[torch.Tensor] = None
        if self._decoded_mb(paths) <= eval_cfg.cache_mb:
            contents = self._read(paths)
            for c in contents:
                digest.update(hashlib.sha256(c).digest())
            with ThreadPoolExecutor(max(1, self.workers)) as pool:
                decoded = list(pool.map(lambda a: decode(a[0], a[1], self.preset), zip(contents, paths)))
            self.images = torch.stack(decoded) if decoded else torch.zeros(0, dtype=torch.uint8)
        else:
            # Too large to hold: every file is read (and its header checked) now, decoded again per evaluation.
            for path in paths:
                content = read_file(path)
                digest.update(hashlib.sha256(content).digest())
                try:
                    with Image.open(io.BytesIO(content)) as img:
                        img.verify()
                except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                    raise DataError(f"image '{path}': cannot be decoded ({str(exc).splitlines()[0]})") from None
        self.digest = digest.hexdigest()

    def _read(self, paths: list[str]) -> list[bytes]:
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            return list(pool.map(read_file, paths))

    def _decoded_mb(self, paths: list[str]) -> float:
        """Size of the decoded set, from the first image (the presets give every image one size)."""
        if not paths:
            return 0.0
        first = decode(read_file(paths[0]), paths[0], self.preset)
        return first.numel() * len(paths) / 2 ** 20

    @property
    def num_images(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        """Batches, as a DataLoader counts."""
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        return self.batches()

    def batches(self, device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised float batches and labels; with a `device`, the uint8 images go there first (a quarter of the
        bytes to move) and are normalised there."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        cuda = device.type == "cuda"
        if self.images is not None:
            if cuda and not self.images.is_pinned():
                self.images = self.images.pin_memory()   # once: page-locked host memory copies asynchronously
            images = self.images
            for start in range(0, len(images), self.batch_size):
                batch = images[start:start + self.batch_size].to(device, non_blocking=True)
                yield normalise(batch, self.preset), self.labels[start:start + self.batch_size]
            return
        loader = DataLoader(_Streamed(self.folder, self.indices, self.preset), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=_collate, persistent_workers=False, pin_memory=cuda)
        for images, labels in loader:
            yield normalise(images.to(device, non_blocking=True), self.preset), labels


def evaluation_loader(splits: Splits, eval_cfg, shard=None) -> EvaluationSet:
    """The evaluation images decoded once (`shard`: keeps this process's share of them)."""
    return EvaluationSet(splits, eval_cfg, shard)


__all__ = ["EvaluationSet", "Splits", "decode", "draw_calibration", "evaluation_loader", "geometry", "image_folder",
           "make_splits", "normalise", "preprocessing"]
