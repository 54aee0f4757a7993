"""Per-class BatchNorm statistics ("BNS centers", FDDA): for every class and every BatchNorm layer, the per-channel
mean and (biased) variance over N, H, W of what that BN normalises — its input — on the class's calibration images.

A centers dict holds `layers` (BN module names in forward order), `classes` (the class indices present), `mean` and
`var` (one tensor per layer, shape classes x channels), `counts` (images per class) and `correct` (how many of them
the model classifies correctly). `python -m ptqkit.tools.bns_centers` writes one to a file; the `fdda` algorithm
takes it through `algorithm.centers` or computes it itself.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ptqkit import assets, precision
from ptqkit.errors import UserError

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BN_TYPES)]


def bn_input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every axis but the channel axis (1), as BN computes them; in
    float32 whatever `x` was computed in (runtime.compute_dtype)."""
    x = precision.float32(x)
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=False)


@contextlib.contextmanager
def record_bn_inputs(layers, on_input):
    """Call `on_input(index, tensor)` with the input of the index-th BN layer on every forward; hooks removed
    afterwards even if the forward fails."""
    handles = [m.register_forward_hook(lambda _m, inputs, _out, i=i: on_input(i, inputs[0]))
               for i, (_, m) in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def compute_bns_centers(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64,
                        device=None) -> dict:
    """BNS centers of `model` (eval mode) on `images` grouped by `labels`.

    Images of several classes share a forward pass: eval-mode BN treats samples independently, so per-sample
    sums and sums of squares (float64) added up per class give exactly the statistics of each class's batch.
    """
    if len(images) != len(labels):
        raise UserError(f"BNS centers: {len(images)} images but {len(labels)} labels")
    layers = batchnorm_layers(model)
    if not layers:
        raise UserError(f"BNS centers: model '{type(model).__name__}' has no BatchNorm layer")
    device = device or next(model.parameters()).device
    classes, slot = torch.unique(labels, return_inverse=True)  # slot: row of each image's class
    n_classes = len(classes)
    sums: list = [None] * len(layers)
    squares: list = [None] * len(layers)
    positions = [0] * len(layers)
    batch_slot: torch.Tensor = slot[:0]

    def accumulate(i, x):
        per_sample = x.detach().flatten(2) if x.dim() > 2 else x.detach().unsqueeze(2)  # N x C x positions
        # Per-sample moments in the input's precision (torch's var_mean is numerically stable), then combined
        # per class in float64: n·(var + mean²) is the sample's sum of squares.
        var, mean = torch.var_mean(per_sample, dim=2, unbiased=False)
        var, mean = var.double(), mean.double()
        if sums[i] is None:
            sums[i] = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, device=x.device)
            squares[i] = torch.zeros_like(sums[i])
            positions[i] = per_sample.shape[2]
        rows = batch_slot.to(x.device)
        sums[i].index_add_(0, rows, mean * positions[i])
        squares[i].index_add_(0, rows, (var + mean * mean) * positions[i])

    correct = torch.zeros(n_classes, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with record_bn_inputs(layers, accumulate):
            for start in range(0, len(images), batch_size):
                batch_slot = slot[start:start + batch_size]
                logits = model(images[start:start + batch_size].to(device))
                hits = logits.argmax(1).cpu() == labels[start:start + batch_size]
                correct.index_add_(0, batch_slot, hits.long())
    finally:
        model.train(was_training)
    counts = torch.bincount(slot, minlength=n_classes)
    means, variances = [], []
    for i in range(len(layers)):
        n = (counts * positions[i]).to(torch.float64).unsqueeze(1).to(sums[i].device)
        mean = sums[i] / n
        means.append(mean.float().cpu())
        variances.append((squares[i] / n - mean * mean).clamp_min(0).float().cpu())
    return {"layers": [name for name, _ in layers], "classes": classes, "mean": means, "var": variances,
            "counts": counts, "correct": correct}


def check_centers(centers: dict, model: nn.Module, source: str) -> None:
    """One-line error when a centers file does not belong to `model`."""
    missing = [k for k in ("layers", "classes", "mean", "var", "counts", "correct") if k not in centers]
    if missing:
        raise UserError(f"BNS centers '{source}': no '{missing[0]}' entry (not a file of python -m ptqkit.tools.bns_centers)")
    names = [name for name, _ in batchnorm_layers(model)]
    if centers.get("layers") != names:
        raise UserError(f"BNS centers '{source}': BN layers {len(centers.get('layers') or [])} "
                        f"do not match the model's {len(names)} (computed for another model?)")
    for i, (_, m) in enumerate(batchnorm_layers(model)):
        if centers["mean"][i].shape[1] != m.num_features:
            raise UserError(f"BNS centers '{source}': layer {names[i]} has {centers['mean'][i].shape[1]} channels, "
                            f"the model {m.num_features}")


def load_centers(path: str) -> dict:
    try:
        return torch.load(assets.resolve(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"BNS centers '{path}': cannot be read ({reason})") from None
