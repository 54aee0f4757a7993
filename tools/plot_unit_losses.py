"""Final reconstruction loss per unit index for several runs: the oscillation across units, with and without
MRECG's merging, in one PNG.

    python -m ptqkit.tools.plot_unit_losses RUN_DIR... --out unit_losses.png [--phase NAME]

The x axis is the index of the base (unmerged) unit. A merged group is reconstructed against the output of its last
unit, so its loss is drawn there, with a horizontal bar over the units it covers. ptqkit.tools.compare's units_final.png
matches units by name, which cannot place a group such as "layer1.2+layer2.0" among the base units.
Runs are read as ptqkit.tools.compare reads them (folders, results.json files, globs, folders of run folders).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ptqkit.errors import UserError
from ptqkit.tools import cli
from ptqkit.tools.compare import Run, find_runs, load_run, pyplot


def unit_points(run: Run, phase: str | None = None) -> tuple[list[str], list[tuple[list[int], float]]]:
    """(base unit names, [(member indices, final loss)]) of one run's last phase (or `phase`)."""
    records = run.units or []
    phases = list(dict.fromkeys(r.get("phase") for r in records))
    chosen = phase if phase is not None else (phases[-1] if phases else None)
    if phase is not None and phase not in phases:
        raise UserError(f"run '{run.path}': no phase '{phase}' (its phases: {', '.join(map(str, phases))})")
    records = [r for r in records if r.get("phase") == chosen]
    points, names = [], []
    for k, r in enumerate(records):
        members = r.get("members") or [len(names)]
        parts = r.get("name", f"unit {k}").split("+")
        names += parts if len(parts) == len(members) else [f"unit {i}" for i in members]
        points.append((list(members), float(r["final_rec_loss"])))
    with open(os.path.join(run.path, "results.json")) as f:
        base = json.load(f).get("algorithm_results", {}).get("mrecg", {}).get("base_units")
    return (base or names), points


def _label(run: Run, points) -> str:
    merged = [f"{m[0]}-{m[-1]}" for m, _ in points if len(m) > 1]
    return f"{run.name} ({run.algorithm} {run.bits}" + (f"; merged {', '.join(merged)})" if merged else ")")


TITLE = "Final error of each unit's output against the FP network's"


def plot(run_paths, out: str, phase: str | None = None, title: str = TITLE) -> str:
    runs = [load_run(p) for p in find_runs(run_paths)]
    runs = [r for r in runs if r.units]
    if not runs:
        raise UserError("none of the runs recorded per-unit reconstruction losses (algorithm_results.units)")
    series = [(run, *unit_points(run, phase)) for run in runs]
    names = series[0][1]
    for run, other, _ in series[1:]:
        if len(other) != len(names):
            raise UserError(f"run '{run.path}' has {len(other)} base units, '{series[0][0].path}' has {len(names)}: "
                            "not the same model partition")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.5 * len(names) + 3.0), 5.0))
    colors = plt.get_cmap("tab10")
    positive = all(loss > 0 for _, _, pts in series for _, loss in pts)
    for j, (run, _, points) in enumerate(series):
        color = colors(j % 10)
        xs = [m[-1] for m, _ in points]
        ys = [loss for _, loss in points]
        ax.plot(xs, ys, marker="o", linewidth=1.3, color=color, label=_label(run, points))
        for members, loss in points:
            if len(members) > 1:
                ax.hlines(loss, members[0] - 0.3, members[-1] + 0.3, colors=[color], linewidth=4, alpha=0.45)
    ax.set_yscale("log" if positive else "linear")
    ax.set_xticks(range(len(names)), [f"{i} {n}" for i, n in enumerate(names)], rotation=60, ha="right",
                  fontsize=7)
    merged = any(len(m) > 1 for _, _, pts in series for m, _ in pts)
    ax.set_xlabel("unit index" + (" (a merged group is drawn at its last unit, a bar spans its units)" if merged
                                  else ""))
    ax.set_ylabel("final reconstruction loss" + (" (log scale)" if positive else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ptqkit.tools.plot_unit_losses",
                                     description="Final reconstruction loss per unit index for several runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--phase", help="phase to plot for multi-phase methods (default: the last one)")
    parser.add_argument("--title", default=TITLE)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print("wrote " + plot(args.runs, args.out, args.phase, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
