#!/usr/bin/env python
"""PD-Quant benchmark: CIFAR-10 ResNet-20 from the assets (docs/ASSETS.md), PD-Quant beside QDrop at W2A4 and W2A2
over three seeds, its ablations (prediction difference only, distribution correction only), and what it costs
(ms per iteration, distribution-correction seconds, peak memory) against QDrop.

    python benchmarks/pdquant_resnet20.py                 # the protocol (many hours of CPU)
    python benchmarks/pdquant_resnet20.py --smoke         # 20 iterations, 128 calibration images, 20 DC steps,
                                                          # 500 test images, the first seed, single-threaded
    python benchmarks/pdquant_resnet20.py --cost          # the cost rows: QDrop, PD-Quant, ablations one after
                                                          # another, 200 it, 128 images (same machine load)
    python benchmarks/pdquant_resnet20.py --table-only    # tabulate the finished runs of the protocol, start none

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
# Cost rows: per-iteration time and memory do not depend on the iteration count, and DC's seconds scale with
# the image count (500 steps per 32 images either way).
COST = ["algorithm.iters=200", "data.calibration.num_images=128", "data.evaluation.limit=500"]


def dc_seconds(run_dir: str) -> float | None:
    """Seconds spent in distribution correction, from the run's log (the engine's unit time includes them)."""
    path = os.path.join(run_dir, "log.txt")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        found = re.findall(r"distribution correction: .* \(([\d.]+) s\)", f.read())
    return sum(map(float, found)) if found else None


def cost(r: dict, run_dir: str) -> tuple[float, float, float, bool]:
    """(ms per iteration, DC seconds, peak RSS MB, whether the loop alone was timed) of one run. Per iteration: the
    engine's loop time where recorded (older runs: unit seconds less DC, which also holds range init and the final
    error). Unit records, not the quantize phase's time, so that a resumed run (whose quantize time is its last
    process's) counts whole."""
    units = r["algorithm_results"]["units"]
    dc = dc_seconds(run_dir) or 0.0
    loop_only = all("loop_seconds" in u for u in units)
    spent = sum(u["loop_seconds"] for u in units) if loop_only else sum(u["seconds"] for u in units) - dc
    return 1000 * spent / sum(u["iterations"] for u in units), dc, r["memory"]["host_peak_rss_mb"], loop_only


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "–"


def summary(done: list[tuple[tuple, dict]], run_dirs: dict) -> str:
    lines = ["| method | bits | runs | top-1 % (mean ± std) | FP32 | ms / iteration | × QDrop | "
             "DC s | peak RSS MB | × QDrop |", "|---|---|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple[str, str], list] = {}
    for (method, bits, seed), r in done:
        cells.setdefault((method, bits), []).append(cost(r, run_dirs[(method, bits, seed)]) + (r,))
    for (method, bits), runs in cells.items():
        top1 = [r["quant"]["top1"] for *_, r in runs]
        std = f" ± {statistics.stdev(top1):.2f}" if len(top1) > 1 else ""
        ms, dc, rss = (statistics.mean(c[i] for c in runs) for i in range(3))
        base = cells.get(("qdrop", bits))
        q_ms, _, q_rss = (statistics.mean(c[i] for c in base) for i in range(3)) if base else (None, None, None)
        # Two timing measures do not divide: a ratio only where both cells timed the loop alone.
        same_measure = base is not None and all(c[3] for c in runs + base)
        fp32 = "/".join(sorted({f"{r['fp32']['top1']:.2f}" for *_, r in runs}))
        lines.append(f"| {method} | {bits} | {len(runs)} | {statistics.mean(top1):.2f}{std} | {fp32} | "
                     f"{ms:.1f}{'' if all(c[3] for c in runs) else '*'} | "
                     f"{_ratio(ms, q_ms if same_measure else None)} | {dc:.0f} | {rss:.0f} | {_ratio(rss, q_rss)} |")
    return "\n".join(lines)


def unit_losses(done: list[tuple[tuple, dict]], seed: int) -> str:
    """Final error of each unit's output against the FP network's (the engine's final_rec_loss, the same measure
    for every row), one column per method, for `seed`; PD-Quant rows with DC also against their own target."""
    out = []
    for bits in dict.fromkeys(c[1] for c, _ in done):
        runs = [(c[0], r) for c, r in done if c[1] == bits and c[2] == seed]
        if len(runs) < 2:
            continue
        cols, names = [], [u["name"] for u in runs[0][1]["algorithm_results"]["units"]]
        for method, r in runs:
            units = r["algorithm_results"]["units"]
            cols.append((method, [u["final_rec_loss"] for u in units]))
            if any("final_rec_loss_method_target" in u for u in units):
                cols.append((f"{method} (vs DC target)", [u.get("final_rec_loss_method_target", u["final_rec_loss"])
                                                          for u in units]))
        out.append(f"### {bits}, seed {seed}\n\n| unit | " + " | ".join(m for m, _ in cols) + " |\n|---|"
                   + "---|" * len(cols) + "\n" + "\n".join(f"| {name} | " + " | ".join(f"{v[k]:.4g}" for _, v in cols)
                                                     + " |" for k, name in enumerate(names)))
    return "\n\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["qdrop", "pdquant"])
    parser.add_argument("--ablations", nargs="*", default=["pdquant_pd_only", "pdquant_dc_only"])
    parser.add_argument("--bits", nargs="+", default=["W2A4", "W2A2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1005, 1006, 1007])
    parser.add_argument("--ablation-seeds", nargs="+", type=int, default=[1005])
    parser.add_argument("--smoke", action="store_true", help="20 iterations, 128 calibration images, 20 DC steps, "
                                                             "500 test images, the first seed, single-threaded")
    parser.add_argument("--cost", action="store_true",
                        help="the cost rows only: QDrop, PD-Quant and its ablations one after another in one "
                             "invocation, single-threaded, at the first bit-width and seed, with "
                             + ", ".join(COST) + " (the protocol's runs span days and machine loads, so "
                             "their timings do not compare)")
    parser.add_argument("--out", help="run folders (default benchmarks/runs/resnet20; smoke: .../pdquant_smoke; "
                                      "cost: .../pdquant_cost)")
    parser.add_argument("--results", help="Markdown summary (default benchmarks/results/pdquant_resnet20.md; "
                                          "smoke: inside --out; cost: benchmarks/results/pdquant_cost.md)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (each single-threaded if > 1)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    parser.add_argument("--table-only", action="store_true",
                        help="tabulate the finished runs, start none (cells not finished are listed as missing)")
    args = parser.parse_args()
    short = args.smoke or args.cost
    seeds = args.seeds[:1] if short else args.seeds
    bits_list = args.bits[:1] if args.cost else args.bits
    ablation_seeds = seeds[:1] if short else args.ablation_seeds
    mode = "smoke" if args.smoke else "cost" if args.cost else None
    default_out = f"benchmarks/runs/pdquant_{mode}" if mode else "benchmarks/runs/resnet20"
    out_root = os.path.join(REPO, args.out or default_out)
    default_md = ("benchmarks/results/pdquant_cost.md" if args.cost else os.path.join(out_root, "results.md")
                  if args.smoke else "benchmarks/results/pdquant_resnet20.md")
    results_md = os.path.join(REPO, args.results or default_md)
    os.makedirs(out_root, exist_ok=True)
    jobs = 1 if args.cost else args.jobs
    threads = 1 if jobs > 1 or short else 0
    cells = [(m, b, s) for b in bits_list for m in args.methods for s in seeds]
    cells += [(m, b, s) for b in bits_list for m in args.ablations for s in ablation_seeds]
    overrides = SMOKE if args.smoke else COST if args.cost else []

    def launch(cell):
        method = cell[0]
        extra = overrides + VARIANTS.get(method, [])
        if args.smoke and method in VARIANTS:
            extra = extra + SMOKE_DC
        return rr.run_one(*cell, out_root, extra + args.extra, threads)

    if args.table_only:
        results = [rr.finished(*c, out_root) for c in cells]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(launch, cells))
    done = [(c, r) for c, r in zip(cells, results) if r is not None]
    run_dirs = {c: rr.run_folder(*c, out_root) for c, _ in done}

    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    how = {"smoke": f"; smoke overrides: {', '.join(SMOKE)} (PD-Quant rows also {', '.join(SMOKE_DC)})",
           "cost": f"; cost overrides: {', '.join(COST)}; runs one after another, one thread each"}.get(mode, "")
    text = (f"# ResNet-20 (CIFAR-10 assets): PD-Quant beside QDrop\n\nMade by `{command}` on "
            f"{time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores){how}. pdquant_pd_only = "
            "algorithm.dc=false, pdquant_dc_only = algorithm.pd=false. ms / iteration: the engine's iteration loops "
            "alone (loop_seconds; runs without it: unit seconds less DC) over the iterations; DC s = "
            "distribution-correction seconds per run (from its log). * = timed as unit seconds less DC (runs from "
            "before loop_seconds), not divided by loop timings. Under Runs, ms / iteration is the units' whole time "
            "(DC, range init and final error included) over the iterations. Timings of runs made at different "
            "times or under different loads do not compare; `--cost` measures the cost rows under one load.\n\n"
            f"## Summary\n\n{summary(done, run_dirs)}\n\n## Runs\n\n{rr.ROW_HEADER}\n"
            + "\n".join(rr.row(*c, r) for c, r in done) + "\n")
    missing = [f"{m} {b} seed {s}" for (m, b, s), r in zip(cells, results) if r is None]
    if missing:
        text += "\nNot finished: " + ", ".join(missing) + ".\n"
    if not args.cost and done:
        from ptqkit.tools.compare import compare
        from ptqkit.tools.plot_unit_losses import plot
        report_dir = out_root if args.smoke else os.path.join(os.path.dirname(results_md), "pdquant_resnet20")
        compare([run_dirs[c] for c, _ in done], report_dir)
        with open(os.path.join(report_dir, "table.md")) as f:
            text += f"\n## Mean ± std over seeds (ptqkit.tools.compare)\n\n{f.read()}\n"
        plots = []
        for bits in bits_list:
            loss_runs = [run_dirs[c] for c, _ in done if c[1] == bits and c[2] == seeds[0]]
            if len(loss_runs) > 1:
                plots.append(plot(loss_runs, os.path.join(report_dir, f"unit_losses_{bits.lower()}.png")))
        text += (f"\n## Final error of each unit's output against the FP network's, seed {seeds[0]}\n\n"
                 + unit_losses(done, seeds[0]) + "\n\nPlots (ptqkit.tools.plot_unit_losses): "
                 + ", ".join(os.path.relpath(p, os.path.dirname(results_md)) for p in plots) + "\n")
    rr.write_results(results_md, text)
    print(text)
    failed = 0 if args.table_only else len(cells) - len(done)   # --table-only lists unfinished runs, none failed
    if failed:
        print(f"{failed} run(s) failed: see the .log files in {out_root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
