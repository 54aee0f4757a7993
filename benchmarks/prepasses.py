#!/usr/bin/env python
"""Pre-passes: naive quantization with and without cross-layer equalization (`cle`) and empirical bias
correction (`bias_correction`), on the MobileNetV2 of the ImageNet sample asset (docs/ASSETS.md) and on CIFAR-10
ResNet-20, FP32 measured on the same evaluation images beside every row. Each cell is one ptq_main.py run in its own folder.

    python benchmarks/prepasses.py                          # every cell, writes benchmarks/results/prepasses.md
    python benchmarks/prepasses.py --models mobilenet_v2 --bits W4A4 --table-only

MobileNetV2: the sample's 1,000 images split by the calibration seed into 500 calibration (256 used) and 500
evaluation images (configs/_base_/imagenet_sample_mobilenet_v2.yaml). Weights per channel with BN unfolded (the
toolkit's defaults), and per tensor with BN folded (the DFQ paper's setting: with BN unfolded, equalization moves
into BN's gamma and beta and leaves the first layer's quantized weights as they were); activations per tensor.
ResNet-20: 1,024 calibration images, all 10,000 test images, weights per channel. Bias correction measures on
256 calibration images (MobileNetV2: 64).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from reconstruction_resnet20 import write_results  # noqa: E402  (the notes of a results file survive a re-run)

CONFIGS = {"mobilenet_v2": "configs/imagenet/mobilenet_v2_sample_w4a4_naive.yaml",
           "cifar_resnet20": "configs/cifar10/resnet20_w4a4_naive.yaml"}
VARIANTS = {"none": [], "cle": ["cle"], "bias_correction": ["bias_correction"],
            "cle+bias_correction": ["cle", "bias_correction"]}
GRANULARITY = {"mobilenet_v2": ["per_channel", "per_tensor"], "cifar_resnet20": ["per_channel"]}
# 4-bit per-tensor weights are near 0 % with or without; per-tensor weights are measured at 8 bit (the DFQ
# paper's setting), to keep the whole table within an hour on 2 cores
SKIP = {("mobilenet_v2", "W4A4", "per_tensor"), ("mobilenet_v2", "W6A6", "per_tensor")}
# Bias correction measures each layer after the ones before it are corrected: one forward of the prefix per layer,
# so its cost grows with the square of the depth; MobileNetV2 uses 64 of its 256 calibration images for it.
PREPASS_IMAGES = {"mobilenet_v2": 64, "cifar_resnet20": 256}


def run_one(model: str, bits: str, gran: str, variant: str, out_root: str, threads: int) -> dict | None:
    w, a = bits[1:].split("A")
    folder = os.path.join(out_root, f"{model}_{bits.lower()}_{gran}_{variant.replace('+', '_')}")
    results = os.path.join(folder, "results.json")
    if os.path.exists(results):
        return json.load(open(results))
    prepasses = "[" + ",".join(VARIANTS[variant]) + "]"
    overrides = [f"quant.w.bits={w}", f"quant.a.bits={a}", f"quant.w.per_channel={gran == 'per_channel'}",
                 f"quant.fold_bn={gran == 'per_tensor'}",
                 f"algorithm.prepasses={prepasses}", f"algorithm.prepass_images={PREPASS_IMAGES[model]}",
                 f"runtime.output_dir={os.path.relpath(folder, REPO)}",
                 "runtime.save_model=false", f"runtime.threads={threads}"]
    cmd = [sys.executable, "ptq_main.py", "--config", CONFIGS[model], "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(results):
        print(f"  FAILED ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.load(open(results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--bits", nargs="+", default=["W8A8", "W6A6", "W4A4"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="benchmarks/runs/prepasses")
    parser.add_argument("--results", default="benchmarks/results/prepasses.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="tabulate finished runs, start none")
    args = parser.parse_args()
    out_root = os.path.join(REPO, args.out)
    os.makedirs(out_root, exist_ok=True)
    lines = ["| model | bits | weights | FP32 top-1 % (same images) | " + " | ".join(args.variants) + " |",
             "|---|---|---|---|" + "---|" * len(args.variants)]
    details = []
    for model in args.models:
        for bits in args.bits:
            for gran in GRANULARITY[model]:
                if (model, bits, gran) in SKIP:
                    continue
                cells, fp32 = [], None
                for variant in args.variants:
                    folder_done = os.path.join(out_root, f"{model}_{bits.lower()}_{gran}_{variant.replace('+', '_')}")
                    r = (json.load(open(os.path.join(folder_done, "results.json")))
                         if args.table_only and os.path.exists(os.path.join(folder_done, "results.json"))
                         else None if args.table_only else run_one(model, bits, gran, variant, out_root,
                                                                   args.threads))
                    if r is None:
                        cells.append("–")
                        continue
                    fp32 = r["fp32"]["top1"]
                    cells.append(f"{r['quant']['top1']:.2f}")
                    extra = r.get("algorithm_results", {})
                    if "cle" in extra or "bias_correction" in extra:
                        details.append(f"- {model} {bits} {gran} {variant}: " + "; ".join(
                            f"{k} {extra[k]}" for k in ("cle", "bias_correction") if k in extra))
                label = "per tensor, BN folded" if gran == "per_tensor" else "per channel"
                lines.append(f"| {model} | {bits} | {label} | "
                             f"{'–' if fp32 is None else f'{fp32:.2f}'} | " + " | ".join(cells) + " |")
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    text = (f"# Pre-passes: cross-layer equalization and bias correction before naive quantization\n\n"
            f"Made by `{command}` on {time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores, "
            f"{args.threads} threads per run). Top-1 % of naive quantization (calibration only, no reconstruction) "
            "with each pre-pass set; MobileNetV2 on the 500 evaluation images of the ImageNet sample, ResNet-20 on all "
            "10,000 test images.\n\n" + "\n".join(lines) + "\n\nWhat each pre-pass did (results.json "
            "`algorithm_results`):\n\n" + "\n".join(details) + "\n")
    write_results(os.path.join(REPO, args.results), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
