#!/usr/bin/env python
"""MQBench's `ptq_reconstruction` and the drop-in, unit by unit, on one MQBench-prepared and calibrated ResNet-20:
for each traced unit, the reconstruction loss along its iterations (means over windows), the rounding regulariser
at the end, and the activation steps it ends with. A diagnostic for the gap the drop-in benchmark shows at W2A2
with keep probability 1 (`benchmarks/results/brecq_joint_reference/`, `docs/MQBENCH_GAP.md`).

    python benchmarks/mqbench_loop_trace.py                      # 256 calibration images, 2,000 iterations
    python benchmarks/mqbench_loop_trace.py --units 11 --bound-grad stop --batch-draw fixed   # every unit

MQBench's run is stopped after `--units` units (three by default; its `subgraph_reconstruction` is wrapped to record
and stop); the drop-in runs the whole network and keeps every iteration's loss (`log_every: 1`). Both start from the
same calibrated model and seed (torch and numpy); with `--batch-draw fixed` both draw the same batches.
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
WINDOWS = (0, 400, 1000, 1900)   # 100-iteration windows: start, end of warm-up, middle, end


class _Stop(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--bits", default="W2A2")
    parser.add_argument("--prob", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1005)
    parser.add_argument("--bound-grad", choices=("pass", "stop"), default="pass", help="the drop-in's quant.a.bound_grad")
    parser.add_argument("--batch-draw", choices=("random", "fixed"), default="random",
                        help="the drop-in's algorithm.batch_draw")
    parser.add_argument("--units", type=int, default=3, help="units traced (MQBench's run stops after them)")
    parser.add_argument("--results", default="benchmarks/results/brecq_joint_reference/loop_trace.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)
    from easydict import EasyDict
    import mqbench.advanced_ptq as mq
    from ptqkit.from_mqbench import calibrate_as_mqbench, ptq_reconstruction
    from mqbench_dropin import prepared_as_mqbench, resnet20_and_calibration
    from reconstruction_resnet20 import write_results

    w_bits, a_bits = (int(x) for x in args.bits[1:].split("A"))
    fp, _, _, calib = resnet20_and_calibration(args.images, args.seed)
    model = prepared_as_mqbench(fp, w_bits, a_bits)
    batches = [calib[i:i + 32] for i in range(0, len(calib), 32)]
    calibrate_as_mqbench(model, batches)
    config = EasyDict(pattern="block", scale_lr=4.0e-5, warm_up=0.2, weight=0.01, max_count=2000, b_range=[20, 2],
                      keep_gpu=False, round_mode="learned_hard_sigmoid", prob=args.prob)

    losses, steps, unit = {}, {}, [0]
    original_call, original_sub = mq.LossFunction.__call__, mq.subgraph_reconstruction

    def call(self, pred, tgt):
        total = original_call(self, pred, tgt)
        rec = float(mq.lp_loss(pred, tgt, p=self.p))
        losses.setdefault(unit[0], []).append((rec, float(total) - rec))
        return total

    def sub(subgraph, inputs, outputs, cfg_):
        original_sub(subgraph, inputs, outputs, cfg_)
        steps[unit[0]] = {n: float(m.scale) for n, m in subgraph.named_modules()
                          if n.endswith("post_act_fake_quantizer")}
        unit[0] += 1
        if unit[0] == args.units:
            raise _Stop()

    mq.LossFunction.__call__, mq.subgraph_reconstruction = call, sub
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    quiet, builtins.print = builtins.print, (lambda *a, **k: None)   # MQBench prints every 500 iterations
    try:
        mq.ptq_reconstruction(copy.deepcopy(model), batches, config)
    except _Stop:
        pass
    finally:
        builtins.print = quiet
        mq.LossFunction.__call__, mq.subgraph_reconstruction = original_call, original_sub
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    ours = ptq_reconstruction(copy.deepcopy(model), batches, EasyDict(config, log_every=1, bound_grad=args.bound_grad,
                                                                      batch_draw=args.batch_draw))
    units = ours.ptq_results["units"]
    our_steps = {n: float(m.scale) for n, m in ours.named_modules() if n.endswith("post_act_fake_quantizer")}

    def windows(xs):
        return " / ".join(f"{sum(xs[a:a + 100]) / len(xs[a:a + 100]):.4g}" for a in WINDOWS)

    lines = ["| unit | loop | reconstruction loss, mean over iterations " + ", ".join(f"{a}–{a + 99}" for a in WINDOWS)
             + " | rounding regulariser at the end | activation steps at the end |", "|---|---|---|---|---|"]
    for k in range(min(args.units, len(losses))):
        mq_rec = [r for r, _ in losses[k]]
        hist = units[k]["history"]
        ours_round = [x for x in hist["round"] if x is not None]
        names = list(steps[k])
        lines.append(f"| {units[k]['name']} | MQBench | {windows(mq_rec)} | {losses[k][-1][1]:.3g} | "
                     + ", ".join(f"{n.replace('_post_act_fake_quantizer', '')} {steps[k][n]:.4f}" for n in names) + " |")
        lines.append(f"| | drop-in ({args.bound_grad}, {args.batch_draw}) | {windows(hist['rec'])} | {ours_round[-1]:.3g} | "
                     + ", ".join(f"{n.replace('_post_act_fake_quantizer', '')} {our_steps[n]:.4f}" for n in names) + " |")
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    text = (f"# MQBench's loop and the drop-in, unit by unit: ResNet-20 {args.bits}, keep probability {args.prob:g}\n\n"
            f"Made by `{command}` on {time.strftime('%Y-%m-%d')} (CPU, 1 thread). One MQBench-prepared model "
            f"calibrated on {args.images} images (EMA-MSE / MSE observers), seed {args.seed}, 2,000 iterations per "
            "unit, batches of 32; the activation steps start from the calibration in both.\n\n" + "\n".join(lines) + "\n")
    write_results(os.path.join(REPO, args.results), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
