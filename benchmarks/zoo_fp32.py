#!/usr/bin/env python
"""FP32 accuracy of every pretrained checkpoint of the assets (docs/ASSETS.md) on all of its images, through the
toolkit's own model zoo, checkpoint loader and preprocessing presets, beside the figure expected on this project's
image copies (the CIFAR-10 images are JPEG copies, docs/METHODS.md#resnet-20-protocol).

    python benchmarks/zoo_fp32.py                    # all five models, writes benchmarks/results/zoo_fp32.md
    python benchmarks/zoo_fp32.py --models cifar_resnet56 --no-write

The tests pin ResNet-20 on all 10,000 test images (every quantized figure is reported beside it) and check the
deeper ResNets on a subset; this script is where the full-set figures of the other checkpoints are measured (ResNet-56
on all 10,000 images takes about 40 s on 2 idle cores, several times that on a loaded machine).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from ptqkit import assets as ptq_assets  # noqa: E402

ASSETS = ptq_assets.root()

# name -> (checkpoint under ASSETS, image folder under ASSETS, preset, top-1 expected on this project's image copies)
MODELS = {
    "cifar_resnet20": ("cifar10/resnet20-12fca82f.th", "cifar10/test", "cifar10", 81.03),
    "cifar_resnet32": ("cifar10/resnet32-d509ac18.th", "cifar10/test", "cifar10", 82.56),
    "cifar_resnet44": ("cifar10/resnet44-014dd654.th", "cifar10/test", "cifar10", 82.67),
    "cifar_resnet56": ("cifar10/resnet56-4bfd9763.th", "cifar10/test", "cifar10", 83.20),
    "mobilenet_v2": ("imagenet/mobilenet_v2_coral.pth", "imagenet/sample", "imagenet_pm1", 78.7),
}


@torch.no_grad()
def evaluate(name: str, batch_size: int) -> dict:
    from ptqkit import data
    from ptqkit.models import build_model, load_checkpoint
    from ptqkit.pipeline import evaluate as top_k
    checkpoint, folder, preset, stated = MODELS[name]
    start = time.perf_counter()
    model = build_model(name)
    load_checkpoint(model, os.path.join(ASSETS, checkpoint))
    loader = torch.utils.data.DataLoader(data.image_folder(os.path.join(ASSETS, folder), None, preset),
                                         batch_size=batch_size, num_workers=2)
    result = top_k(model, loader, torch.device("cpu"), show_progress=False)
    return {"model": name, "images": result["images"], "top1": result["top1"], "top5": result["top5"],
            "stated": stated, "seconds": time.perf_counter() - start}


def table(rows: list[dict]) -> str:
    lines = ["| model | images | top-1 % | top-5 % | expected top-1 % | difference | seconds (load + eval) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['images']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['stated']:.2f} | "
                     f"{r['top1'] - r['stated']:+.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; keep the results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(evaluate(name, args.batch_size))
        r = rows[-1]
        print(f"{name}: top-1 {r['top1']:.2f} % (expected {r['stated']:.2f} %), top-5 {r['top5']:.2f} %, "
              f"{r['images']} images, {r['seconds']:.1f} s", flush=True)
    text = table(rows)
    print(text)
    if not args.no_write:
        command = "python benchmarks/zoo_fp32.py" + ("" if args.models == list(MODELS) else
                                                     " --models " + " ".join(args.models))
        out = os.path.join(REPO, "benchmarks", "results", "zoo_fp32.md")
        with open(out, "w") as f:
            f.write("# FP32 accuracy of the assets' checkpoints on all of their images\n\n"
                    f"Made by `{command}` on {time.strftime('%Y-%m-%d')} (CPU, {args.threads} threads, "
                    f"torch {torch.__version__}, Python {platform.python_version()}). The CIFAR-10 models are "
                    "evaluated on the 10,000 test images (this project's JPEG copies), MobileNetV2 on the 1,000 ImageNet "
                    "sample images "
                    "(preset imagenet_pm1). Seconds include the data loading and may vary with the machine's "
                    "load.\n\n" + text + "\n")
        print(f"-> {os.path.relpath(out, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
