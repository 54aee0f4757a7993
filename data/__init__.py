"""ImageFolder datasets, preprocessing presets and seeded calibration / evaluation subsets.

Calibration images are drawn once, with their own seed, and held in memory as one tensor: every algorithm
consumes exactly the same images. When calibration and evaluation read the same folder (the shared ImageNet
sample: one image per class), the folder is split with the calibration seed into two disjoint parts and the
evaluation never sees a calibration image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from ptqkit.errors import ConfigError, DataError

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocessing(preset: str):
    if preset == "imagenet":
        return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)])
    if preset == "imagenet_pm1":  # TF-slim / TFLite models: inputs in [-1, 1]
        return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    if preset == "cifar10":
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)])
    raise ConfigError("data.preset", "one of imagenet, imagenet_pm1, cifar10", preset)


def image_folder(root: str, split: str | None, preset: str) -> datasets.ImageFolder:
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
    return Splits(cal, pool, ev, evaluation)


def draw_calibration(splits: Splits, cal_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded calibration images as one (N, C, H, W) tensor, with their labels."""
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
    images, labels = zip(*(splits.calibration[i] for i in chosen))
    return torch.stack(images), torch.tensor(labels)


def evaluation_loader(splits: Splits, eval_cfg, shard=None) -> DataLoader:
    """`shard`: keeps this process's share of the evaluation indices (several processes)."""
    indices = shard(splits.evaluation_indices) if shard else splits.evaluation_indices
    subset = Subset(splits.evaluation, indices)
    return DataLoader(subset, batch_size=eval_cfg.batch_size, shuffle=False, num_workers=eval_cfg.workers,
                      persistent_workers=False)
