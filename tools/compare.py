"""Comparison table and plots over run folders.

    python -m ptqkit.tools.compare RUN_DIR_OR_GLOB... --out DIR [--allow-mixed] [--loss-runs RUN_DIR...]

Reads each run's results.json and writes, into DIR:
- table.md, table.csv: rows model x bits ("cifar_resnet20 W2A4"), one column per algorithm, each cell the quantized
  top-1 (mean ± sample std and the count when several runs fall in one cell), the FP32 top-1 beside each row;
- accuracy.png: grouped bars per bit-width and algorithm, the FP32 top-1 as a reference mark;
- losses_<run>.png for each --loss-runs run that recorded per-unit reconstruction losses, and units_final.png
  comparing the final loss of each unit across those runs.

An argument may be a run folder, its results.json, a glob, or a folder of run folders (a sweep's --out).

Cells: runs that differ only in their seed (runtime.seed) and in batch sizes / workers are repeats of one cell and
are aggregated. Runs of one algorithm that differ in anything else inside a row (its
hyper-parameters, an observer) get separate columns, labelled with what differs, e.g. "qdrop (prob=0.5)".

Comparability: every run must share the setting (model, checkpoint, data, calibration draw: size and seed,
evaluation subset, and hence FP32 top-1 and image count); otherwise the runs are refused, or with --allow-mixed tabulated
with each row marked by its setting ([S1], [S2], ...) and the differences listed under the table.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field

import ptqkit.algorithms  # noqa: F401  (registers the methods whose defaults _flat_config reads)
from ptqkit.algorithms.registry import get_algorithm
from ptqkit.config import SECTIONS, Config, QuantConfig, RuntimeConfig
from ptqkit.errors import UserError
from ptqkit.tools import cli

log = logging.getLogger("ptq.compare")


class MixedRunsError(UserError):
    """Runs measured on different settings (model, data, evaluation images) cannot share one table."""


# What defines the measurement a number belongs to. Checkpoint and data root are paths: compared resolved, so that
# a relative and an absolute spelling of the same file agree.
SETTING_KEYS = ("model.name", "model.checkpoint", "model.kwargs", "data.root", "data.preset",
                "data.calibration.split", "data.calibration.num_images", "data.calibration.per_class",
                "data.calibration.seed", "data.evaluation.split", "data.evaluation.limit")
_PATH_KEYS = {"model.checkpoint", "data.root"}
# runtime.seed makes repeats (the calibration draw's seed is part of the setting: other images, another measurement);
# batch sizes, workers and runtime options do not change what is measured. algorithm.retain_cpu_heap is a runtime
# option too, under the name some recorded results files give it.
_REPEAT_KEYS = ("data.calibration.batch_size", "data.evaluation.batch_size", "data.evaluation.workers",
                "algorithm.retain_cpu_heap")
_REPEAT_PREFIXES = ("runtime.",)
_ROW_KEYS = ("quant.w.bits", "quant.a.bits")


# ---------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    path: str
    model: str
    bits: str
    algorithm: str
    fp32_top1: float
    quant_top1: float
    images: int
    config: dict
    units: list | None = None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def _get(tree: dict, dotted: str, default=None):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def load_run(path: str) -> Run:
    """One run from its folder (or its results.json)."""
    results_path = path if path.endswith(".json") else os.path.join(path, "results.json")
    folder = os.path.dirname(results_path) or "."
    try:
        with open(results_path) as f:
            res = json.load(f)
    except FileNotFoundError:
        raise UserError(f"run '{folder}': no results.json (did the run finish?)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"run '{folder}': results.json is not valid JSON ({exc})") from None
    missing = [k for k in ("model", "bits", "algorithm", "fp32.top1", "quant.top1", "quant.images", "config")
               if _get(res, k) is None]
    if missing:
        raise UserError(f"run '{folder}': results.json lacks '{missing[0]}'")
    units = _get(res, "algorithm_results.units")
    return Run(path=folder, model=res["model"], bits=res["bits"], algorithm=res["algorithm"],
               fp32_top1=float(res["fp32"]["top1"]), quant_top1=float(res["quant"]["top1"]),
               images=int(res.get("evaluation_images", res["quant"]["images"])), config=res["config"],
               units=units if isinstance(units, list) and units else None)


def find_runs(args) -> list[str]:
    """Run folders named by the arguments: folders, results.json files, globs, or folders of run folders."""
    found: list[str] = []
    for arg in args:
        matches = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not matches:
            raise UserError(f"'{arg}': matches nothing")
        for path in matches:
            if os.path.isfile(path) and path.endswith(".json"):
                found.append(os.path.dirname(path) or ".")
            elif os.path.isfile(os.path.join(path, "results.json")):
                found.append(path)
            elif os.path.isdir(path):
                inner = sorted(os.path.join(path, d) for d in os.listdir(path)
                               if os.path.isfile(os.path.join(path, d, "results.json")))
                if not inner and not glob.has_magic(arg):
                    raise UserError(f"'{path}': neither a run folder nor a folder of run folders (no results.json)")
                found += inner
            elif not glob.has_magic(arg):
                raise UserError(f"'{path}': not found")
    unique, seen = [], set()
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    if not unique:
        raise UserError("no run folders with a results.json among: " + " ".join(args))
    return unique


# ------------------------------------------------------------------------------------------------- setting
def _flatten(tree, prefix="") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def setting(run: Run) -> dict:
    """The fields two runs must share to sit in one table."""
    out = {}
    for key in SETTING_KEYS:
        value = _get(run.config, key)
        if key in _PATH_KEYS and isinstance(value, str):
            value = os.path.normpath(os.path.abspath(value))
        out[key] = value
    data = run.config.get("data", {})
    if _get(data, "calibration.split") == _get(data, "evaluation.split"):
        # One folder split in two: the share kept for calibration decides which images are evaluated.
        out["data.calibration_fraction"] = data.get("calibration_fraction")
    out["fp32.top1"] = round(run.fp32_top1, 6)
    out["evaluation images"] = run.images
    return out


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _differences(a: dict, b: dict) -> list[str]:
    keys = list(a) + [k for k in b if k not in a]
    return [k for k in keys if a.get(k) != b.get(k)]


def check_comparable(runs: list[Run], allow_mixed: bool) -> tuple[list[dict], list[int]]:
    """Distinct settings (in order of appearance) and each run's index into them; refuses mixing unless allowed."""
    settings: list[dict] = []
    index = []
    for run in runs:
        s = setting(run)
        if s not in settings:
            settings.append(s)
        index.append(settings.index(s))
    if len(settings) > 1 and not allow_mixed:
        other, i = next((r, i) for r, i in zip(runs, index) if i != 0)
        base, theirs = settings[0], settings[i]
        detail = ", ".join(f"{k} ({_show(theirs.get(k))} vs {_show(base.get(k))})" for k in _differences(base, theirs))
        raise MixedRunsError(f"runs are not comparable: '{other.path}' differs from '{runs[0].path}' in {detail}; "
                             "pass --allow-mixed to tabulate them anyway (rows marked by setting)")
    return settings, index


# --------------------------------------------------------------------------------------------------- table
@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1); None for a single run."""
        if len(self.values) < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    def text(self) -> str:
        if self.std is None:
            return f"{self.mean:.2f}"
        return f"{self.mean:.2f} ± {self.std:.2f} (n={self.n})"


@dataclass(frozen=True)
class Row:
    model: str
    bits: str
    setting: int  # index into Table.settings

    def label(self, marked: bool) -> str:
        return f"{self.model} {self.bits}" + (f" [S{self.setting + 1}]" if marked else "")


@dataclass
class Table:
    rows: list[Row]
    columns: list[str]
    cells: dict            # (Row, column) -> Cell
    fp32: dict             # Row -> FP32 top-1
    images: dict           # Row -> evaluation image count
    settings: list[dict]
    runs: list[Run]

    @property
    def mixed(self) -> bool:
        return len(self.settings) > 1


def _bits_order(bits: str):
    m = re.fullmatch(r"W(\d+)A(\d+)", bits)
    return (-int(m.group(1)), -int(m.group(2)), bits) if m else (0, 0, bits)


def _variant_keys(runs: list[Run], row_of: dict) -> dict[str, list[str]]:
    """Per algorithm: the config keys that vary among its runs inside one row (besides seeds and batch sizes)."""
    def relevant(key: str) -> bool:
        return not (key in SETTING_KEYS or key in _REPEAT_KEYS or key in _ROW_KEYS or key == "algorithm.name"
                    or key.startswith(_REPEAT_PREFIXES) or key.startswith(tuple(k + "." for k in SETTING_KEYS))
                    or key == "data.calibration_fraction")
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run.algorithm, row_of[run.path]), []).append(_flat_config(run))
    keys: dict[str, list[str]] = {}
    for (algorithm, _), flats in groups.items():
        found = keys.setdefault(algorithm, [])
        all_keys = sorted({k for f in flats for k in f if relevant(k)})
        for k in all_keys:
            if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1 and k not in found:
                found.append(k)
    return keys


def _flat_config(run: Run) -> dict:
    """The run's config, flat, with the algorithm keys it lacks at their current defaults: a key added to the
    schema after the run was made did not exist for it, and it ran as the key's default does."""
    flat = _flatten(run.config)
    try:
        schemas = [("algorithm.", get_algorithm(run.algorithm).Config), ("", Config)]
    except UserError:
        return flat
    for prefix, schema in schemas:
        for f in dataclasses.fields(schema):
            key = prefix + f.name
            if not f.init or key in flat or dataclasses.is_dataclass(f.type) or f.name in SECTIONS:
                continue
            if f.default is not dataclasses.MISSING:
                flat[key] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                flat[key] = f.default_factory()
    for section, schema in (("quant", QuantConfig), ("runtime", RuntimeConfig)):   # every key has a default
        for key, value in _flatten({section: dataclasses.asdict(schema())}).items():
            flat.setdefault(key, value)
    # A run made before the key existed learned with `pass`, whatever its method (the key's null default is
    # resolved at validation to the method's own and recorded since).
    if flat.get("quant.a.bound_grad") is None:
        flat["quant.a.bound_grad"] = "pass"
    return flat


def _column_label(run: Run, keys: list[str]) -> str:
    if not keys:
        return run.algorithm
    flat = _flat_config(run)
    parts = [f"{k[len('algorithm.'):] if k.startswith('algorithm.') else k}={_show(flat.get(k))}" for k in keys]
    return f"{run.algorithm} ({', '.join(parts)})"


def build_table(runs: list[Run], allow_mixed: bool = False) -> Table:
    if not runs:
        raise UserError("no runs to compare")
    settings, index = check_comparable(runs, allow_mixed)
    row_of = {run.path: Row(run.model, run.bits, i) for run, i in zip(runs, index)}
    variant_keys = _variant_keys(runs, row_of)
    cells: dict = {}
    fp32, images, columns = {}, {}, []
    for run in runs:
        row = row_of[run.path]
        column = _column_label(run, variant_keys.get(run.algorithm, []))
        if column not in columns:
            columns.append(column)
        cell = cells.setdefault((row, column), Cell())
        cell.values.append(run.quant_top1)
        cell.runs.append(run.path)
        fp32[row], images[row] = run.fp32_top1, run.images
    model_order = list(dict.fromkeys(r.model for r in runs))
    rows = sorted(set(row_of.values()), key=lambda r: (model_order.index(r.model), r.setting, _bits_order(r.bits)))
    columns.sort(key=lambda c: (not c.startswith("naive"), c))
    return Table(rows=rows, columns=columns, cells=cells, fp32=fp32, images=images, settings=settings, runs=runs)


def setting_notes(table: Table) -> list[str]:
    """One line per setting after the first: how it differs from the first."""
    notes = []
    base = table.settings[0]
    for i, s in enumerate(table.settings[1:], start=2):
        diffs = _differences(base, s)
        notes.append(f"S{i} differs from S1 in " +
                     ", ".join(f"{k} = {_show(s.get(k))} (S1: {_show(base.get(k))})" for k in diffs))
    return notes


def _shown(path: str) -> str:
    """A run folder as the table names it: relative to the working directory when inside it, so that a committed
    table does not carry the machine's absolute paths."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def to_markdown(table: Table) -> str:
    head = ["model × bits", "FP32 top-1"] + table.columns
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in table.rows:
        cells = [table.cells[(row, c)].text() if (row, c) in table.cells else "–" for c in table.columns]
        lines.append("| " + " | ".join([row.label(table.mixed), f"{table.fp32[row]:.2f}"] + cells) + " |")
    counts = sorted(set(table.images.values()))
    lines += ["", f"Top-1 accuracy (%) on {', '.join(map(str, counts))} evaluation images; FP32 measured on the same "
              "images in the same run. A cell with several runs (seeds) shows mean ± sample std (n runs)."]
    if table.mixed:
        lines += ["", "**Mixed settings** (tabulated with --allow-mixed; rows are not directly comparable):", ""]
        lines += [f"- {note}" for note in setting_notes(table)]
    lines += ["", "Runs:", ""] + [f"- `{_shown(run.path)}`: {run.model} {run.bits} {run.algorithm}, top-1 "
                                  f"{run.quant_top1:.2f}" for run in table.runs]
    return "\n".join(lines) + "\n"


def write_csv(table: Table, path: str) -> None:
    header = ["model", "bits", "setting", "evaluation_images", "fp32_top1"]
    for c in table.columns:
        header += [f"{c} top1", f"{c} std", f"{c} n"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in table.rows:
            line = [row.model, row.bits, f"S{row.setting + 1}", table.images[row], f"{table.fp32[row]:.4f}"]
            for c in table.columns:
                cell = table.cells.get((row, c))
                if cell is None:
                    line += ["", "", 0]
                else:
                    line += [f"{cell.mean:.4f}", "" if cell.std is None else f"{cell.std:.4f}", cell.n]
            writer.writerow(line)


# --------------------------------------------------------------------------------------------------- plots
def pyplot():
    import matplotlib   # heavy (seconds): only when a plot is drawn
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(table: Table, path: str) -> None:
    plt = pyplot()
    n_rows, n_cols = len(table.rows), len(table.columns)
    width = 0.8 / max(n_cols, 1)
    fig, ax = plt.subplots(figsize=(max(7.5, 3.5 + n_rows * (0.6 + 0.45 * n_cols)), 5.0))
    colors = plt.get_cmap("tab10")
    for j, column in enumerate(table.columns):
        xs, means, errs = [], [], []
        for i, row in enumerate(table.rows):
            cell = table.cells.get((row, column))
            if cell is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            means.append(cell.mean)
            errs.append(cell.std or 0.0)
        bars = ax.bar(xs, means, width * 0.92, yerr=errs if any(errs) else None, capsize=3, label=column,
                      color=colors(j % 10))
        for text in ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=7, padding=2, zorder=4):
            # a bar close to FP32 puts its label on the dashed line: keep it readable
            text.set_bbox(dict(facecolor="white", edgecolor="none", pad=0.6, alpha=0.85))
    fp32_values = sorted({round(table.fp32[r], 2) for r in table.rows})
    fp32_label = f"FP32 ({fp32_values[0]:.2f} %)" if len(fp32_values) == 1 else "FP32 (per row)"
    for i, row in enumerate(table.rows):
        ax.hlines(table.fp32[row], i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1.2,
                  label=fp32_label if i == 0 else None)
    models = list(dict.fromkeys(r.model for r in table.rows))
    one_model = len(models) == 1
    ticks = [(f"{row.bits} [S{row.setting + 1}]" if table.mixed else row.bits) if one_model
             else row.label(table.mixed).replace(" ", "\n", 1) for row in table.rows]
    ax.set_xticks(range(n_rows), ticks)
    ax.set_xlim(-0.6, n_rows - 0.4)
    top = max([table.fp32[r] for r in table.rows] + [c.mean + (c.std or 0) for c in table.cells.values()])
    ax.set_ylim(0, min(100.0, top * 1.1 + 1))
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xlabel("bit-width (W: weights, A: activations)" if one_model else "model and bit-width")
    counts = ", ".join(map(str, sorted(set(table.images.values()))))
    ax.set_title(f"Quantized top-1 by bit-width and algorithm\n{', '.join(models)}, {counts} evaluation images"
                 + (", mean ± std over seeds" if any(c.n > 1 for c in table.cells.values()) else ""), fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _unit_history(unit: dict, key: str) -> tuple[list, list]:
    hist = unit.get("history") or {}
    iters, values = hist.get("iter") or [], hist.get(key) or []
    n = min(len(iters), len(values))
    return list(iters[:n]), list(values[:n])


def plot_unit_losses(run: Run, path: str) -> bool:
    """Per-unit loss curves of one run; False (nothing written) when no unit recorded a history."""
    units = run.units or []
    curves = [(u.get("name", f"unit {k}"), _unit_history(u, "rec"), _unit_history(u, "round"))
              for k, u in enumerate(units)]
    curves = [c for c in curves if c[1][0]]
    if not curves:
        return False
    has_round = any(any(v for v in c[2][1]) for c in curves)
    plt = pyplot()
    n_axes = 2 if has_round else 1
    fig, axes = plt.subplots(1, n_axes, figsize=(6.5 * n_axes + 2.5, 4.8), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for k, (name, (it, rec), (it_r, rnd)) in enumerate(curves):
        color = cmap(k % 20)
        axes[0][0].plot(it, rec, label=name, color=color, linewidth=1.2)
        if has_round and it_r:
            axes[0][1].plot(it_r, rnd, label=name, color=color, linewidth=1.2)
    positive = all(v > 0 for c in curves for v in c[1][1])
    axes[0][0].set_yscale("log" if positive else "linear")
    axes[0][0].set_title("reconstruction loss per unit")
    axes[0][0].set_ylabel("reconstruction loss" + (" (log scale)" if positive else ""))
    if has_round:
        axes[0][1].set_title("rounding regulariser per unit")
        axes[0][1].set_ylabel("rounding loss")
    for ax in axes[0]:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, ncol=1 if len(curves) <= 20 else 2)
    fig.suptitle(f"{run.name}: {run.model} {run.bits} {run.algorithm} (top-1 {run.quant_top1:.2f} %)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def plot_final_unit_losses(runs: list[Run], path: str) -> bool:
    """The final reconstruction loss of each unit, one line per run (units in the order of the first run)."""
    runs = [r for r in runs if r.units]
    if not runs:
        return False
    names = list(dict.fromkeys(u.get("name", f"unit {k}") for r in runs for k, u in enumerate(r.units)))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.5, 0.45 * len(names) + 2.5), 4.8))
    positive = True
    for run in runs:
        by_name = {u.get("name", f"unit {k}"): u.get("final_rec_loss") for k, u in enumerate(run.units)}
        ys = [by_name.get(n) for n in names]
        xs = [i for i, y in enumerate(ys) if y is not None]
        ys = [float(y) for y in ys if y is not None]
        positive &= all(y > 0 for y in ys)
        ax.plot(xs, ys, marker="o", linewidth=1.2, label=f"{run.name} ({run.algorithm} {run.bits})")
    ax.set_yscale("log" if positive else "linear")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("unit")
    ax.set_ylabel("final reconstruction loss" + (" (log scale)" if positive else ""))
    ax.set_title("Final reconstruction loss per unit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "run"


# ----------------------------------------------------------------------------------------------------- api
def compare(paths, out_dir: str, *, allow_mixed: bool = False, loss_runs=()) -> tuple[Table, list[str]]:
    """Build the table of the runs under `paths`, write table.md / table.csv / plots into `out_dir`."""
    runs = [load_run(p) for p in find_runs(paths)]
    table = build_table(runs, allow_mixed)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(to_markdown(table))
    write_csv(table, os.path.join(out_dir, "table.csv"))
    plot_accuracy(table, os.path.join(out_dir, "accuracy.png"))
    written += [os.path.join(out_dir, n) for n in ("table.md", "table.csv", "accuracy.png")]
    loss = [load_run(p) for p in find_runs(loss_runs)] if loss_runs else []
    used = set()
    for run in loss:
        name = _safe(run.name)
        while name in used:
            name += "+"
        used.add(name)
        target = os.path.join(out_dir, f"losses_{name}.png")
        if plot_unit_losses(run, target):
            written.append(target)
        else:
            log.warning("run '%s' recorded no per-unit losses (naive runs have none): no loss plot", run.path)
    if loss and plot_final_unit_losses(loss, os.path.join(out_dir, "units_final.png")):
        written.append(os.path.join(out_dir, "units_final.png"))
    return table, written


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ptqkit.tools.compare",
                                     description="Comparison table (Markdown, CSV) and plots of PTQ runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB",
                        help="run folders, results.json files, globs, or folders of run folders")
    parser.add_argument("--out", required=True, help="folder for table.md, table.csv and the PNG plots")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="tabulate runs of different settings (model, data, evaluation images), marked")
    parser.add_argument("--loss-runs", nargs="+", default=[], metavar="RUN_DIR",
                        help="runs whose per-unit reconstruction losses are plotted")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    table, written = compare(args.runs, args.out, allow_mixed=args.allow_mixed, loss_runs=args.loss_runs)
    with open(os.path.join(args.out, "table.md")) as f:
        print(f.read(), end="")
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
