#!/usr/bin/env python
"""MobileNetV2 W4A4 on the ImageNet sample: the reconstruction methods against iterations per unit.

The sample is 1,000 ImageNet images, one per class, split with seed 1005 into a 500-image calibration half and a
500-image evaluation half (configs/_base_/imagenet_sample_mobilenet_v2.yaml); every run calibrates on all 500
calibration images and is evaluated on the other 500, beside FP32 on the same images. 500 images carry about ±2
points of sampling noise: compare methods on the same images. Each run is its own ptq_main.py process (1 thread).

    python benchmarks/mobilenet_v2_sample.py --methods qdrop --iters 500 1000 2000 4000     # the budget curve
    python benchmarks/mobilenet_v2_sample.py --methods naive adaround brecq brecq_joint qdrop --iters 2000
    python benchmarks/mobilenet_v2_sample.py --methods qdrop --iters 2000 --tag f1w8 \
        --set "quant.layers=[{match: features.1.conv.0.0, w: {bits: 8}}]"   # one layer kept at 8 bits
    python benchmarks/mobilenet_v2_sample.py --table-only

Runs already finished are not repeated; an interrupted one continues from its saved progress (`--resume`).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reconstruction_resnet20 import run_ptq, write_results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "configs/_base_/imagenet_sample_mobilenet_v2.yaml"


def run_dir(out: str, method: str, bits: str, iters: int, seed: int, tag: str = "") -> str:
    it = "" if method == "naive" else f"_it{iters}"
    return os.path.join(REPO, out, f"{method}_{bits.lower()}{it}{'_' + tag if tag else ''}_s{seed}")


def run(out: str, method: str, bits: str, iters: int, seed: int, extra: list[str], tag: str = "") -> dict | None:
    folder = run_dir(out, method, bits, iters, seed, tag)
    w, a = bits[1:].split("A")
    # each method with its own defaults (QDrop: steps re-observed on 256 of each unit's inputs)
    algorithm = "{name: naive, calib_images: 500}" if method == "naive" else f"{{name: {method}, iters: {iters}}}"
    sets = [f"algorithm={algorithm}", f"quant.w.bits={w}", f"quant.a.bits={a}", f"runtime.seed={seed}",
            "data.calibration.num_images=500", "runtime.threads=1", "runtime.save_model=false",
            f"runtime.output_dir={os.path.relpath(folder, REPO)}"]
    return run_ptq(folder, ["--config", BASE, "--set", *sets, *extra])


def unit_errors(r: dict) -> str:
    units = r.get("algorithm_results", {}).get("units", [])
    worst = sorted(units, key=lambda u: -u.get("final_rec_loss", 0))[:3]
    return "; ".join(f"{u['name']} {u['initial_rec_loss']:.3g} → {u['final_rec_loss']:.3g}"
                     for u in worst if "initial_rec_loss" in u) or "–"


def row(r: dict, name: str) -> str:
    alg, q = r["config"]["algorithm"], r["config"]["quant"]
    iters = alg.get("iters") if alg.get("name") != "naive" else None
    kept = ", ".join(f"{e['match']} W{e['w']['bits']}" for e in q.get("layers", []) if e.get("w", {}).get("bits"))
    commit = r.get("versions", {}).get("ptqkit_commit") or "–"
    return (f"| {alg['name']} | {r['bits']} | {iters or '–'} | {kept or '–'} | {r['config']['runtime']['seed']} | "
            f"{r['quant']['top1']:.2f} | {r['fp32']['top1']:.2f} | {r['seconds']['quantize']:.0f} | "
            f"{unit_errors(r)} | {commit} | `{name}` |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["qdrop"])
    parser.add_argument("--iters", nargs="+", type=int, default=[2000])
    parser.add_argument("--bits", nargs="+", default=["W4A4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1005])
    parser.add_argument("--out", default="benchmarks/runs/mobilenet_v2_sample")
    parser.add_argument("--results", default="benchmarks/results/mobilenet_v2_sample.md")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    parser.add_argument("--tag", default="", help="run-folder suffix naming what --set changed")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    extra = [item for o in args.extra for item in ("--set", o)]
    rows, missing = [], []
    if args.table_only:   # every run folder there is, finished or not
        for folder in sorted(glob.glob(os.path.join(REPO, args.out, "*_s*/"))):
            name = os.path.basename(folder.rstrip("/"))
            if os.path.exists(os.path.join(folder, "results.json")):
                rows.append(row(json.load(open(os.path.join(folder, "results.json"))), name))
            elif os.path.exists(os.path.join(folder, "progress.pt")):
                missing.append(f"{name} (resume with: python ptq_main.py --resume {os.path.relpath(folder, REPO)})")
    for method in ([] if args.table_only else args.methods):
        for bits in args.bits:
            for iters in ([0] if method == "naive" else args.iters):
                for seed in args.seeds:
                    r = run(args.out, method, bits, iters, seed, extra, args.tag)
                    if r is None:
                        missing.append(f"{method} {bits} {iters} it seed {seed}")
                        continue
                    rows.append(row(r, os.path.basename(run_dir(args.out, method, bits, iters, seed, args.tag))))
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    text = (f"# MobileNetV2 on the ImageNet sample\n\nMade by `{command}` on {time.strftime('%Y-%m-%d')} (CPU, 1 "
            "thread per run, two runs side by side: times are a loaded machine's). MobileNetV2 1.0-224, per-channel "
            "asymmetric weights, per-tensor asymmetric activations, hist_mse initialisation, first/last layer "
            "weights and the last layer's input at 8 bit; 500 calibration images, batch 32, each method with its own "
            "defaults (λ 0.1 for MobileNetV2); the other 500 images evaluated (FP32 beside, same images).\n\n"
            "| method | bits | iterations per unit | layers set apart | seed | top-1 % | FP32 % | quantize s | largest unit "
            "errors, before → after reconstruction | commit | run folder |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(write_results(os.path.join(REPO, args.results), text, missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
