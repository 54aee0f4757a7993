"""A grid of PTQ runs, then their comparison table.

    python -m ptqkit.tools.sweep --config BASE.yaml --sweep algorithm.name=naive,qdrop quant.w.bits=2,4 \
        [--set key=value ...] --out DIR [--dry-run] [--resume]

Every combination of the --sweep values (the Cartesian product, in the order given) is one run of `ptq_main.py`
in its own subprocess, with `--set runtime.output_dir=DIR/<short name>` (e.g. DIR/name-qdrop_bits-2): a run that
fails is reported and the others go on. All combinations' configs are validated before the first run, so a bad
value fails at once. At the end the runs that succeeded are tabulated by `ptqkit.tools.compare` into DIR (table.md,
table.csv, accuracy.png, loss plots of the runs that recorded per-unit losses).

Values are split on commas outside brackets and quotes and parsed as YAML, like --set: `a.b=[1, 2],[3, 4]`
sweeps two lists. Each run's console output goes to DIR/<short name>.log. --resume keeps the runs of an earlier
attempt that finished (their folder holds results.json) and runs the others again.
Exit status: 0 all runs succeeded, 1 some failed, 2 bad input (nothing was run).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

from ptqkit.config import load_config
from ptqkit.errors import UserError
from ptqkit.tools import cli, compare

log = logging.getLogger("ptq.sweep")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTQ_MAIN = os.path.join(REPO, "ptq_main.py")


def split_values(raw: str) -> list[str]:
    """Split on commas that are not inside [], {}, () or quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_sweep(items) -> list[tuple[str, list[str]]]:
    axes = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--sweep '{item}': expected key.path=value1,value2,...")
        key, raw = item.split("=", 1)
        key = key.strip()
        values = split_values(raw)
        if not key or any(v == "" for v in values):
            raise UserError(f"--sweep '{item}': expected key.path=value1,value2,... with no empty value")
        if key in (k for k, _ in axes):
            raise UserError(f"--sweep '{item}': key '{key}' is swept twice")
        if key == "runtime.output_dir":
            raise UserError("--sweep: runtime.output_dir is set by the sweep (use --out)")
        axes.append((key, values))
    return axes


def _abbreviations(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other swept key ends with (quant.w.bits -> w.bits)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                out[key] = suffix
                break
    return out


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "x"


@dataclass
class Job:
    name: str
    overrides: list[str]   # the swept key=value pairs of this combination
    run_dir: str


def plan(axes, out_dir: str) -> list[Job]:
    abbr = _abbreviations([k for k, _ in axes])
    jobs = []
    for combo in itertools.product(*[[(k, v) for v in values] for k, values in axes]):
        name = "_".join(f"{abbr[k]}-{_safe(v)}" for k, v in combo)
        jobs.append(Job(name=name, overrides=[f"{k}={v}" for k, v in combo], run_dir=os.path.join(out_dir, name)))
    names = [j.name for j in jobs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"--sweep: two combinations get the same folder name '{duplicate}' (values differing only "
                        "in punctuation); make the values distinct")
    return jobs


def validate_all(config: str, base_sets: list[str], jobs: list[Job]) -> None:
    for job in jobs:
        try:
            load_config(config, base_sets + job.overrides + [f"runtime.output_dir={job.run_dir}"])
        except UserError as exc:
            raise UserError(f"sweep combination {job.name}: {exc}") from None


def _free_name(path: str) -> str:
    candidate, k = path, 1
    while os.path.exists(candidate):
        k += 1
        candidate = f"{path}-{k}"
    return candidate


def _finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "results.json"))


def run_job(config: str, base_sets: list[str], job: Job, log_path: str) -> tuple[int, str]:
    """Run one combination; (exit status, last line of its output)."""
    cmd = [sys.executable, PTQ_MAIN, "--config", config, "--quiet"]
    for item in base_sets + job.overrides + [f"runtime.output_dir={job.run_dir}"]:
        cmd += ["--set", item]
    with open(log_path, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    with open(log_path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return rc, (lines[-1] if lines else "")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ptqkit.tools.sweep",
                                     description="Run the Cartesian product of config values, then compare.")
    parser.add_argument("--config", required=True, help="base YAML config")
    parser.add_argument("--sweep", nargs="+", action="extend", required=True, metavar="KEY.PATH=V1,V2",
                        help="a key and its comma-separated values (YAML), repeatable")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY.PATH=VALUE",
                        help="override applied to every run (as in ptq_main.py)")
    parser.add_argument("--out", required=True, help="sweep folder: one run folder per combination, and the table")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the runs, run nothing")
    parser.add_argument("--resume", action="store_true",
                        help="keep runs whose folder already holds a results.json; move failed attempts aside "
                             "(<name>.failed) and run them again")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if any(s.split("=", 1)[0].strip() == "runtime.output_dir" for s in args.overrides):
        raise UserError("--set runtime.output_dir: the sweep sets each run's folder (use --out)")
    jobs = plan(parse_sweep(args.sweep), args.out)
    validate_all(args.config, args.overrides, jobs)
    for job in jobs:
        busy = os.path.isdir(job.run_dir) and os.listdir(job.run_dir)
        if busy and not args.resume:
            raise UserError(f"run folder '{job.run_dir}' exists and is not empty: choose another --out or pass "
                            "--resume to keep finished runs and retry the others")
    print(f"{len(jobs)} runs, configs valid:")
    for job in jobs:
        print(f"  {job.run_dir}: " + " ".join(job.overrides))
    if args.dry_run:
        return 0
    os.makedirs(args.out, exist_ok=True)
    done, failed = [], []
    for k, job in enumerate(jobs, start=1):
        if args.resume and _finished(job.run_dir):
            print(f"[{k}/{len(jobs)}] {job.name}: already done, kept", flush=True)
            done.append(job)
            continue
        if os.path.isdir(job.run_dir) and os.listdir(job.run_dir):
            # An earlier attempt that failed: ptq_main.py would pick a suffixed folder instead, so move it aside.
            aside = _free_name(job.run_dir + ".failed")
            os.rename(job.run_dir, aside)
            print(f"[{k}/{len(jobs)}] {job.name}: earlier failed attempt moved to {aside}", flush=True)
        start = time.perf_counter()
        log_path = os.path.join(args.out, f"{job.name}.log")
        rc, last = run_job(args.config, args.overrides, job, log_path)
        took = time.perf_counter() - start
        if rc == 0 and _finished(job.run_dir):
            done.append(job)
            print(f"[{k}/{len(jobs)}] {job.name}: ok in {took:.0f} s: {last}", flush=True)
        else:
            failed.append(job)
            print(f"[{k}/{len(jobs)}] {job.name}: FAILED (exit {rc}) in {took:.0f} s: {last} (log {log_path})",
                  flush=True)
    print(f"{len(done)} of {len(jobs)} runs succeeded" + (
        ", failed: " + ", ".join(j.name for j in failed) if failed else ""))
    if done:
        dirs = [j.run_dir for j in done]
        loss_runs = [d for d in dirs if compare.load_run(d).units]
        # The sweep chose what varies: a swept setting key (e.g. the calibration size) marks rows, never refuses.
        table, written = compare.compare(dirs, args.out, allow_mixed=True, loss_runs=loss_runs)
        print(compare.to_markdown(table), end="")
        print("wrote " + ", ".join(written))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli(main))
