#!/usr/bin/env python
"""FDDA benchmark: CIFAR-10 ResNet-20 W4A4 (or --bits) from the assets (docs/ASSETS.md), 10 calibration images (one
per class, drawn with seed 1005 from the training images), each run in its own process through ptq_main.py;
then one table with the FP32 top-1 of the same run beside each quantized top-1, on all 10,000 test images.

    python benchmarks/fdda_resnet20.py                       # fdda, its ablation, the naive baselines
    python benchmarks/fdda_resnet20.py --seeds 1005 1006 1007 --runs fdda fdda_real_only

Rows:
- fdda: configs/cifar10/resnet20_w4a4_fdda.yaml (the published losses and optimiser, a CPU budget);
- fdda_real_only: the same fine-tuning without generated images (algorithm.use_generated: false);
- naive: round to nearest with MSE observers on the same 10 images
  (configs/cifar10/resnet20_w4a4_naive_per_class1.yaml);
- naive_fdda_scheme: round to nearest with FDDA's own quantizers (per-channel min/max weights, EMA min/max
  activations) on the same 10 images: what FDDA starts from.

Runs already finished (results.json present) are not repeated; the naive rows run for the first seed only
(runtime.seed does not change them). `--set` adds an override to every run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The FDDA rows also evaluate their model as it stands before the first student step: what fine-tuning adds.
_BEFORE = ["algorithm.eval_before_finetuning=true"]
RUNS = {
    "fdda": ("configs/cifar10/resnet20_w4a4_fdda.yaml", _BEFORE),
    "fdda_real_only": ("configs/cifar10/resnet20_w4a4_fdda_real_only.yaml", _BEFORE),
    "naive": ("configs/cifar10/resnet20_w4a4_naive_per_class1.yaml", []),
    "naive_fdda_scheme": ("configs/cifar10/resnet20_w4a4_naive_per_class1.yaml",
                          ["quant.w.observer=minmax", "quant.a.observer=ema_minmax"]),
    # reconstruction on the same 10 images (2,000 iterations per unit, batches of 32 drawn with replacement)
    "qdrop": ("configs/cifar10/resnet20_w4a4_qdrop.yaml", ["data.calibration.per_class=1"]),
}


def run_one(name: str, seed: int, out_root: str, extra: list[str], table_only: bool = False) -> dict | None:
    config, overrides = RUNS[name]
    run_dir = os.path.join(out_root, f"{name}_s{seed}")
    results = os.path.join(run_dir, "results.json")
    if os.path.exists(results) or table_only:
        return json.load(open(results)) if os.path.exists(results) else None
    # the run folder relative to the repository: committed files carry no path of the machine that made them
    overrides = overrides + [f"runtime.seed={seed}", f"runtime.output_dir={os.path.relpath(run_dir, REPO)}",
                             "runtime.save_model=false"]
    cmd = [sys.executable, "ptq_main.py", "--config", config, "--quiet"]
    for o in overrides + extra:
        cmd += ["--set", o]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0 or not os.path.exists(results):
        print(f"  FAILED ({proc.returncode}) after {time.time() - start:.0f} s", flush=True)
        return None
    r = json.load(open(results))
    r["wall_seconds"] = round(time.time() - start, 1)
    with open(results, "w") as f:
        json.dump(r, f, indent=2)
    return r


def row(name: str, seed: int, r: dict) -> str:
    fdda = r.get("algorithm_results", {}).get("fdda", {})
    steps = f"{fdda['generator_steps']} / {fdda['student_steps']}" if fdda else "–"
    # runs written before the figure moved into algorithm_results.fdda keep it under extra_evaluations
    before = fdda.get("before_finetuning") or r.get("extra_evaluations", {}).get("before_finetuning")
    wall = r.get("wall_seconds")
    return (f"| {name} | {seed} | {r['quant']['top1']:.2f} | {before['top1']:.2f} | " if before else
            f"| {name} | {seed} | {r['quant']['top1']:.2f} | – | ") + (
            f"{r['fp32']['top1']:.2f} | "
            f"{r['fp32']['top1'] - r['quant']['top1']:.2f} | {r['calibration_images']} | {steps} | "
            f"{r['seconds']['quantize']:.0f} | {wall if wall is not None else '–'} | {generated(fdda)} |")


def generated(fdda: dict) -> str:
    """The trained generator's report: does the teacher recognise its classes, are they nearer their own BN
    centers than the others'? (runs made before the report have none)"""
    g = fdda.get("generated")
    if not g:
        return "–"
    return f"{g['teacher_top1']:.1f} / {g['cbns_own']:.3g} vs {g['cbns_other']:.3g}"


def mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f} ± {std:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1005], help="runtime.seed of each run")
    parser.add_argument("--out", default="benchmarks/runs/fdda_resnet20")
    parser.add_argument("--results", default="benchmarks/results/fdda.md")
    parser.add_argument("--bits", default="W4A4", help="e.g. W2A4 (first/last-layer conventions unchanged)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    parser.add_argument("--table-only", action="store_true", help="tabulate the finished runs, start none")
    args = parser.parse_args()
    w_bits, a_bits = (int(x) for x in args.bits.upper()[1:].split("A"))
    args.extra = [f"quant.w.bits={w_bits}", f"quant.a.bits={a_bits}"] + args.extra
    rows, top1s = [], {}
    for seed in args.seeds:
        for name in args.runs:
            if name.startswith("naive") and seed != args.seeds[0]:
                continue  # round to nearest draws nothing at random: one run per calibration draw is enough
            r = run_one(name, seed, os.path.join(REPO, args.out), args.extra, args.table_only)
            if r is not None:
                rows.append(row(name, seed, r))
                top1s.setdefault(name, []).append(r["quant"]["top1"])
                print(rows[-1], flush=True)
    summary = "\n".join(f"- {name}: {mean_std(values)} top-1 over {len(values)} run(s)"
                         for name, values in top1s.items())
    header = ("| run | seed | top-1 % | top-1 % before fine-tuning | FP32 top-1 % (same images) | drop | "
              "calibration images | generator / student steps | quantize s | run wall s | generated images: teacher "
              "top-1 % / C-BNS to own center vs other centers |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    threads = os.environ.get("OMP_NUM_THREADS")
    text = (f"# ResNet-20 (CIFAR-10 assets): FDDA {args.bits.upper()} from one image per class\n\n"
            f"Made by `{command}` on {time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores"
            + (f", OMP_NUM_THREADS={threads}" if threads else "") + "). "
            "Every run: the same 10 calibration images (one per class, seed 1005, from the training images), all "
            f"10,000 test images; FP32 measured in the same run. {args.bits.upper()}, first/last-layer weights and the last "
            "layer's input at 8 bit. `quantize s` is the algorithm alone, `run wall s` the whole process "
            "(model, data, two evaluations); the machine was shared, so times vary with its load.\n\n"
            + header + "\n" + "\n".join(rows) + "\n\nMean ± sample std over seeds:\n\n" + summary + "\n")
    from reconstruction_resnet20 import write_results   # keeps the notes of the file it replaces
    write_results(os.path.join(REPO, args.results), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
