#!/usr/bin/env python
"""PD-Quant benchmark (issue 4): CIFAR-10 ResNet-20 on the shared assets, PD-Quant beside QDrop at W2A4 and W2A2
over three seeds, its ablations (prediction difference only, distribution correction only), and what it costs
(ms per iteration, distribution-correction seconds, peak memory) against QDrop.

    python benchmarks/pdquant_resnet20.py                 # the protocol (many hours of CPU)
    python benchmarks/pdquant_resnet20.py --smoke         # 20 iterations, 128 calibration images, 20 DC steps,
                                                          # 500 test images, the first seed, single-threaded

Runs go through reconstruction_resnet20.run_one (each its own ptq_main.py process; a run folder holding a
results.json is reused), into the same folder as that benchmark by default, so its QDrop runs are not repeated.
Protocol: that benchmark's (1,024 calibration images drawn with seed 1005, batch 32, 2,000 iterations per unit,
all 10,000 test images), runtime.seed 1005, 1006, 1007; PD-Quant as configs/cifar10/resnet20_w4a4_pdquant.yaml
(reference DC: 500 steps per 32 images). The ablations run on --ablation-seeds (default: the first seed).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import reconstruction_resnet20 as rr

REPO = rr.REPO
sys.path.insert(0, REPO)
CONFIG = "configs/cifar10/resnet20_w4a4_pdquant.yaml"
# row name -> overrides of the PD-Quant config
VARIANTS = {"pdquant": [], "pdquant_pd_only": ["algorithm.dc=false"], "pdquant_dc_only": ["algorithm.pd=false"]}
for _name in VARIANTS:
    rr.CONFIGS.setdefault(_name, CONFIG)
SMOKE = ["algorithm.iters=20", "data.calibration.num_images=128", "data.evaluation.limit=500"]
SMOKE_DC = ["algorithm.dc_steps=20"]


def dc_seconds(run_dir: str) -> float | None:
    """Seconds spent in distribution correction, from the run's log (the engine's unit time includes them)."""
    path = os.path.join(run_dir, "log.txt")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        found = re.findall(r"distribution correction: .* \(([\d.]+) s\)", f.read())
    return sum(map(float, found)) if found else None


def mean_cost(runs: list[dict]) -> tuple[float, float]:
    """Mean ms per iteration (DC included) and mean peak RSS MB."""
    ms = [1000 * r["seconds"]["quantize"] / sum(u["iterations"] for u in r["algorithm_results"]["units"])
          for r in runs]
    return statistics.mean(ms), statistics.mean(r["memory"]["host_peak_rss_mb"] for r in runs)


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "–"


def summary(done: list[tuple[tuple, dict]], run_dirs: dict) -> str:
    lines = ["| method | bits | runs | top-1 % (mean ± std) | ms / iteration | × QDrop | DC s | peak RSS MB | "
             "× QDrop |", "|---|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple[str, str], list] = {}
    for (method, bits, seed), r in done:
        cells.setdefault((method, bits), []).append((r, run_dirs[(method, bits, seed)]))
    for (method, bits), runs in cells.items():
        top1 = [r["quant"]["top1"] for r, _ in runs]
        std = f" ± {statistics.stdev(top1):.2f}" if len(top1) > 1 else ""
        ms, rss = mean_cost([r for r, _ in runs])
        base = cells.get(("qdrop", bits))
        q_ms, q_rss = mean_cost([r for r, _ in base]) if base else (None, None)
        dc = [s for _, d in runs if (s := dc_seconds(d)) is not None]
        lines.append(f"| {method} | {bits} | {len(runs)} | {statistics.mean(top1):.2f}{std} | {ms:.1f} | "
                     f"{_ratio(ms, q_ms)} | {statistics.mean(dc) if dc else 0:.0f} | {rss:.0f} | "
                     f"{_ratio(rss, q_rss)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["qdrop", "pdquant"])
    parser.add_argument("--ablations", nargs="*", default=["pdquant_pd_only", "pdquant_dc_only"])
    parser.add_argument("--bits", nargs="+", default=["W2A4", "W2A2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1005, 1006, 1007])
    parser.add_argument("--ablation-seeds", nargs="+", type=int, default=[1005])
    parser.add_argument("--smoke", action="store_true", help="20 iterations, 128 calibration images, 20 DC steps, "
                                                             "500 test images, the first seed, single-threaded")
    parser.add_argument("--out", help="run folders (default benchmarks/runs/resnet20, smoke: .../pdquant_smoke)")
    parser.add_argument("--results", help="Markdown summary (default benchmarks/results/pdquant_resnet20.md; "
                                          "smoke: inside --out)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (each single-threaded if > 1)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.smoke else args.seeds
    ablation_seeds = seeds[:1] if args.smoke else args.ablation_seeds
    out_root = os.path.join(REPO, args.out or ("benchmarks/runs/pdquant_smoke" if args.smoke
                                               else "benchmarks/runs/resnet20"))
    results_md = os.path.join(REPO, args.results or (os.path.join(out_root, "results.md") if args.smoke
                                                     else "benchmarks/results/pdquant_resnet20.md"))
    os.makedirs(out_root, exist_ok=True)
    threads = 1 if args.jobs > 1 or args.smoke else 0
    cells = [(m, b, s) for b in args.bits for m in args.methods for s in seeds]
    cells += [(m, b, s) for b in args.bits for m in args.ablations for s in ablation_seeds]

    def launch(cell):
        method = cell[0]
        extra = (SMOKE if args.smoke else []) + VARIANTS.get(method, [])
        if args.smoke and method in VARIANTS:
            extra = extra + SMOKE_DC
        return rr.run_one(*cell, out_root, extra + args.extra, threads)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(launch, cells))
    done = [(c, r) for c, r in zip(cells, results) if r is not None]
    run_dirs = {c: os.path.join(out_root, f"{c[0]}_{c[1].lower()}_s{c[2]}") for c, _ in done}

    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    smoke = f"; smoke overrides: {', '.join(SMOKE)} (PD-Quant rows also {', '.join(SMOKE_DC)})" if args.smoke else ""
    text = (f"# ResNet-20 (CIFAR-10, shared assets): PD-Quant beside QDrop\n\nMade by `{command}` on "
            f"{time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores){smoke}. pdquant_pd_only = "
            "algorithm.dc=false, pdquant_dc_only = algorithm.pd=false. ms / iteration = quantize seconds (DC "
            "included) / iterations; DC s = distribution-correction seconds per run.\n\n"
            f"## Summary\n\n{summary(done, run_dirs)}\n\n## Runs\n\n{rr.ROW_HEADER}\n"
            + "\n".join(rr.row(*c, r) for c, r in done) + "\n")
    rr.write_results(results_md, text)
    print(text)
    failed = len(cells) - len(done)
    if failed:
        print(f"{failed} run(s) failed: see the .log files in {out_root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
