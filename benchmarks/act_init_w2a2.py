#!/usr/bin/env python
"""Issue 24, item 1: where brecq_joint W2A2 loses against its reference. A controlled experiment on CIFAR-10
ResNet-20, the issue-3 protocol (1,024 calibration images, batch 32, 2,000 iterations per unit, all 10,000 test
images): the same method, seed and calibration, with the activation steps either re-observed on each unit's cached
inputs before it learns (`act_init_images: 256`, QDrop's original code) or kept as the global calibration set them
(`act_init_images: 0`, MQBench's `ptq_reconstruction`, the reference of brecq_joint), for brecq_joint and, as the
control, qdrop.

    python benchmarks/act_init_w2a2.py --jobs 2                  # runs what is missing, then the table
    python benchmarks/act_init_w2a2.py --table-only

Each run is its own ptq_main.py process (one thread when --jobs > 1); a folder holding results.json is reused. The
runs with 256 at seeds 1005-1007 are the protocol's own (benchmarks/runs/resnet20_histmse), made with the same
settings before this experiment.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from reconstruction_resnet20 import write_results  # noqa: E402

CONFIGS = {"brecq_joint": "configs/cifar10/resnet20_w4a4_brecq_joint.yaml",
           "qdrop": "configs/cifar10/resnet20_w4a4_qdrop.yaml"}
PROTOCOL_RUNS = "benchmarks/runs/resnet20_histmse"


def run_dir(out: str, method: str, init: int, bits: str, seed: int) -> str:
    own = os.path.join(out, f"{'native' if method == 'brecq_joint' else method}_init{init}_{bits.lower()}_s{seed}")
    protocol = os.path.join(REPO, PROTOCOL_RUNS, f"{method}_{bits.lower()}_s{seed}")
    if init == 256 and not os.path.exists(os.path.join(own, "results.json")) and \
            os.path.exists(os.path.join(protocol, "results.json")):
        return protocol
    return own


def run_one(cell, out: str, threads: int, table_only: bool):
    method, init, bits, seed = cell
    folder = run_dir(out, method, init, bits, seed)
    results = os.path.join(folder, "results.json")
    if not os.path.exists(results) and not table_only:
        w, a = bits[1:].split("A")
        cmd = [sys.executable, "ptq_main.py", "--config", CONFIGS[method], "--quiet"]
        for o in [f"quant.w.bits={w}", f"quant.a.bits={a}", f"runtime.seed={seed}", "runtime.save_model=false",
                  f"algorithm.act_init_images={init}", f"runtime.output_dir={os.path.relpath(folder, REPO)}"] + (
                [f"runtime.threads={threads}"] if threads else []):
            cmd += ["--set", o]
        print("$", " ".join(cmd), flush=True)
        with open(folder + ".log", "a") as log:
            subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if not os.path.exists(results):
        return None
    r = json.load(open(results))
    r["_dir"] = os.path.relpath(folder, REPO)
    return r


def unit_losses(r: dict) -> dict:
    return {u["name"]: u for u in r.get("algorithm_results", {}).get("units", [])}


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else float("nan")
    return m, s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["brecq_joint", "qdrop"], choices=sorted(CONFIGS))
    parser.add_argument("--bits", default="W2A2")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1005, 1006, 1007, 1008, 1009])
    parser.add_argument("--qdrop-seeds", nargs="+", type=int, default=[1005, 1006, 1007],
                        help="seeds of the control")
    parser.add_argument("--out", default="benchmarks/runs/brecq_joint_ref")
    parser.add_argument("--results", default="benchmarks/results/act_init_w2a2.md")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    out = os.path.join(REPO, args.out)
    os.makedirs(out, exist_ok=True)
    cells = [(m, init, args.bits, s) for m in args.methods for init in (256, 0)
             for s in (args.qdrop_seeds if m == "qdrop" else args.seeds)]
    threads = 1 if args.jobs > 1 else 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(cells, pool.map(lambda c: run_one(c, out, threads, args.table_only), cells)))

    lines = ["| method | seed | act_init_images 256: top-1 % | act_init_images 0: top-1 % | 0 − 256 | "
             "FP32 top-1 % (same images) | run folders |", "|---|---|---|---|---|---|---|"]
    summary = []
    for m in args.methods:
        seeds = args.qdrop_seeds if m == "qdrop" else args.seeds
        pairs = []
        for s in seeds:
            a, b = results[(m, 256, args.bits, s)], results[(m, 0, args.bits, s)]
            if a is None or b is None:
                lines.append(f"| {m} | {s} | {a['quant']['top1'] if a else 'missing'} | "
                             f"{b['quant']['top1'] if b else 'missing'} | – | – | – |")
                continue
            pairs.append((a["quant"]["top1"], b["quant"]["top1"]))
            lines.append(f"| {m} | {s} | {a['quant']['top1']:.2f} | {b['quant']['top1']:.2f} | "
                         f"{b['quant']['top1'] - a['quant']['top1']:+.2f} | {a['fp32']['top1']:.2f} | "
                         f"`{a['_dir']}`, `{b['_dir']}` |")
        if pairs:
            m256, s256 = mean_std([p[0] for p in pairs])
            m0, s0 = mean_std([p[1] for p in pairs])
            md, sd = mean_std([p[1] - p[0] for p in pairs])
            summary.append(f"| {m} | {len(pairs)} | {m256:.2f} ± {s256:.2f} | {m0:.2f} ± {s0:.2f} | "
                           f"{md:+.2f} ± {sd:.2f} | {sum(p[1] > p[0] for p in pairs)} of {len(pairs)} |")

    units = []
    first = args.seeds[0]
    a, b = results.get(("brecq_joint", 256, args.bits, first)), results.get(("brecq_joint", 0, args.bits, first))
    if a and b:
        ua, ub = unit_losses(a), unit_losses(b)
        units = ["| unit | 256: first logged → final | 0: first logged → final |", "|---|---|---|"]
        for name in ua:
            if name in ub:
                units.append(f"| {name} | {ua[name]['history']['rec'][0]:.4g} → {ua[name]['final_rec_loss']:.4g} | "
                             f"{ub[name]['history']['rec'][0]:.4g} → {ub[name]['final_rec_loss']:.4g} |")

    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    text = (f"# ResNet-20 {args.bits}: activation steps re-observed per unit (256) or kept from calibration (0)\n\n"
            f"Made by `{command}` on {time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores). Issue-3 protocol "
            "(1,024 calibration images drawn with seed 1005, batch 32, 2,000 iterations per unit, histogram-MSE "
            "initialisation), all 10,000 test images, FP32 measured in each run. Only `algorithm.act_init_images` "
            "differs within a row.\n\n" + "\n".join(lines) + "\n\n"
            "| method | seeds | 256: mean ± std | 0: mean ± std | paired difference 0 − 256 | 0 better |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(summary) + "\n")
    if units:
        text += (f"\nbrecq_joint, seed {first}: each unit's reconstruction loss (first logged value → final, with "
                 "hard rounding):\n\n" + "\n".join(units) + "\n")
    write_results(os.path.join(REPO, args.results), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
