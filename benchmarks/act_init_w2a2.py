#!/usr/bin/env python
"""Where brecq_joint W2A2 loses against its reference (MQBench's loop). A controlled experiment on CIFAR-10
ResNet-20, the ResNet-20 protocol (docs/METHODS.md#resnet-20-protocol: 1,024 calibration images, batch 32, 2,000 iterations per unit, all 10,000 test
images): the same method, seed and calibration, with the activation steps either re-observed on each unit's cached
inputs before it learns (`act_init_images: 256`, QDrop's original code) or kept as the global calibration set them
(`act_init_images: 0`, MQBench's `ptq_reconstruction`, the reference of brecq_joint), for brecq_joint and, as the
control, qdrop.

    python benchmarks/act_init_w2a2.py --jobs 2                  # runs what is missing, then the table
    python benchmarks/act_init_w2a2.py --table-only

Each run is its own ptq_main.py process (one thread when --jobs > 1); a folder holding results.json is reused. A
run at its method's default (brecq_joint 0 since this experiment, qdrop 256) is the protocol's own, in
benchmarks/runs/resnet20_histmse.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from reconstruction_resnet20 import write_results  # noqa: E402

CONFIGS = {"brecq_joint": "configs/cifar10/resnet20_w4a4_brecq_joint.yaml",
           "qdrop": "configs/cifar10/resnet20_w4a4_qdrop.yaml"}
PROTOCOL_RUNS = "benchmarks/runs/resnet20_histmse"


# each method's default: its runs with it are the protocol's own (the reconstruction benchmark's folder)
DEFAULT_INIT = {"brecq_joint": 0, "qdrop": 256}


def run_dir(out: str, method: str, init: int, bits: str, seed: int) -> str:
    own = os.path.join(out, f"{method}_init{init}_{bits.lower()}_s{seed}")
    protocol = os.path.join(REPO, PROTOCOL_RUNS, f"{method}_{bits.lower()}_s{seed}")
    if init == DEFAULT_INIT[method] and not os.path.exists(os.path.join(own, "results.json")):
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


def step_sizes(bits: str, seed: int, threads: int) -> list[str]:
    """The activation steps each variant starts learning from: brecq_joint with one iteration per unit (the steps
    after initialisation, before learning moves them), 500 test images, the models' state read back."""
    w, a = bits[1:].split("A")
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for init in (0, 256):
            folder = os.path.join(tmp, f"init{init}")
            cmd = [sys.executable, "ptq_main.py", "--config", CONFIGS["brecq_joint"], "--quiet"]
            for o in [f"quant.w.bits={w}", f"quant.a.bits={a}", f"runtime.seed={seed}", "algorithm.iters=1",
                      f"algorithm.act_init_images={init}", "data.evaluation.limit=500", "runtime.save_model=true",
                      f"runtime.output_dir={folder}"] + ([f"runtime.threads={threads}"] if threads else []):
                cmd += ["--set", o]
            subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, check=True)
            blob = torch.load(os.path.join(folder, "quantized_model.pt"), map_location="cpu", weights_only=False)
            steps[init] = {k[:-len(".scale")]: float(v) for k, v in blob["state_dict"].items()
                           if k.endswith("post_act_fake_quantizer.scale")}
    lines = ["| activation quantizer (output of) | step from calibration (0) | re-observed on the unit's inputs "
             "(256) | ratio |", "|---|---|---|---|"]
    for name, s0 in steps[0].items():
        s256 = steps[256][name]
        lines.append(f"| {name.replace('_post_act_fake_quantizer', '')} | {s0:.4f} | {s256:.4f} | {s256 / s0:.2f} |")
    return lines


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
    parser.add_argument("--no-steps", action="store_true", help="skip the step-size table (two one-iteration runs)")
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
            f"Made by `{command}` on {time.strftime('%Y-%m-%d')} (CPU, {os.cpu_count()} cores). The ResNet-20 protocol "
            "(1,024 calibration images drawn with seed 1005, batch 32, 2,000 iterations per unit, histogram-MSE "
            "initialisation), all 10,000 test images, FP32 measured in each run. Only `algorithm.act_init_images` "
            "differs within a row.\n\n" + "\n".join(lines) + "\n\n"
            "| method | seeds | 256: mean ± std | 0: mean ± std | paired difference 0 − 256 | 0 better |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(summary) + "\n")
    if units:
        text += (f"\nbrecq_joint, seed {first}: each unit's reconstruction loss (first logged value → final, with "
                 "hard rounding):\n\n" + "\n".join(units) + "\n")
    if not args.no_steps:
        text += (f"\nThe steps brecq_joint starts learning from, seed {first} (one iteration per unit, so the steps "
                 "are the initialised ones):\n\n" + "\n".join(step_sizes(args.bits, first, threads)) + "\n")
    write_results(os.path.join(REPO, args.results), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
