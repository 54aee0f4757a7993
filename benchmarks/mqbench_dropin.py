#!/usr/bin/env python
"""MQBench's flow on CIFAR-10 ResNet-20 with MQBench's `ptq_reconstruction` against this toolkit's drop-in
(`ptqkit.from_mqbench.ptq_reconstruction`), same prepared and calibrated model, same config, in one process at
equal threads: top-1 on all 10,000 test images (FP32 beside) and the wall time of each reconstruction call.

    python benchmarks/mqbench_dropin.py                         # W2A4, 1,024 images, 2,000 iterations per block
    python benchmarks/mqbench_dropin.py --iters 200 --no-write  # a quick look

MQBench's model is prepared by `prepare_by_platform` (Academic, AdaRound weights, QDrop activations, MSE / EMA-MSE
observers as its QDrop config) with the option-A shortcut as a leaf module (its block search cannot walk the
shortcut's slices, MQBENCH_NOTES.md), calibrated as its PTQ example does (activations on every batch, weights on
the first), then reconstructed by each function from its own deep copy.
"""
from __future__ import annotations

import argparse
import builtins
import copy
import logging
import os
import sys
import time
import warnings

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def resnet20_and_calibration(images: int, seed: int):
    """CIFAR-10 ResNet-20 from the assets (eval mode), its validated data config, splits and calibration images."""
    from ptqkit import assets as ptq_assets
    from ptqkit import data
    from ptqkit.config import validate
    from ptqkit.models import build_model, load_checkpoint
    assets = ptq_assets.resolve("assets:cifar10")
    cfg = validate({"model": {"name": "cifar_resnet20"},
                    "data": {"root": assets, "preset": "cifar10",
                             "calibration": {"split": "train", "num_images": images, "batch_size": 32, "seed": seed},
                             "evaluation": {"split": "test", "batch_size": 500}}})
    splits = data.make_splits(cfg.data)
    calib, _ = data.draw_calibration(splits, cfg.data.calibration)
    fp = build_model("cifar_resnet20")
    load_checkpoint(fp, os.path.join(assets, "resnet20-12fca82f.th"))
    return fp.eval(), cfg, splits, calib


def prepared_as_mqbench(fp, w_bits: int, a_bits: int):
    """A copy of `fp` prepared by MQBench as its QDrop config does (Academic, AdaRound weights, QDrop activations,
    MSE / EMA-MSE observers), the option-A shortcut a leaf module."""
    from mqbench.prepare_by_platform import BackendType, prepare_by_platform
    from ptqkit.models.cifar_resnet import OptionAShortcut
    scheme = {"symmetry": False, "pot_scale": False, "p": 2.4}
    extra = {"extra_qconfig_dict": {
        "w_observer": "MSEObserver", "a_observer": "EMAMSEObserver",
        "w_fakequantize": "AdaRoundFakeQuantize", "a_fakequantize": "QDropFakeQuantize",
        "w_qscheme": {"bit": w_bits, "per_channel": True, **scheme},
        "a_qscheme": {"bit": a_bits, "per_channel": False, **scheme}}, "leaf_module": [OptionAShortcut]}
    return prepare_by_platform(copy.deepcopy(fp), BackendType.Academic, extra).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--bits", default="W2A4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1005)
    parser.add_argument("--prob", type=float, default=0.5,
                        help="MQBench's keep probability: 0.5 QDrop, 1.0 its BRECQ (always-on activations)")
    parser.add_argument("--act-init-images", type=int, default=None,
                        help="a third row: the drop-in re-observing each unit's activation ranges on this many of "
                             "its cached inputs before learning (this toolkit's default, 256), where MQBench keeps "
                             "the calibrated steps")
    parser.add_argument("--bound-grad", choices=("pass", "stop"), default=None,
                        help="the drop-in's quant.a.bound_grad (default: what MQBench's own formula computes under "
                             "this torch, stop on 2.14; pass: the papers' gradient; docs/MQBENCH_GAP.md)")
    parser.add_argument("--batch-draw", choices=("random", "fixed"), default=None,
                        help="the drop-in's algorithm.batch_draw (default fixed: one calibration batch per "
                             "iteration, as MQBench's loop; random: the BRECQ / QDrop code's)")
    parser.add_argument("--skip-mqbench", action="store_true",
                        help="leave MQBench's own call out (its row is in an earlier results file)")
    parser.add_argument("--results", default="benchmarks/results/mqbench_dropin.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)
    from easydict import EasyDict
    import mqbench.advanced_ptq as mq_ptq
    from mqbench.utils.state import enable_quantization
    from ptqkit import data
    from ptqkit.from_mqbench import calibrate_as_mqbench, ptq_reconstruction
    from reconstruction_resnet20 import write_results

    w_bits, a_bits = (int(x) for x in args.bits[1:].split("A"))
    fp, cfg, splits, calib = resnet20_and_calibration(args.images, args.seed)
    xs, ys = zip(*data.evaluation_loader(splits, cfg.data.evaluation))
    images, labels = torch.cat(xs), torch.cat(ys)

    def top1(model) -> float:
        with torch.no_grad():
            return 100.0 * sum(int((model(images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
                               for i in range(0, len(images), 500)) / len(images)

    load_before = os.getloadavg()
    fp32 = top1(fp)
    model = prepared_as_mqbench(fp, w_bits, a_bits)
    batches = [calib[i:i + 32] for i in range(0, len(calib), 32)]
    start = time.perf_counter()
    calibrate_as_mqbench(model, batches)
    calibration_s = time.perf_counter() - start
    config = EasyDict(pattern="block", scale_lr=4.0e-5, warm_up=0.2, weight=0.01, max_count=args.iters,
                      b_range=[20, 2], keep_gpu=False, round_mode="learned_hard_sigmoid", prob=args.prob)

    changed = {k: v for k, v in (("bound_grad", args.bound_grad), ("batch_draw", args.batch_draw)) if v is not None}
    ours = EasyDict(config, **changed)
    suffix = "".join(f", {k}={v}" for k, v in changed.items())
    calls = [] if args.skip_mqbench else [("MQBench ptq_reconstruction",
                                           lambda m: mq_ptq.ptq_reconstruction(m, batches, config))]
    calls.append((f"ptqkit.from_mqbench.ptq_reconstruction{suffix}", lambda m: ptq_reconstruction(m, batches, ours)))
    if args.act_init_images is not None:
        reinit = EasyDict(ours, act_init_images=args.act_init_images)
        calls.append((f"ptqkit.from_mqbench.ptq_reconstruction{suffix}, act_init_images={args.act_init_images}",
                      lambda m: ptq_reconstruction(m, batches, reinit)))
    rows = []
    for name, call in calls:
        copy_ = copy.deepcopy(model)
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)   # MQBench draws its batches from numpy's stream; batch_draw fixed does too
        quiet, builtins.print = builtins.print, (lambda *a, **k: None)   # MQBench prints every 500 iterations
        start = time.perf_counter()
        try:
            out = call(copy_)
        finally:
            builtins.print = quiet
        seconds = time.perf_counter() - start
        enable_quantization(out)
        rows.append((name, top1(out), seconds))
        print(f"{name}: top-1 {rows[-1][1]:.2f} (FP32 {fp32:.2f}), {seconds:.0f} s", flush=True)
    load_after = os.getloadavg()
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    lines = [f"# MQBench's flow, its ptq_reconstruction against the drop-in: ResNet-20 {args.bits}", "",
             f"Made by `{command}` on {time.strftime('%Y-%m-%d')}: {torch.get_num_threads()} threads, one process, "
             f"load average {load_before[0]:.2f} before and {load_after[0]:.2f} after. {args.images} calibration "
             f"images (batch 32), {args.iters} iterations per block, keep probability {args.prob:g} "
             f"({'QDrop' if args.prob < 1 else 'always-on activations, MQBench BRECQ'}), seed {args.seed} (torch "
             "and numpy, before each call); "
             f"MQBench's calibration (EMA-MSE / MSE observers) took {calibration_s:.0f} s and is shared. Time is the "
             "reconstruction call end to end (caching, learning, hardening). All 10,000 test images.", "",
             "| reconstruction | top-1 % | FP32 top-1 % (same images) | seconds |", "|---|---|---|---|"]
    lines += [f"| {n} | {t:.2f} | {fp32:.2f} | {s:.0f} |" for n, t, s in rows]
    if not args.skip_mqbench:
        lines.append(f"\nDrop-in / MQBench time: {rows[1][2] / rows[0][2]:.2f}x.")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_results(os.path.join(REPO, args.results), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
