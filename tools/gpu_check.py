"""First thing to run on a GPU machine: one short reconstruction on CUDA and the same on the CPU, their top-1
against each other and their time per iteration, one line each; with two or more GPUs, the same under torchrun.

    python -m ptqkit.tools.gpu_check                          # ResNet-20 W4A4 QDrop on the shared CIFAR-10 assets
    python -m ptqkit.tools.gpu_check --config CFG.yaml --iters 200 --set data.root=/data/imagenet

Both runs use the same seed, calibration images and iteration budget. Masks and batches are drawn from the same
CPU generator on both devices (ptqkit.quant.kernels), so the two runs differ by floating-point rounding only: their
top-1 must agree within --tolerance points. Exit status 0 when every check that could run passed, 1 when one did not,
2 for bad input; a machine without CUDA prints the CPU line and says so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from ptqkit import pipeline
from ptqkit.config import load_config
from ptqkit.tools import cli

DEFAULT_CONFIG = "configs/cifar10/resnet20_w4a4_qdrop.yaml"


def one_run(config: str, overrides: list[str], device: str, out: str) -> dict:
    cfg = load_config(config, overrides + [f"runtime.device={device}", "runtime.save_model=false",
                                           "runtime.reuse_fp32=false"])
    os.makedirs(out, exist_ok=True)
    results = pipeline.run(cfg, out, show_progress=False)
    units = results["algorithm_results"].get("units", [])
    iters = sum(u["iterations"] for u in units)
    loop = sum(u.get("loop_seconds", 0.0) for u in units)
    return {"device": device, "top1": results["quant"]["top1"], "fp32": results["fp32"]["top1"],
            "images": results["quant"]["images"], "ms_per_iter": 1000 * loop / iters if iters else None,
            "quantize_s": results["seconds"]["quantize"]}


def line(r: dict) -> str:
    per_it = f"{r['ms_per_iter']:.2f} ms/iteration" if r["ms_per_iter"] is not None else "no iterations"
    return (f"{r['device']}: top-1 {r['top1']:.2f} % (FP32 {r['fp32']:.2f} % on the same {r['images']} images), "
            f"{per_it}, quantize {r['quantize_s']:.1f} s")


def torchrun(config: str, overrides: list[str], gpus: int, out: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--module", "ptq_main",
           "--quiet", "--config", config]
    for o in overrides + ["runtime.device=cuda", "runtime.save_model=false", f"runtime.output_dir={out}"]:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return f"torchrun x{gpus}: FAILED ({tail})"
    results = json.load(open(os.path.join(out, "results.json")))
    return (f"torchrun x{gpus} GPUs: top-1 {results['quant']['top1']:.2f} % (FP32 {results['fp32']['top1']:.2f} %), "
            f"quantize {results['seconds']['quantize']:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--iters", type=int, default=100, help="iterations per unit")
    parser.add_argument("--images", type=int, default=256, help="calibration images")
    parser.add_argument("--eval-limit", type=int, default=2000, help="evaluation images")
    parser.add_argument("--tolerance", type=float, default=1.0, help="largest top-1 gap CUDA vs CPU (points)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    overrides = args.overrides + [f"algorithm.iters={args.iters}", f"data.calibration.num_images={args.images}",
                                  f"data.evaluation.limit={args.eval_limit}"]
    load_config(args.config, overrides)   # bad input: one line before any work
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        cpu = one_run(args.config, overrides, "cpu", os.path.join(tmp, "cpu"))
        print(line(cpu), flush=True)
        if not torch.cuda.is_available():
            print("cuda: no CUDA device visible; nothing else to check")
            return 0
        gpu = one_run(args.config, overrides, "cuda", os.path.join(tmp, "cuda"))
        print(line(gpu), flush=True)
        gap = abs(gpu["top1"] - cpu["top1"])
        ok = gap <= args.tolerance
        failed |= not ok
        speed = (f"; CUDA {cpu['ms_per_iter'] / gpu['ms_per_iter']:.1f}x the CPU's iterations per second"
                 if cpu["ms_per_iter"] and gpu["ms_per_iter"] else "")
        print(f"agreement: |CUDA - CPU| top-1 {gap:.2f} points ({'within' if ok else 'OVER'} {args.tolerance}){speed}")
        gpus = torch.cuda.device_count()
        if gpus >= 2:
            text = torchrun(args.config, overrides, gpus, os.path.join(tmp, "torchrun"))
            print(text)
            failed |= "FAILED" in text
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli(main))
