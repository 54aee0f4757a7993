"""Per-class BatchNorm statistics ("BNS centers", FDDA): for every class and every BatchNorm layer, the per-channel
mean and (biased) variance over N, H, W of what that BN normalises — its input — on the class's calibration images.

    python -m tools.bns_centers --config CFG.yaml --out centers.pt [--set key.path=value ...]

The model, checkpoint, data and calibration draw come from the run config (FDDA's: one image per class,
`data.calibration.per_class: 1`). The file holds a dict: `layers` (BN module names in forward order), `classes`
(the class indices present), `mean` and `var` (one tensor per layer, shape classes x channels), `counts` (images per
class), and the model name; the `fdda` algorithm takes it through `algorithm.centers` or recomputes it itself.
"""
from __future__ import annotations

import argparse
import contextlib
import logging

import torch
import torch.nn as nn

from ptqkit.errors import UserError

log = logging.getLogger("ptq.bns_centers")

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BN_TYPES)]


def bn_input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every axis but the channel axis (1), as BN computes them."""
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

    A class with more images than `batch_size` is processed in chunks; sums and sums of squares are accumulated
    in float64 so the result equals the statistics of the whole class batch.
    """
    if len(images) != len(labels):
        raise UserError(f"BNS centers: {len(images)} images but {len(labels)} labels")
    layers = batchnorm_layers(model)
    if not layers:
        raise UserError(f"BNS centers: model '{type(model).__name__}' has no BatchNorm layer")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    classes = sorted(set(labels.tolist()))
    means = [[] for _ in layers]
    variances = [[] for _ in layers]
    counts = []
    sums: dict[int, list] = {}

    def accumulate(i, x):
        x = x.detach().double().transpose(0, 1).flatten(1)  # channels x (N*H*W)
        s, sq, n = sums.get(i, (0.0, 0.0, 0))
        sums[i] = (s + x.sum(1), sq + (x * x).sum(1), n + x.shape[1])

    try:
        with record_bn_inputs(layers, accumulate):
            for cls in classes:
                members = images[labels == cls]
                sums.clear()
                for start in range(0, len(members), batch_size):
                    model(members[start:start + batch_size].to(device))
                for i in range(len(layers)):
                    s, sq, n = sums[i]
                    mean = s / n
                    means[i].append(mean.float().cpu())
                    variances[i].append((sq / n - mean * mean).clamp_min(0).float().cpu())
                counts.append(len(members))
    finally:
        model.train(was_training)
    return {"layers": [name for name, _ in layers], "classes": torch.tensor(classes),
            "mean": [torch.stack(m) for m in means], "var": [torch.stack(v) for v in variances],
            "counts": torch.tensor(counts)}


def check_centers(centers: dict, model: nn.Module, source: str) -> None:
    """One-line error when a centers file does not belong to `model`."""
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
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"BNS centers '{path}': cannot be read ({reason})") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config (model, checkpoint, data, calibration draw)")
    parser.add_argument("--out", required=True, help="output file (.pt)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)

    import data
    from ptqkit.config import load_config
    from ptqkit.pipeline import build_fp_model, select_device

    cfg = load_config(args.config, args.overrides)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = select_device(cfg.runtime.device)
    model = build_fp_model(cfg, device)
    splits = data.make_splits(cfg.data)
    images, labels = data.draw_calibration(splits, cfg.data.calibration)
    centers = compute_bns_centers(model, images, labels, cfg.data.calibration.batch_size, device)
    centers["model"] = cfg.model.name
    torch.save(centers, args.out)
    log.info("BNS centers of %d classes x %d BN layers (%d images) -> %s", len(centers["classes"]),
             len(centers["layers"]), len(images), args.out)
    return 0


if __name__ == "__main__":
    import sys

    from tools import cli
    sys.exit(cli(main))
