#!/usr/bin/env python
"""Composition table: methods assembled from the published ones' parts (`algorithm.name: compose`,
configs/cifar10/compose/), beside PD-Quant and QDrop alone, on the engine benchmark protocol (ResNet-20, 1,024
calibration images, 2,000 iterations per unit, all 10,000 test images, FP32 beside each row).

    python benchmarks/compose_resnet20.py --jobs 2              # runs what is missing, then the table
    python benchmarks/compose_resnet20.py --table-only

Each cell is one ptq_main.py run in benchmarks/runs/compose_resnet20/<name>_<bits>_s<seed>/ (finished runs are
reused, interrupted ones resumed); the single methods' QDrop and brecq_joint rows are read from the protocol's own
run folders (benchmarks/runs/resnet20_histmse/).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import reconstruction_resnet20 as protocol  # noqa: E402  (run_one, finished, write_results)

COMPOSITIONS = {
    "qdrop": ("configs/cifar10/resnet20_w4a4_qdrop.yaml", "QDrop alone"),
    "mrecg": ("configs/cifar10/resnet20_w4a4_mrecg.yaml", "MRECG alone (automatic groups on QDrop)"),
    "pdquant": ("configs/cifar10/resnet20_w4a4_pdquant.yaml", "PD-Quant alone (QDrop drop rule + PD loss + DC)"),
    "pd_nodrop": ("configs/cifar10/compose/resnet20_w2a2_pd_nodrop.yaml", "PD-Quant's loss and DC without drop"),
    "pd_mrecg": ("configs/cifar10/compose/resnet20_w2a2_pd_mrecg.yaml", "PD-Quant on MRECG's automatic groups"),
    "ptmq_pd": ("configs/cifar10/compose/resnet20_w2a2_ptmq_pd.yaml",
                "PTMQ multi-bit [2, 4, 6] + PD-Quant's loss (no DC)"),
    "qdrop_stats": ("examples/custom_method/resnet20_w2a4_qdrop_stats.yaml",
                    "QDrop + the example method's channel-statistics term (examples/custom_method, out of tree)"),
}
SINGLE = {"qdrop": "QDrop alone, protocol budget", "brecq_joint": "brecq_joint alone, protocol budget"}
# A budget two runs side by side on 2 cores finish in minutes rather than hours (PD-Quant at the protocol budget
# takes about 2.5 hours on one loaded core): the same for every row of a table, and said in its header.
SHORT = ["data.calibration.num_images=512", "algorithm.iters=500"]
SHORT_DC = ["algorithm.dc_steps=100"]          # for the methods that have the key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="+", default=list(COMPOSITIONS), choices=list(COMPOSITIONS))
    parser.add_argument("--bits", nargs="+", default=["W2A2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1005])
    parser.add_argument("--out", default="benchmarks/runs/compose_resnet20")
    parser.add_argument("--singles", default="benchmarks/runs/resnet20_histmse")
    parser.add_argument("--results", default="benchmarks/results/compose_resnet20.md")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--short", action="store_true", help="the short budget (SHORT) for every row")
    args = parser.parse_args()
    out_root = os.path.join(REPO, args.out)
    os.makedirs(out_root, exist_ok=True)
    for name in args.names:
        protocol.CONFIGS[name] = COMPOSITIONS[name][0]
    cells = [(n, b, s) for n in args.names for b in args.bits for s in args.seeds]
    if args.table_only:
        results = [protocol.finished(*c, out_root) for c in cells]
    else:
        threads = 1 if args.jobs > 1 else 0
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            def extra(name):
                if not args.short:
                    return []
                return SHORT + (SHORT_DC if name not in ("qdrop", "mrecg", "qdrop_stats") else [])
            results = list(pool.map(lambda c: protocol.run_one(*c, out_root, extra(c[0]), threads), cells))
    rows = ["| method | bits | seeds | top-1 % (per seed) | mean ± std | FP32 top-1 % | quantize s (per seed) |",
            "|---|---|---|---|---|---|---|"]

    def add(label, bits, runs):
        runs = [(s, r) for s, r in runs if r is not None]
        if not runs:
            rows.append(f"| {label} | {bits} | – | not finished | | | |")
            return
        tops = [r["quant"]["top1"] for _, r in runs]
        spread = f"{statistics.mean(tops):.2f} ± {statistics.stdev(tops):.2f}" if len(tops) > 1 else f"{tops[0]:.2f}"
        seeds = ", ".join(str(s) for s, _ in runs)
        per_seed = " / ".join(f"{t:.2f}" for t in tops)
        seconds = " / ".join(f"{r['seconds']['quantize']:.0f}" for _, r in runs)
        rows.append(f"| {label} | {bits} | {seeds} | {per_seed} | {spread} | {runs[0][1]['fp32']['top1']:.2f} | "
                    f"{seconds} |")

    singles_root = os.path.join(REPO, args.singles)
    for bits in args.bits:
        for name in args.names:
            add(f"{name}: {COMPOSITIONS[name][1]}", bits,
                [(s, r) for (n, b, s), r in zip(cells, results) if n == name and b == bits])
        for name, label in ({} if args.short else SINGLE).items():
            add(f"{name}: {label}", bits, [(s, protocol.finished(name, bits, s, singles_root))
                                           for s in (1005, 1006, 1007)])
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    budget = ("SHORT budget for every row: 512 calibration images (seed 1005), batch 32, 500 iterations per unit, "
              "distribution correction 100 steps per 32 images" if args.short else
              "Engine benchmark protocol: 1,024 calibration images (seed 1005), batch 32, 2,000 iterations per unit")
    text = (f"# Compositions on ResNet-20 (CIFAR-10 assets)\n\nMade by `{command}` on "
            f"{time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores, one thread per run, two runs side by side). "
            f"{budget}; histogram-MSE initialisation, all 10,000 test images; FP32 measured in every run.\n\n"
            + "\n".join(rows) + "\n")
    protocol.write_results(os.path.join(REPO, args.results), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
