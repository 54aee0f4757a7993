#!/usr/bin/env python
"""MRECG benchmark: CIFAR-10 ResNet-20 from the assets (docs/ASSETS.md), QDrop beside MRECG on QDrop (automatic
grouping over three seeds, the hand-written scheme on the first) at W2A4 and W2A2, plus the per-unit final
reconstruction loss of one seed with and without merging (the oscillation plot).

    python benchmarks/mrecg_resnet20.py                  # the protocol (hours of CPU)
    python benchmarks/mrecg_resnet20.py --smoke          # 20 iterations, 128 calibration images, 500 test images

Runs go through reconstruction_resnet20.run_one (each its own ptq_main.py process; a run folder holding a
results.json is reused), into the same folder as that benchmark by default, so its QDrop runs are not repeated.
Protocol: that benchmark's (1,024 calibration images drawn with seed 1005, batch 32, 2,000 iterations per unit,
all 10,000 test images), runtime.seed 1005, 1006, 1007. Results: the per-run rows, ptqkit.tools.compare's table (mean ±
std over seeds) and ptqkit.tools.plot_unit_losses' PNG per bit-width.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import reconstruction_resnet20 as rr

REPO = rr.REPO
sys.path.insert(0, REPO)
rr.CONFIGS.setdefault("mrecg", "configs/cifar10/resnet20_w4a4_mrecg.yaml")
rr.CONFIGS.setdefault("mrecg_scheme", "configs/cifar10/resnet20_w4a4_mrecg_scheme.yaml")
# iterations scaled to the group's size, with the automatic (loss) and the paper's (params) criterion
rr.CONFIGS.setdefault("mrecg_scaled", "configs/cifar10/resnet20_w4a4_mrecg_scaled.yaml")
rr.CONFIGS.setdefault("mrecg_paper", "configs/cifar10/resnet20_w4a4_mrecg_paper.yaml")
SMOKE = ["algorithm.iters=20", "data.calibration.num_images=128", "data.evaluation.limit=500"]


def groups_line(method: str, bits: str, r: dict) -> str | None:
    plan = r.get("algorithm_results", {}).get("mrecg")
    if not plan:
        return None
    merged = ["+".join(plan["base_units"][i] for i in g) for g in plan["groups"] if len(g) > 1]
    return f"- {method} {bits} ({plan['source']}): merged {', '.join(merged) or 'nothing'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["qdrop", "mrecg", "mrecg_scheme"])
    parser.add_argument("--bits", nargs="+", default=["W2A4", "W2A2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1005, 1006, 1007])
    parser.add_argument("--scheme-seeds", nargs="+", type=int,
                        help="seeds of the hand-written scheme (default: the first seed only; it is recorded beside "
                             "the automatic grouping, whose three seeds are the comparison with qdrop)")
    parser.add_argument("--scheme-bits", nargs="+", help="bit-widths of the hand-written scheme (default: --bits)")
    parser.add_argument("--smoke", action="store_true", help="20 iterations, 128 calibration images, 500 test "
                                                             "images, the first seed only, single-threaded")
    parser.add_argument("--out", help="run folders (default benchmarks/runs/resnet20, smoke: .../mrecg_smoke)")
    parser.add_argument("--results", help="Markdown summary (default benchmarks/results/mrecg_resnet20.md; "
                                          "smoke: inside --out)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (each single-threaded if > 1)")
    parser.add_argument("--model", default="resnet20", choices=sorted(rr.DEPTH_CHECKPOINTS),
                        help="the CIFAR-10 ResNet of the assets (the protocol, unchanged, on a deeper one)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    parser.add_argument("--table-only", action="store_true",
                        help="tabulate and plot the finished runs, start none (unfinished cells are left out)")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.smoke else args.seeds
    extra = (SMOKE if args.smoke else []) + rr.model_overrides(args.model) + args.extra
    out_root = os.path.join(REPO, args.out or ("benchmarks/runs/mrecg_smoke" if args.smoke
                                               else "benchmarks/runs/resnet20"))
    results_md = os.path.join(REPO, args.results or (os.path.join(out_root, "results.md") if args.smoke
                                                     else "benchmarks/results/mrecg_resnet20.md"))
    os.makedirs(out_root, exist_ok=True)
    threads = 1 if args.jobs > 1 or args.smoke else 0
    scheme_seeds = seeds[:1] if args.smoke else (args.scheme_seeds or seeds[:1])
    scheme_bits = args.scheme_bits or args.bits
    cells = [(m, b, s) for b in args.bits for m in args.methods
             for s in (scheme_seeds if m == "mrecg_scheme" else seeds) if m != "mrecg_scheme" or b in scheme_bits]
    if args.table_only:
        results = [rr.finished(*c, out_root) for c in cells]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda c: rr.run_one(*c, out_root, extra, threads), cells))
    done = [(c, r) for c, r in zip(cells, results) if r is not None]
    run_dir = {c: os.path.join(out_root, f"{c[0]}_{c[1].lower()}_s{c[2]}") for c, _ in done}

    from ptqkit.tools.compare import compare
    from ptqkit.tools.plot_unit_losses import plot
    report_dir = out_root if args.smoke else os.path.join(os.path.dirname(results_md),
                                                              os.path.splitext(os.path.basename(results_md))[0])
    aggregated = ""
    if done:
        compare([run_dir[c] for c, _ in done], report_dir)
        with open(os.path.join(report_dir, "table.md")) as f:
            aggregated = f.read()
    plots = []
    for bits in args.bits:
        loss_runs = [run_dir[c] for c, _ in done if c[1] == bits and c[2] == seeds[0]]
        if len(loss_runs) > 1:
            plots.append(plot(loss_runs, os.path.join(report_dir, f"unit_losses_{bits.lower()}.png"),
                              title="Final reconstruction loss per unit: oscillation with and without merging"))

    groups = list(dict.fromkeys(g for (m, b, _), r in done if (g := groups_line(m, b, r))))
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    text = (f"# ResNet-{args.model[6:]} (CIFAR-10 assets): MRECG beside QDrop\n\nMade by `{command}` on "
            f"{time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores)"
            + (f"; smoke overrides: {', '.join(SMOKE)}" if args.smoke else "") + ".\n\n"
            f"## Runs\n\n{rr.ROW_HEADER}\n" + "\n".join(rr.row(*c, r) for c, r in done) + "\n\n"
            f"## Mean ± std over seeds (ptqkit.tools.compare)\n\n{aggregated}\n"
            f"## Groups\n\n" + "\n".join(groups) + "\n\n"
            f"## Final reconstruction loss per unit, seed {seeds[0]} (ptqkit.tools.plot_unit_losses)\n\n"
            + "\n".join(f"- {os.path.relpath(p, os.path.dirname(results_md))}" for p in plots) + "\n")
    rr.write_results(results_md, text)
    print(text)
    failed = len(cells) - len(done)
    if failed:
        print(f"{failed} run(s) failed: see the .log files in {out_root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
