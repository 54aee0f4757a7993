#!/usr/bin/env python
"""Engine benchmark, the ResNet-20 protocol (docs/METHODS.md#resnet-20-protocol): CIFAR-10 ResNet-20 from the
assets (docs/ASSETS.md), naive and the reconstruction methods at several bit-widths, each run in its own process
through ptq_main.py; then one table with FP32 beside each row.

    python benchmarks/reconstruction_resnet20.py                      # the whole protocol
    python benchmarks/reconstruction_resnet20.py --methods qdrop --bits W2A4 --seeds 1005 1006 1007

Runs already finished (results.json present) are not repeated, and a run interrupted after some units continues
from its saved progress (`ptq_main.py --resume`), so an interrupted benchmark can be restarted.
Protocol: 1,024 calibration images drawn with seed 1005 from the training images, batch 32, 2,000 iterations
per unit, per-channel asymmetric weights, first/last-layer weights and the last layer's input at 8 bit, hist_mse
range initialisation with p 2.4, all 10,000 test images.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"naive": "configs/cifar10/resnet20_w4a4_naive.yaml"}
for _m in ("adaround", "brecq", "brecq_joint", "qdrop"):
    CONFIGS[_m] = f"configs/cifar10/resnet20_w4a4_{_m}.yaml"


def run_folder(method: str, bits: str, seed: int, out_root: str) -> str:
    return os.path.join(out_root, f"{method}_{bits.lower()}_s{seed}")


def finished(method: str, bits: str, seed: int, out_root: str) -> dict | None:
    path = os.path.join(run_folder(method, bits, seed, out_root), "results.json")
    return json.load(open(path)) if os.path.exists(path) else None


# CIFAR-10 ResNet checkpoints under the assets root (docs/ASSETS.md), named in --set overrides as assets: paths
DEPTH_CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
                     "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}


def run_one(method: str, bits: str, seed: int, out_root: str, extra: list[str], threads: int = 0) -> dict | None:
    w, a = bits[1:].split("A")
    a = "null" if a == "32" else a      # W*A32: weight-only, no activation quantizer
    run_dir = run_folder(method, bits, seed, out_root)
    results = os.path.join(run_dir, "results.json")
    done = finished(method, bits, seed, out_root)
    if done is not None:
        return done
    resume = os.path.exists(os.path.join(run_dir, "progress.pt"))
    if os.path.isdir(run_dir) and not resume:
        # Interrupted before its first unit was saved: start it again in the same folder.
        shutil.rmtree(run_dir)
    # the run folder relative to the repository: committed files carry no path of the machine that made them
    overrides = [f"quant.w.bits={w}", f"quant.a.bits={a}", f"runtime.seed={seed}",
                 f"runtime.output_dir={os.path.relpath(run_dir, REPO)}", "runtime.save_model=false"]
    if method == "naive":
        overrides.append("algorithm.calib_images=null")  # naive observes all 1,024 calibration images here
    env = dict(os.environ)
    if threads:
        # Small convolutions do not scale across cores: several single-thread runs side by side finish sooner
        # than one run on all cores, and do not oversubscribe them.
        overrides.append(f"runtime.threads={threads}")
        env["OMP_NUM_THREADS"] = str(threads)
    if resume:  # the saved config.yaml already holds every override
        cmd = [sys.executable, "ptq_main.py", "--resume", run_dir, "--quiet"]
    else:
        cmd = [sys.executable, "ptq_main.py", "--config", CONFIGS[method], "--quiet"]
        for o in overrides + extra:
            cmd += ["--set", o]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    with open(os.path.join(out_root, f"{method}_{bits.lower()}_s{seed}.log"), "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not os.path.exists(results):
        print(f"  FAILED ({proc.returncode}) after {time.time() - start:.0f} s", flush=True)
        return None
    return json.load(open(results))


def run_ptq(folder: str, fresh: list[str], threads: int = 1) -> dict | None:
    """ptq_main.py into `folder` (a path under the repository), one process, `threads` torch threads: resumed from
    its progress.pt when it has one, else started with the arguments `fresh`; output appended to `folder`.log.
    Returns results.json, or None when the run failed. A finished run's progress.pt is deleted: an unfinished run
    keeps it in the repository so that a clone can continue it, a finished one needs none."""
    results, progress = os.path.join(folder, "results.json"), os.path.join(folder, "progress.pt")
    if os.path.exists(results):
        return json.load(open(results))
    if os.path.exists(progress):
        cmd = [sys.executable, "ptq_main.py", "--resume", os.path.relpath(folder, REPO), "--quiet"]
    else:
        if os.path.isdir(folder):
            raise SystemExit(f"{folder}: a run folder without progress or results; remove it first")
        cmd = [sys.executable, "ptq_main.py", *fresh, "--quiet"]
    print("$", " ".join(cmd), flush=True)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(f"{folder}.log", "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not os.path.exists(results):
        print(f"  failed ({proc.returncode}); see {os.path.relpath(folder, REPO)}.log", flush=True)
        return None
    if os.path.exists(progress):
        os.remove(progress)
    return json.load(open(results))


ROW_HEADER = ("| method | bits | seed | top-1 % | FP32 top-1 % (same images) | wall s: FP32 eval / quantize / "
              "quant eval | iterations | ms / iteration | peak RSS MB | RSS after each unit MB: first → last |\n"
              "|---|---|---|---|---|---|---|---|---|---|")


def row(method: str, bits: str, seed: int, r: dict) -> str:
    """One line under ROW_HEADER."""
    units = r.get("algorithm_results", {}).get("units", [])
    iters = sum(u["iterations"] for u in units)
    unit_s = sum(u["seconds"] for u in units)
    ms_it = f"{1000 * unit_s / iters:.1f}" if iters else "–"
    sec = r["seconds"]
    rss = [u["rss_mb"] for u in units if "rss_mb" in u]
    rss_units = f"{rss[0]:.0f} → {rss[-1]:.0f} (max {max(rss):.0f})" if rss else "–"
    resumed = " (resumed)" if "resumed" in r else ""
    return (f"| {method} | {bits} | {seed} | {r['quant']['top1']:.2f} | {r['fp32']['top1']:.2f} | "
            f"{sec.get('fp32_eval', 0):.0f} / {sec['quantize']:.0f}{resumed} / {sec.get('quant_eval', 0):.0f} | "
            f"{iters} | {ms_it} | {r['memory']['host_peak_rss_mb']:.0f} | {rss_units} |")


NOTES_HEADING = "## Notes (written after the run"  # "...run)" or "...runs)"


def write_results(path: str, text: str, missing: list[str] = (), data: dict | None = None) -> str:
    """Write a generated results file, with the runs not finished listed, keeping the hand-written notes of the one
    it replaces (from NOTES_HEADING on): a benchmark re-run or re-tabulated must not erase what was written about
    its figures. Returns the generated text."""
    if missing:
        text += "\nNot finished: " + ", ".join(missing) + ".\n"
    notes = ""
    if os.path.exists(path):
        old = open(path).read()
        notes = old[old.index(NOTES_HEADING):] if NOTES_HEADING in old else ""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text + (f"\n{notes}" if notes else ""))
    if data is not None:   # the figures themselves, for scripts that read them back
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump(data, f, indent=1)
    return text


def model_overrides(model: str) -> list[str]:
    """--set overrides that put the protocol's configs (all ResNet-20) on another CIFAR ResNet of the assets."""
    if model == "resnet20":
        return []
    return [f"model.name=cifar_{model}", f"model.checkpoint=assets:cifar10/{DEPTH_CHECKPOINTS[model]}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["naive", "adaround", "brecq", "brecq_joint", "qdrop"])
    parser.add_argument("--bits", nargs="+", default=["W4A4", "W2A4", "W2A2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1005])
    parser.add_argument("--out", default="benchmarks/runs/resnet20_histmse")
    parser.add_argument("--results", default="benchmarks/results/reconstruction_resnet20.md")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (each single-threaded if > 1)")
    parser.add_argument("--model", default="resnet20", choices=sorted(DEPTH_CHECKPOINTS),
                        help="the CIFAR-10 ResNet of the assets (the protocol, unchanged, on a deeper one)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    parser.add_argument("--table-only", action="store_true",
                        help="tabulate the finished runs, start none (cells not finished are listed as missing)")
    args = parser.parse_args()
    args.extra = model_overrides(args.model) + args.extra
    out_root = os.path.join(REPO, args.out)
    os.makedirs(out_root, exist_ok=True)
    cells = [(m, b, s) for m in args.methods for b in args.bits for s in args.seeds]
    threads = 1 if args.jobs > 1 else 0
    if args.table_only:
        results = [finished(*c, out_root) for c in cells]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda c: run_one(*c, out_root, args.extra, threads), cells))
    missing = [f"{m} {b} seed {s}" for (m, b, s), r in zip(cells, results) if r is None]
    rows = [row(*c, r) for c, r in zip(cells, results) if r is not None]
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    text = (f"# ResNet-{args.model[6:]} (CIFAR-10 assets): reconstruction methods\n\nMade by `{command}` "
            f"on {time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores). All 10,000 test images.\n\n"
            f"{ROW_HEADER}\n" + "\n".join(rows) + "\n")
    print(write_results(os.path.join(REPO, args.results), text, missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
