#!/usr/bin/env python
"""Mixed precision on the ResNet-20 protocol (docs/MIXED_PRECISION.md): activations at 4 bits, weights from
{2, 3, 4}, first/last layer weights and the last layer's input at 8 bits as in every config; uniform W2, W3, W4
against mixed allocations at 2.5, 3.0 and 3.5 average weight bits, with QDrop at the configs' budget over three
seeds, the same allocations with naive PTQ and PD-Quant, and an ablation of the sensitivity measure and of the
solver. One results file with a plot of top-1 against average weight bits.

    python benchmarks/mixed_precision_resnet20.py                  # the protocol (many hours of CPU)
    python benchmarks/mixed_precision_resnet20.py --smoke          # every kind of run, tiny: minutes
    python benchmarks/mixed_precision_resnet20.py --dry            # the runs and their commands, nothing started
    python benchmarks/mixed_precision_resnet20.py --table-only     # tabulate the finished runs, start none

Steps. (1) `python -m ptqkit.tools.sensitivity` on the QDrop config, weights only, at 2, 3 and 4 bits, with the
Hessian measure: the first 256 calibration images observe ranges, the next 256 are held out (never a test image).
(2) Every run is one ptq_main.py process with `quant.mixed` pointing at that sensitivity file (or uniform bits),
so each run folder records the sensitivity file, the allocation, the size and the top-1, and naive, QDrop and
PD-Quant get the same allocation (checked in the table). The main allocation is the exact one (scipy's MILP) on
KL; the ablation solves the same budgets on top-1 drop and on the Hessian measure, and with the greedy rule on
KL. Finished runs (results.json) are reused and an interrupted run continues from its progress.pt, so the
benchmark can be stopped and started again.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import reconstruction_resnet20 as rr

REPO = rr.REPO
sys.path.insert(0, REPO)
CONFIGS = {m: f"configs/cifar10/resnet20_w4a4_{m}.yaml" for m in ("naive", "qdrop", "pdquant")}
CANDIDATES = [2, 3, 4]
A_BITS = 4
MAIN_MEASURE, MAIN_SOLVER = "kl", "exact"
ABLATIONS = [("top1", "exact"), ("hessian", "exact"), ("kl", "greedy")]
# Tiny settings: enough to pass through every step (the figures mean nothing)
SMOKE = ["data.calibration.num_images=64", "data.evaluation.limit=200"]
SMOKE_PDQUANT = ["algorithm.dc_steps=5"]
SMOKE_SENSITIVITY = ["--calib-images", "32", "--eval-images", "32", "--hessian-samples", "2"]


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str                  # naive | qdrop | pdquant
    seed: int
    w_bits: int | None = None    # uniform
    budget: float | None = None  # mixed: average weight bits
    measure: str = MAIN_MEASURE
    solver: str = MAIN_SOLVER

    @property
    def mixed(self) -> bool:
        return self.budget is not None

    @property
    def point(self) -> str:
        if not self.mixed:
            return f"W{self.w_bits}A{A_BITS}"
        return f"mixed {self.budget:g}" + ("" if self.allocation == (MAIN_MEASURE, MAIN_SOLVER)
                                           else f" ({self.measure}, {self.solver})")

    @property
    def allocation(self) -> tuple[str, str]:
        return self.measure, self.solver

    @property
    def name(self) -> str:
        if not self.mixed:
            return f"{self.method}_w{self.w_bits}a{A_BITS}_s{self.seed}"
        return f"{self.method}_mix{self.budget:g}_{self.measure}_{self.solver}_a{A_BITS}_s{self.seed}"


def cells_of(args) -> list[Cell]:
    cells = []
    for method, seeds in (("qdrop", args.seeds), ("naive", args.other_seeds), ("pdquant", args.other_seeds)):
        if method not in args.methods:
            continue
        cells += [Cell(method, s, w_bits=b) for b in args.uniform for s in seeds]
        cells += [Cell(method, s, budget=b) for b in args.budgets for s in seeds]
    if "qdrop" in args.methods:
        cells += [Cell("qdrop", s, budget=b, measure=m, solver=v) for m, v in args.ablations
                  for b in args.budgets for s in args.ablation_seeds]
    return cells


def overrides(cell: Cell, run_dir: str, sensitivity: str, args) -> list[str]:
    out = [f"quant.a.bits={A_BITS}", f"runtime.seed={cell.seed}", "runtime.save_model=false",
           # relative to the repository: committed files carry no path of the machine that made them
           f"runtime.output_dir={os.path.relpath(run_dir, REPO)}"]
    if cell.mixed:
        # quant.w.bits is what no allocation reaches: the 8-bit conventions fix the first and last layer
        out += [f"quant.w.bits={max(CANDIDATES)}", f"quant.mixed.budget.avg_w_bits={cell.budget}",
                f"quant.mixed.candidates={CANDIDATES}", f"quant.mixed.measure={cell.measure}",
                f"quant.mixed.solver={cell.solver}", f"quant.mixed.sensitivity={os.path.relpath(sensitivity, REPO)}"]
    else:
        out.append(f"quant.w.bits={cell.w_bits}")
    if cell.method == "naive":
        out.append("algorithm.calib_images=null")   # naive observes every calibration image, as the protocol's
    elif args.iters is not None:
        out.append(f"algorithm.iters={args.iters}")
    if args.smoke:
        out += SMOKE + (SMOKE_PDQUANT if cell.method == "pdquant" else [])
    return out + args.extra


def finished(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "results.json")
    return json.load(open(path)) if os.path.exists(path) else None


def run_cell(cell: Cell, out_root: str, sensitivity: str, args, threads: int) -> dict | None:
    """One ptq_main.py process, resumed from its progress.pt when an earlier start was stopped."""
    run_dir = os.path.join(out_root, cell.name)
    done = finished(run_dir)
    if done is not None:
        return done
    resume = os.path.exists(os.path.join(run_dir, "progress.pt"))
    if os.path.isdir(run_dir) and not resume:
        shutil.rmtree(run_dir)      # stopped before its first unit was saved: start again in the same folder
    env = dict(os.environ)
    sets = overrides(cell, run_dir, sensitivity, args)
    if threads:
        sets.append(f"runtime.threads={threads}")
        env["OMP_NUM_THREADS"] = str(threads)
    if resume:  # its config.yaml holds every override, and the allocation as quant.layers
        cmd = [sys.executable, "ptq_main.py", "--resume", run_dir, "--quiet"]
    else:
        cmd = [sys.executable, "ptq_main.py", "--config", CONFIGS[cell.method], "--quiet", "--set", *sets]
    if args.dry:
        print("$", " ".join(cmd))
        return None
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    with open(os.path.join(out_root, f"{cell.name}.log"), "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not os.path.exists(os.path.join(run_dir, "results.json")):
        print(f"  FAILED ({proc.returncode}) after {time.time() - start:.0f} s: {cell.name}.log", flush=True)
        return None
    return finished(run_dir)


def sensitivity_file(out_root: str, args) -> str | None:
    """The weight sensitivity at the candidates (measured once; the tool writes its files only when done)."""
    folder = os.path.join(out_root, "sensitivity")
    path = os.path.join(folder, "sensitivity.json")
    if os.path.exists(path):
        return path
    cmd = [sys.executable, "-m", "ptqkit.tools.sensitivity", "--config", CONFIGS["qdrop"], "--what", "w",
           "--bits", *map(str, CANDIDATES), "--hessian", "--out", os.path.relpath(folder, REPO), "--quiet",
           "--set", f"quant.a.bits={A_BITS}", *(["--set", *SMOKE] if args.smoke else []),
           *(SMOKE_SENSITIVITY if args.smoke else [])]
    print("$", " ".join(cmd), flush=True)
    if args.dry or args.table_only:
        return None
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    with open(os.path.join(out_root, "sensitivity.log"), "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not os.path.exists(path):
        print(f"  sensitivity FAILED ({proc.returncode}): {os.path.join(out_root, 'sensitivity.log')}")
        return None
    return path


# ------------------------------------------------------------------------------------------------ tables
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.2f} ± {std:.2f} ({len(values)})" if len(values) > 1 else f"{mean:.2f} (1)"


def points(done: list[tuple[Cell, dict]], method: str, allocation=None, mixed: bool | None = None) -> dict:
    """point label -> {cells, top1s, avg_w_bits, size} over seeds, for one method (and one allocation rule)."""
    out: dict[str, dict] = {}
    for cell, r in done:
        if cell.method != method or (mixed is not None and cell.mixed != mixed):
            continue
        if cell.mixed and allocation is not None and cell.allocation != allocation:
            continue
        p = out.setdefault(cell.point, {"cells": [], "top1": [], "size": r["size"], "results": []})
        p["cells"].append(cell)
        p["top1"].append(r["quant"]["top1"])
        p["results"].append(r)
    return out


def uniform_curve(uniform: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs = sorted(uniform.values(), key=lambda p: p["size"]["avg_w_bits"])
    return (np.array([p["size"]["avg_w_bits"] for p in xs]), np.array([_mean_std(p["top1"])[0] for p in xs]),
            np.array([_mean_std(p["top1"])[1] for p in xs]))


def against_uniform(mixed: dict, uniform: dict) -> list[str]:
    """Each mixed point against the uniform curve at its size (linear between the uniform points' means)."""
    lines = ["| point | avg w bits | weight bytes | GBOPs | top-1 % mean ± std (seeds) | uniform at that size | "
             "mixed − uniform | spread | above by more than the spread |", "|---|---|---|---|---|---|---|---|---|"]
    x, y, s = uniform_curve(uniform) if uniform else (np.array([]), np.array([]), np.array([]))
    for label, p in sorted({**uniform, **mixed}.items(), key=lambda kv: kv[1]["size"]["avg_w_bits"]):
        size = p["size"]
        cells = [f"| {label} | {size['avg_w_bits']:.4f} | {size['w_bytes']:,.0f} | {size['bops'] / 1e9:.3f} | "
                 f"{_fmt(p['top1'])} "]
        if label in mixed and len(x) > 1 and x[0] <= size["avg_w_bits"] <= x[-1]:
            at, spread_u = float(np.interp(size["avg_w_bits"], x, y)), float(np.interp(size["avg_w_bits"], x, s))
            mean, std = _mean_std(p["top1"])
            spread = max(std, spread_u)
            cells.append(f"| {at:.2f} | {mean - at:+.2f} | {spread:.2f} | "
                         f"{'yes' if mean - at > spread else 'no'} |")
        elif label in mixed:
            cells.append("| outside the uniform points | | | |")
        else:
            cells.append("| | | | |")
        lines.append("".join(cells))
    return lines


def same_allocation(done: list[tuple[Cell, dict]]) -> list[str]:
    """Whether every run of one (budget, measure, solver) got the same allocation, whatever its method or seed."""
    groups: dict[tuple, set] = {}
    for cell, r in done:
        if cell.mixed:
            alloc = tuple(sorted(r["mixed_precision"]["allocation"].items()))
            groups.setdefault((cell.budget, *cell.allocation), set()).add(alloc)
    return [f"mixed {b:g} ({m}, {v}): {'one allocation' if len(a) == 1 else f'{len(a)} DIFFERENT allocations'} "
            f"over its runs" for (b, m, v), a in sorted(groups.items())]


def allocation_table(done: list[tuple[Cell, dict]]) -> str:
    allocs: dict[str, dict] = {}
    fixed: dict[str, int] = {}
    for cell, r in sorted(done, key=lambda cr: (cr[0].allocation != (MAIN_MEASURE, MAIN_SOLVER), cr[0].budget or 0)):
        if cell.mixed:
            mp = r["mixed_precision"]
            allocs.setdefault(f"{cell.budget:g} {cell.measure} {cell.solver}", mp["allocation"])
            fixed.update(mp["fixed"])
    if not allocs:
        return ""
    layers = list(next(iter(done))[1]["size"]["layers"])
    head = "| layer | params | " + " | ".join(allocs) + " |"
    lines = [head, "|---|---|" + "---|" * len(allocs)]
    params = next(iter(done))[1]["size"]["layers"]
    for layer in layers:
        row = [str(a.get(layer, f"{fixed.get(layer, '–')}*")) for a in allocs.values()]
        lines.append(f"| {layer} | {params[layer]['params']:,} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n\\* fixed by the 8-bit conventions (first and last layer), counted in the budget."


def exact_vs_greedy(done) -> list[str]:
    exact = points(done, "qdrop", (MAIN_MEASURE, MAIN_SOLVER), mixed=True)
    lines = []
    for label, p in sorted(points(done, "qdrop", (MAIN_MEASURE, "greedy"), mixed=True).items()):
        main = exact.get(label.split(" (")[0])
        if main is None:
            continue
        seeds = {c.seed for c in p["cells"]}
        e = [t for c, t in zip(main["cells"], main["top1"]) if c.seed in seeds]
        g, e_mean = statistics.mean(p["top1"]), statistics.mean(e)
        obj_e = main["results"][0]["mixed_precision"]["objective"]
        obj_g = p["results"][0]["mixed_precision"]["objective"]
        lines.append(f"- {label.split(' (')[0]}: exact {e_mean:.2f} vs greedy {g:.2f} top-1 on seeds "
                     f"{sorted(seeds)} ({'exact at least as good' if e_mean >= g else 'GREEDY BETTER: see the notes'}"
                     f"); summed KL {obj_e:.4g} (exact) vs {obj_g:.4g} (greedy)")
    return lines


def plot(done, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {"qdrop": "tab:blue", "pdquant": "tab:green", "naive": "tab:gray"}
    for ax, methods in zip(axes, (["qdrop"], ["naive", "qdrop", "pdquant"])):
        for method in methods:
            colour = styles[method]
            for mixed, marker, line in ((False, "s", "--"), (True, "o", "-")):
                pts = points(done, method, (MAIN_MEASURE, MAIN_SOLVER), mixed=mixed)
                if not pts:
                    continue
                xs = sorted(pts.values(), key=lambda p: p["size"]["avg_w_bits"])
                ax.errorbar([p["size"]["avg_w_bits"] for p in xs], [_mean_std(p["top1"])[0] for p in xs],
                            yerr=[_mean_std(p["top1"])[1] for p in xs], fmt=marker + line, color=colour,
                            capsize=3, label=f"{method} {'mixed (KL, exact)' if mixed else 'uniform'}")
        if ax is axes[0]:
            for (measure, solver), marker in zip(ABLATIONS, ("^", "v", "D")):
                pts = points(done, "qdrop", (measure, solver), mixed=True)
                if pts:
                    ax.plot([p["size"]["avg_w_bits"] for p in pts.values()],
                            [_mean_std(p["top1"])[0] for p in pts.values()], marker, mfc="none",
                            color="tab:red", label=f"qdrop mixed ({measure}, {solver})")
            ax.set_title(f"QDrop, A{A_BITS}: uniform against mixed (mean ± std over seeds)")
        else:
            ax.set_title(f"the same allocations without (naive) and with reconstruction, A{A_BITS}")
        ax.set_xlabel("average weight bits (all conv/linear weights; first/last layer at 8)")
        ax.set_ylabel("top-1 % (CIFAR-10 test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine(done) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    threads = sorted({str(r["config"]["runtime"].get("threads") or "torch default") for _, r in done})
    devices = sorted({r.get("device", "?") for _, r in done})
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores; runs on {', '.join(devices) or '?'} with threads "
            f"{', '.join(threads) or '?'}")


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def report(done, cells, results, sensitivity: str | None, args, results_md: str) -> str:
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    sens = json.load(open(sensitivity)) if sensitivity and os.path.exists(sensitivity) else None
    text = [f"# ResNet-20 (CIFAR-10 assets): mixed precision under an average-weight-bits budget\n",
            f"Made by `{command}` on {time.strftime('%Y-%m-%d')} at commit {commit()}; {machine(done)}.",
            f"Activations at {A_BITS} bits; weights from {CANDIDATES}; first/last layer weights and the last "
            "layer's input at 8 bits, counted in the average (uniform W3 is therefore 3.020 bits). QDrop, PD-Quant "
            "and naive at configs/cifar10/resnet20_w4a4_{qdrop,pdquant,naive}.yaml (the ResNet-20 protocol: 1,024 "
            "calibration images, 2,000 iterations per unit, all 10,000 test images)"
            + (f"; smoke overrides {', '.join(SMOKE)}" if args.smoke else "")
            + (f"; algorithm.iters={args.iters}" if args.iters is not None else "") + "."]
    if sens is not None:
        start, end = sens["images"]["held_out"]
        text.append(f"Sensitivity: `{sens.get('command', '')}`, {end - start} held-out calibration images, "
                    f"{sens['seconds']['total']:.0f} s "
                    f"({os.path.relpath(sensitivity, os.path.dirname(results_md))}; its plot sensitivity.png beside "
                    "it). The allocation minimises the summed per-layer measure under the budget "
                    "(docs/MIXED_PRECISION.md); every run folder records it in results.json (mixed_precision).")
    q_uniform = points(done, "qdrop", mixed=False)
    q_mixed = points(done, "qdrop", (MAIN_MEASURE, MAIN_SOLVER), mixed=True)
    text.append("\n## QDrop: uniform against mixed (KL, exact)\n")
    text.append("Spread = the larger of the mixed point's standard deviation over seeds and the uniform curve's "
                "(interpolated like its mean).\n")
    text += against_uniform(q_mixed, q_uniform)
    w3, m3 = q_uniform.get(f"W3A{A_BITS}"), q_mixed.get("mixed 3")
    if w3 and m3:
        text.append(f"\nMixed at 3.0 bits ({m3['size']['avg_w_bits']:.4f}) {_fmt(m3['top1'])} against uniform W3 "
                    f"({w3['size']['avg_w_bits']:.4f}) {_fmt(w3['top1'])}: "
                    f"{'above' if statistics.mean(m3['top1']) > statistics.mean(w3['top1']) else 'NOT above'}.")
    for method, title in (("naive", "naive PTQ (no reconstruction)"), ("pdquant", "PD-Quant")):
        u, m = points(done, method, mixed=False), points(done, method, (MAIN_MEASURE, MAIN_SOLVER), mixed=True)
        if u or m:
            text.append(f"\n## The same allocations with {title}\n")
            text += against_uniform(m, u)
    text.append("\n## Ablation: the sensitivity measure and the solver (QDrop)\n")
    text.append("| allocation | point | avg w bits | top-1 % mean ± std (seeds) | summed measure |\n"
                "|---|---|---|---|---|")
    for rule in [(MAIN_MEASURE, MAIN_SOLVER)] + list(args.ablations):
        for label, p in sorted(points(done, "qdrop", rule, mixed=True).items(), key=lambda kv: kv[0]):
            text.append(f"| {rule[0]}, {rule[1]} | {label} | {p['size']['avg_w_bits']:.4f} | {_fmt(p['top1'])} | "
                        f"{p['results'][0]['mixed_precision']['objective']:.4g} |")
    text.append("")
    text += exact_vs_greedy(done) or ["- no greedy runs finished"]
    text.append("\nSame allocation across methods and seeds: " + "; ".join(same_allocation(done) or ["–"]) + ".")
    table = allocation_table(done)
    if table:
        text.append(f"\n## Allocations (weight bits per layer)\n\n{table}")
    text.append(f"\n## Runs\n\n{rr.ROW_HEADER}")
    text += [rr.row(c.method, c.point, c.seed, r) for c, r in done]
    missing = [c.name for c, r in zip(cells, results) if r is None]
    if missing:
        text.append("\nNot finished: " + ", ".join(missing) + ".")
    return "\n".join(text) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["qdrop", "naive", "pdquant"])
    parser.add_argument("--uniform", nargs="+", type=int, default=CANDIDATES, help="uniform weight bit-widths")
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5], help="average weight bits")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1005, 1006, 1007], help="QDrop's seeds")
    parser.add_argument("--other-seeds", nargs="+", type=int, default=[1005], help="naive and PD-Quant's seeds")
    parser.add_argument("--ablation-seeds", nargs="+", type=int, default=[1005])
    parser.add_argument("--no-ablations", dest="ablations", action="store_const", const=[], default=ABLATIONS)
    parser.add_argument("--iters", type=int, help="iterations per unit of QDrop and PD-Quant (default: the configs')")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny: 3 iterations, 64 calibration images, 200 test images, 5 DC steps, one seed, "
                             "budget 3.0 against uniform W2 and W3; into benchmarks/runs/mixed_precision_smoke")
    parser.add_argument("--dry", action="store_true", help="print the commands of the runs not yet finished")
    parser.add_argument("--table-only", action="store_true", help="tabulate the finished runs, start none")
    parser.add_argument("--out", help="run folders (default benchmarks/runs/mixed_precision_resnet20)")
    parser.add_argument("--results", help="Markdown results (default benchmarks/results/mixed_precision_resnet20.md; "
                                          "smoke: inside --out); the plot is written beside it")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (each single-threaded if > 1)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    args = parser.parse_args()
    if args.smoke:
        args.iters = 3 if args.iters is None else args.iters
        args.seeds, args.other_seeds, args.ablation_seeds = args.seeds[:1], args.other_seeds[:1], args.seeds[:1]
        args.budgets, args.uniform = [3.0], [2, 3]
    out_root = os.path.join(REPO, args.out or ("benchmarks/runs/mixed_precision_smoke" if args.smoke
                                               else "benchmarks/runs/mixed_precision_resnet20"))
    results_md = os.path.join(REPO, args.results or (os.path.join(out_root, "results.md") if args.smoke
                                                     else "benchmarks/results/mixed_precision_resnet20.md"))
    if not args.dry:
        os.makedirs(out_root, exist_ok=True)
    cells = cells_of(args)
    sensitivity = sensitivity_file(out_root, args)
    threads = 1 if args.jobs > 1 else 0
    if args.table_only or (sensitivity is None and not args.dry):
        results = [finished(os.path.join(out_root, c.name)) for c in cells]
    else:
        sens_path = sensitivity or os.path.join(out_root, "sensitivity", "sensitivity.json")
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda c: run_cell(c, out_root, sens_path, args, threads), cells))
    if args.dry:
        print(f"{len(cells)} runs, {sum(r is None for r in results)} not finished")
        return 0
    done = [(c, r) for c, r in zip(cells, results) if r is not None]
    text = report(done, cells, results, sensitivity, args, results_md)
    if done:
        figure = plot(done, os.path.splitext(results_md)[0] + ".png")
        text += f"\nPlot: {os.path.relpath(figure, os.path.dirname(results_md))}\n"
    rr.write_results(results_md, text)
    print(text)
    failed = 0 if args.table_only else len(cells) - len(done)
    if failed:
        print(f"{failed} run(s) not finished: see the .log files in {out_root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
