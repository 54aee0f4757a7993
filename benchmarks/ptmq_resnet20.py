#!/usr/bin/env python
"""PTMQ benchmark: CIFAR-10 ResNet-20 from the assets (docs/ASSETS.md). One PTMQ reconstruction (W4, activations
A4/A6/A8) evaluated at all three bit-widths, beside three single-bit QDrop reconstructions (W4A4, W4A6, W4A8) of the
same budget; PTMQ should be within 1.0 point of each, and its time is compared with the three runs' sum.

    python benchmarks/ptmq_resnet20.py                   # the protocol (hours of CPU)
    python benchmarks/ptmq_resnet20.py --smoke           # 20 iterations, 128 calibration images, 500 test images

Runs go through reconstruction_resnet20.run_one (each its own ptq_main.py process; a run folder holding a
results.json is reused). Protocol: configs/cifar10/resnet20_w4_ptmq.yaml and resnet20_w4a4_qdrop.yaml, i.e. 1,024
calibration images drawn with seed 1005, batch 32, 2,000 iterations per unit, MSE initialisation, all 10,000 test
images. BN is folded in every run (PTMQ's setting; the QDrop runs get quant.fold_bn=true), so the methods differ
in nothing else; the run folders are therefore not shared with reconstruction_resnet20 (whose QDrop keeps BN).
One PTMQ iteration runs the unit three times (once per bit-width); the time comparison is what that costs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import reconstruction_resnet20 as rr

REPO = rr.REPO
rr.CONFIGS.setdefault("ptmq", "configs/cifar10/resnet20_w4_ptmq.yaml")
SMOKE = ["algorithm.iters=20", "data.calibration.num_images=128", "data.evaluation.limit=500",
         "data.evaluation.workers=0"]
QDROP_EXTRA = ["quant.fold_bn=true"]
TOLERANCE = 1.0


def ptmq_rows(r: dict) -> dict[int, dict]:
    rows = r.get("extra_evaluations", {}).get("activation_bits", {})
    return {row["act_bits"]: row for row in rows.values()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", nargs=3, type=int, default=[4, 6, 8], help="low, mid, high")
    parser.add_argument("--seed", type=int, default=1005)
    parser.add_argument("--smoke", action="store_true", help="20 iterations, 128 calibration images, 500 test "
                                                             "images, single-threaded")
    parser.add_argument("--out", help="run folders (default benchmarks/runs/ptmq_resnet20, smoke: "
                                      "benchmarks/runs/ptmq_smoke)")
    parser.add_argument("--results", help="Markdown summary (default benchmarks/results/ptmq_resnet20.md; "
                                          "smoke: inside --out)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (each single-threaded if > 1)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    args = parser.parse_args()
    extra = (SMOKE if args.smoke else []) + args.extra
    out_root = os.path.join(REPO, args.out or ("benchmarks/runs/ptmq_smoke" if args.smoke
                                               else "benchmarks/runs/ptmq_resnet20"))
    results_md = os.path.join(REPO, args.results or (os.path.join(out_root, "results.md") if args.smoke
                                                     else "benchmarks/results/ptmq_resnet20.md"))
    os.makedirs(out_root, exist_ok=True)
    threads = 1 if args.jobs > 1 or args.smoke else 0
    w, (low, mid, high) = args.w_bits, args.a_bits
    ptmq_cell = ("ptmq", f"W{w}A{low}", args.seed)
    ptmq_extra = [f"algorithm.act_bits=[{low}, {mid}, {high}]"]
    cells = [(ptmq_cell, ptmq_extra)] + [(("qdrop", f"W{w}A{a}", args.seed), QDROP_EXTRA) for a in args.a_bits]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda c: rr.run_one(*c[0], out_root, c[1] + extra, threads), cells))
    by_cell = {c[0]: r for c, r in zip(cells, results) if r is not None}

    runs = []
    ptmq = by_cell.get(ptmq_cell)
    if ptmq is not None:
        for a, row in sorted(ptmq_rows(ptmq).items()):
            runs.append(rr.row("ptmq", f"W{w}A{a} (one model)", args.seed, {**ptmq, "quant": row}))
    runs += [rr.row(*c, r) for c, r in by_cell.items() if c[0] == "qdrop"]

    comparison = ["| bits | PTMQ top-1 % (one model) | QDrop top-1 % (own model) | PTMQ − QDrop | "
                  f"within {TOLERANCE} |", "|---|---|---|---|---|"]
    verdicts = []
    for a in args.a_bits:
        qdrop = by_cell.get(("qdrop", f"W{w}A{a}", args.seed))
        row = ptmq_rows(ptmq).get(a) if ptmq else None
        if qdrop is None or row is None:
            comparison.append(f"| W{w}A{a} | {row['top1'] if row else '–'} | "
                              f"{qdrop['quant']['top1'] if qdrop else '–'} | – | run missing |")
            verdicts.append(False)
            continue
        delta = row["top1"] - qdrop["quant"]["top1"]
        verdicts.append(delta >= -TOLERANCE)
        comparison.append(f"| W{w}A{a} | {row['top1']:.2f} | {qdrop['quant']['top1']:.2f} | {delta:+.2f} | "
                          f"{'yes' if verdicts[-1] else 'NO'} |")
    qdrop_runs = [r for c, r in by_cell.items() if c[0] == "qdrop"]
    timing = "–"
    if ptmq is not None and len(qdrop_runs) == len(args.a_bits):
        # Reconstruction seconds summed over units: a resumed run's "quantize" covers only its last start, the
        # per-unit seconds survive the resume.
        unit_s = lambda r: sum(u["seconds"] for u in r["algorithm_results"]["units"])  # noqa: E731
        ptmq_s, qdrop_s = unit_s(ptmq), sum(unit_s(r) for r in qdrop_runs)
        resumed = [f"{c[0]} {c[1]}" for c, r in by_cell.items() if "resumed" in r]
        timing = (f"Reconstruction (sum of unit seconds): PTMQ {ptmq_s:.0f} s for one model serving "
                  f"{len(args.a_bits)} bit-widths vs QDrop {qdrop_s:.0f} s for its {len(qdrop_runs)} models: "
                  f"{ptmq_s / qdrop_s:.2f}x the sum." + (f" Resumed runs: {', '.join(resumed)}." if resumed else ""))

    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    text = (f"# ResNet-20 (CIFAR-10 assets): PTMQ (one multi-bit model) beside QDrop (one model per "
            f"bit-width)\n\nMade by `{command}` on {time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores)"
            + (f"; smoke overrides: {', '.join(SMOKE)}" if args.smoke else "") + ". BN folded in every run. "
            "A PTMQ iteration runs the unit once per bit-width.\n\n"
            f"## Runs\n\n{rr.ROW_HEADER}\n" + "\n".join(runs) + "\n\n"
            f"## PTMQ within {TOLERANCE} point of each single-bit QDrop run\n\n" + "\n".join(comparison) + "\n\n"
            f"{'All within.' if all(verdicts) else 'NOT all within.'}\n\n## Time\n\n{timing}\n")
    rr.write_results(results_md, text)
    print(text)
    failed = len(cells) - len(by_cell)
    if failed:
        print(f"{failed} run(s) failed: see the .log files in {out_root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
