#!/usr/bin/env python
"""PD-Quant's cost per unit against its floors, in ONE process, on ResNet-20 W2A4.

    python benchmarks/pdquant_speed.py                       # 200 iterations and 100 DC steps per unit, 2 threads
    python benchmarks/pdquant_speed.py --threads 1 --iters 100

What is timed, unit by unit, on the same calibrated model, images and thread count:
- PD floor: the unit's forward and backward in FP32 (weight gradients) plus the rest of the network's forward and
  input-gradient backward (no weight gradients there), on a batch of the same size, every quantizer off; the
  engine's reconstruction loss plus PD-Quant's KL on the logits. What no PD-Quant iteration of that unit can beat.
- PD-Quant's loop (`algorithm.dc: false`, the prediction difference alone), `--iters` iterations of the engine:
  ms per iteration, for each `pd_output` (rerun: the reference's second unit forward on the quantized input;
  shared: the reconstruction forward's own output goes on).
- DC floor: the forward of the unit prefix that feeds its BN layers and the backward to the corrected input
  (nothing else), on `--dc-batch` images. DC: `correct_inputs` for `--dc-steps` Adam steps on the same images,
  seconds per step and per image (for the protocol's 500 steps).
- with `--compute-dtype bfloat16`: PD-Quant's loop (rerun) and DC again with their forward and backward in
  bfloat16 (runtime.compute_dtype), beside the float32 figures, from the same copies and seed.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reconstruction_resnet20 as rr  # noqa: E402
from calibration_speed import config_tree  # noqa: E402
from ptqkit import assets as ptq_assets  # noqa: E402


def timed(step, iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="W2A4")
    parser.add_argument("--iters", type=int, default=200, help="PD-Quant iterations per unit and variant")
    parser.add_argument("--floor-iters", type=int, default=100)
    parser.add_argument("--dc-steps", type=int, default=100)
    parser.add_argument("--dc-batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="calibration images (seed 1005)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--assets", default=ptq_assets.root(),
                        help="the assets root (docs/ASSETS.md; default $PTQKIT_ASSETS, else ~/.cache/ptqkit/assets)")
    parser.add_argument("--results", default="benchmarks/results/pdquant_speed.md")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: also PD-Quant's loop and DC in bf16, beside float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = args.compute_dtype == "bfloat16"
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)
    import warnings
    warnings.filterwarnings("ignore")

    from ptqkit import data
    import torch.nn as nn
    from ptqkit.algorithms.base import RunContext
    from ptqkit.algorithms.engine import Engine, EngineSettings, prefix_values, run_batched, reconstruction_loss
    from ptqkit.algorithms.graph import suffix_module, unit_module
    from ptqkit.algorithms.pdquant import bn_probe, correct_inputs, prediction_difference
    from ptqkit.quant.quantizers import fp_mode
    from ptqkit.algorithms.registry import get_algorithm
    from ptqkit import pipeline
    from ptqkit.algorithms import heap
    from ptqkit.config import validate

    load_start = os.getloadavg()
    tree = config_tree("resnet20", args.assets, "hist_mse", args.images, 2.4, args.bits)
    tree["algorithm"] = {"name": "pdquant", "iters": args.iters, "batch_size": 32, "dc": False}
    cfg = validate(tree)
    device = torch.device("cpu")
    pipeline.seed_everything(1005)
    fp_model = pipeline.build_fp_model(cfg, device)
    splits = data.make_splits(cfg.data)
    calib, labels = data.draw_calibration(splits, cfg.data.calibration)
    ctx = RunContext(cfg, fp_model, calib, labels, device, show_progress=False)
    method = get_algorithm("pdquant")(cfg.algorithm)
    calibrated = method.calibrated_model(ctx, method.phases())
    p = cfg.algorithm
    with torch.no_grad():
        fp_logits = torch.cat([fp_model(calib[i:i + 256]) for i in range(0, len(calib), 256)])

    rows = []
    with heap.retained_heap(True):
        for k, unit in enumerate(method.units(calibrated, ctx)):
            qm = copy.deepcopy(calibrated)
            units = method.units(qm, ctx)
            unit = units[k]
            module = unit_module(qm, unit)
            suffix = suffix_module(qm, unit.output)
            weights = [layer.weight for layer, _ in unit.weight_quantizers]
            with fp_mode(qm):
                (x,) = prefix_values(qm, [unit.input], calib, 64, device, device, torch.float32)
                target = run_batched(module, x, 64, device, device, torch.float32)
            for param in qm.parameters():   # the engine's convention: nothing learns but what it asks for
                param.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)

            def pd_floor_step():
                idx = torch.randint(0, len(x), (32,))
                out = module(x[idx])
                loss = reconstruction_loss(out, target[idx], 2.0) + \
                    prediction_difference(suffix(out), fp_logits[idx], p.T) / p.lamb_r
                for w in weights:
                    w.grad = None
                loss.backward()
            with fp_mode(qm):
                floor = timed(pd_floor_step, args.floor_iters)
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
            row = {"unit": unit.name, "pd_floor_ms": 1000 * floor}
            # PD-Quant's loop, each variant on a fresh copy of the calibrated model, only this unit
            variants = [("rerun", torch.float32), ("shared", torch.float32)] + (
                [("rerun", torch.bfloat16)] if bf16 else [])
            for variant, dtype in variants:
                qv = copy.deepcopy(calibrated)
                uv = method.units(qv, ctx)
                params = copy.deepcopy(p)
                params.pd_output = variant
                hooks = get_algorithm("pdquant")(params).hooks(qv, uv, ctx)
                engine = Engine(qv, uv[k:k + 1], calib, device,
                                EngineSettings(show_progress=False, compute_dtype=dtype), hooks)
                torch.manual_seed(1005)
                record = engine.run(method.phases())[0]
                key = f"pd_{variant}_ms" if dtype == torch.float32 else f"pd_{variant}_bf16_ms"
                row[key] = 1000 * record["loop_seconds"] / record["iterations"]
            # distribution correction
            bns = [m for m in unit.modules.values() if isinstance(m, nn.BatchNorm2d)]
            if bns:
                chunk = x[:args.dc_batch]
                probe = bn_probe(module, bns)
                with fp_mode(qm):
                    x_hat = chunk.clone().requires_grad_(True)

                    def dc_floor_step():
                        sum(v.sum() for v in probe(x_hat)).backward(inputs=[x_hat])
                    row["dc_floor_ms"] = 1000 * timed(dc_floor_step, args.floor_iters)
                dc_params = copy.deepcopy(p)
                dc_params.dc_steps, dc_params.dc_batch = args.dc_steps, args.dc_batch
                start = time.perf_counter()
                correct_inputs(module, bns, chunk, dc_params, device, device, torch.float32)
                seconds = time.perf_counter() - start
                row["dc_step_ms"] = 1000 * seconds / args.dc_steps
                row["dc_s_per_image_500"] = seconds / args.dc_steps * 500 / len(chunk)
                if bf16:
                    start = time.perf_counter()
                    correct_inputs(module, bns, chunk, dc_params, device, device, torch.float32, torch.bfloat16)
                    row["dc_step_bf16_ms"] = 1000 * (time.perf_counter() - start) / args.dc_steps
            rows.append(row)
            print(json.dumps(row))

    def ratio(a, b):
        return f"{a / b:.2f}" if b else "–"
    lines = [f"# PD-Quant cost per unit: ResNet-20 {args.bits} (CIFAR-10 assets)", "",
             f"Made by `python {' '.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}` on "
             f"{time.strftime('%Y-%m-%d')}: one process, {args.threads} torch threads, {os.cpu_count()}-core CPU, "
             f"torch {torch.__version__}, Python {platform.python_version()}; load average (1 min) at the start "
             f"{load_start[0]:.2f}, at the end {os.getloadavg()[0]:.2f}. Loop alone: {args.iters} iterations per "
             f"unit at batch 32 (PD only, no DC); floors over {args.floor_iters} iterations; DC {args.dc_steps} Adam "
             f"steps on {args.dc_batch} images.", "",
             "| unit | PD floor ms | PD-Quant rerun ms | / floor | PD-Quant shared ms | / floor | DC floor ms/step | "
             "DC ms/step | / floor | DC s/image (500 steps) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dc = (f"{r['dc_floor_ms']:.2f} | {r['dc_step_ms']:.2f} | {ratio(r['dc_step_ms'], r['dc_floor_ms'])} | "
              f"{r['dc_s_per_image_500']:.3f}") if "dc_floor_ms" in r else "– | – | – | –"
        lines.append(f"| {r['unit']} | {r['pd_floor_ms']:.2f} | {r['pd_rerun_ms']:.2f} | "
                     f"{ratio(r['pd_rerun_ms'], r['pd_floor_ms'])} | {r['pd_shared_ms']:.2f} | "
                     f"{ratio(r['pd_shared_ms'], r['pd_floor_ms'])} | {dc} |")
    tot = {key: sum(r.get(key, 0.0) for r in rows) for key in ("pd_floor_ms", "pd_rerun_ms", "pd_shared_ms",
                                                               "dc_floor_ms", "dc_step_ms", "dc_s_per_image_500")}
    lines.append(f"| **all units** | {tot['pd_floor_ms']:.2f} | {tot['pd_rerun_ms']:.2f} | "
                 f"**{ratio(tot['pd_rerun_ms'], tot['pd_floor_ms'])}** | {tot['pd_shared_ms']:.2f} | "
                 f"**{ratio(tot['pd_shared_ms'], tot['pd_floor_ms'])}** | {tot['dc_floor_ms']:.2f} | "
                 f"{tot['dc_step_ms']:.2f} | **{ratio(tot['dc_step_ms'], tot['dc_floor_ms'])}** | "
                 f"{tot['dc_s_per_image_500']:.3f} |")
    if bf16:
        tot["pd_rerun_bf16_ms"] = sum(r["pd_rerun_bf16_ms"] for r in rows)
        tot["dc_step_bf16_ms"] = sum(r.get("dc_step_bf16_ms", 0.0) for r in rows)
        lines += ["", "bfloat16 (`runtime.compute_dtype`), the same units, copies and seed:", "",
                  "| unit | PD-Quant rerun ms, float32 | bfloat16 | bf16 / float32 | DC ms/step, float32 | bfloat16 | "
                  "bf16 / float32 |", "|---|---|---|---|---|---|---|"]
        for r in rows + [{"unit": "**all units**", **tot}]:
            dc = (f"{r['dc_step_ms']:.2f} | {r['dc_step_bf16_ms']:.2f} | {ratio(r['dc_step_bf16_ms'], r['dc_step_ms'])}"
                  if r.get("dc_step_bf16_ms") else "– | – | –")
            lines.append(f"| {r['unit']} | {r['pd_rerun_ms']:.2f} | {r['pd_rerun_bf16_ms']:.2f} | "
                         f"{ratio(r['pd_rerun_bf16_ms'], r['pd_rerun_ms'])} | {dc} |")
    text = "\n".join(lines + [""])
    print(text)
    rr.write_results(os.path.join(REPO, args.results), text)
    with open(os.path.join(REPO, os.path.splitext(args.results)[0] + ".json"), "w") as f:
        json.dump({"threads": args.threads, "iters": args.iters, "rows": rows, "totals": tot,
                   "bf16_over_fp32_pd": tot["pd_rerun_bf16_ms"] / tot["pd_rerun_ms"] if bf16 else None,
                   "bf16_over_fp32_dc": tot["dc_step_bf16_ms"] / tot["dc_step_ms"] if bf16 else None,
                   "load_average": [load_start[0], os.getloadavg()[0]]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
