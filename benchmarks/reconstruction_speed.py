#!/usr/bin/env python
"""Reconstruction speed (issue 9): MQBench's stock `mqbench.advanced_ptq.ptq_reconstruction` (QDrop settings)
against ptqkit's engine (`qdrop`), in ONE process, from the same calibrated quantized model, images, seed and
iteration budget.

    python benchmarks/reconstruction_speed.py                          # ResNet-20, W2A4, 500 iterations per unit
    python benchmarks/reconstruction_speed.py --iters 2000 --threads 2
    python benchmarks/reconstruction_speed.py --model mobilenet_v2 --bits W4A8 --iters 50 --images 64 \
        --results benchmarks/results/reconstruction_speed_mobilenet_v2.md

How the comparison is kept fair: the toolkit prepares and calibrates one model (MQBench `prepare_by_platform`,
Academic, our quantizer subclasses, the 8-bit conventions, the calibration images); it is deep-copied twice. One copy
gets ptqkit's engine with QDrop's settings and no re-initialisation of the activation steps (`act_init_images: 0`,
so both start from the same ranges). In the other copy every quantizer is turned back into the stock MQBench class
it derives from (`AdaRoundFakeQuantize`, `QDropFakeQuantize`, same state), and MQBench's own
`ptq_reconstruction` runs on it with the same hyper-parameters (block pattern, prob 0.5, the per-architecture λ,
β 20→2, warm-up 0.2, step lr 4e-5), on the same calibration images in batches of `--batch`. MQBench finds its own blocks; the iterations
per unit are the same. The CIFAR option-A shortcut is a leaf module for both (MQBench's block search cannot walk the
slices inside it on Python 3.11).

MQBench runs twice: stock, and inside the same `ptqkit.heap.retained_heap()` scope the engine runs under on CPU
(freed memory kept in the glibc heap). The target ratio is against stock MQBench; the second row shows how much of
the engine's lead is that allocator setting, which any process could also get from glibc's environment variables.

Measured for each: wall seconds of the whole reconstruction (caching included), seconds per iteration (that over
the iterations), peak resident memory during it (high-water mark reset before it), top-1 on the evaluation images
with FP32 on the same images. The calibration-speed half of issue 9 is `benchmarks/calibration_speed.py`.
"""
from __future__ import annotations

import argparse
import copy
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
from calibration_speed import _rss_mb, config_tree, reset_peak_rss  # noqa: E402


class AttrDict(dict):
    """MQBench reads its config both as `config.key` and with `in`."""
    __getattr__ = dict.__getitem__


def to_stock_mqbench(qmodel) -> None:
    """Every ptqkit quantizer back to the MQBench class it derives from; the state stays as calibrated."""
    from mqbench.fake_quantize.adaround_quantizer import AdaRoundFakeQuantize
    from mqbench.fake_quantize.qdrop_quantizer import QDropFakeQuantize
    from algorithms.quantizers import ActQuantizer, WeightQuantizer, fake_quantizers
    for _, q in fake_quantizers(qmodel):
        if isinstance(q, WeightQuantizer):
            q.__class__ = AdaRoundFakeQuantize
        elif isinstance(q, ActQuantizer):
            q.__class__ = QDropFakeQuantize


@torch.no_grad()
def top1(model, images, labels, batch=500) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(images), batch))
    return 100.0 * correct / len(images)


def measure(fn):
    reset_peak_rss()
    start_rss = _rss_mb("VmRSS")
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start, _rss_mb("VmHWM"), start_rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=("resnet20", "mobilenet_v2"),
                        help="CIFAR-10 ResNet-20 or ImageNet MobileNetV2 on the shared ImageNet sample")
    parser.add_argument("--bits", default="W2A4")
    parser.add_argument("--iters", type=int, default=500, help="iterations per unit, both methods")
    parser.add_argument("--images", type=int, default=1024, help="calibration images (seed 1005)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--assets", default=os.path.normpath(os.path.join(REPO, "..", "shared", "assets")))
    parser.add_argument("--results", default="benchmarks/results/reconstruction_speed.md")
    parser.add_argument("--no-heap-row", action="store_true", help="skip MQBench under the engine's heap setting")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)
    import warnings
    warnings.filterwarnings("ignore")

    import data
    import mqbench.advanced_ptq as mq_ptq
    from algorithms.base import RunContext
    from algorithms.engine import Engine, EngineSettings
    from algorithms.registry import get_algorithm
    from ptqkit import heap, pipeline
    from ptqkit import quantize as pq
    from ptqkit.config import validate

    tree = config_tree(args.model, args.assets, "hist_mse", args.images, 2.4, args.bits)
    if args.model == "resnet20":
        tree["model"]["leaf_modules"] = ["OptionAShortcut"]
    tree["data"]["calibration"]["batch_size"] = args.batch
    tree["data"]["evaluation"]["limit"] = args.eval_limit
    tree["algorithm"] = {"name": "qdrop", "iters": args.iters, "batch_size": args.batch, "act_init_images": 0}
    cfg = validate(tree)
    device = torch.device("cpu")
    pipeline.seed_everything(1005)
    fp_model = pipeline.build_fp_model(cfg, device)
    splits = data.make_splits(cfg.data)
    calib, calib_labels = data.draw_calibration(splits, cfg.data.calibration)
    loader = data.evaluation_loader(splits, cfg.data.evaluation)
    xs, ys = zip(*loader)
    eval_images, eval_labels = torch.cat(xs), torch.cat(ys)
    fp32 = top1(fp_model, eval_images, eval_labels)

    method = get_algorithm("qdrop")(cfg.algorithm)
    ctx = RunContext(cfg, fp_model, calib, calib_labels, device, show_progress=False)
    calibrated, _ = method.prepare(ctx)
    pq.calibrate(calibrated, calib, args.batch, device)
    rtn = top1(calibrated, eval_images, eval_labels)

    rows = []
    # ---------------------------------------------------------------------------------------- ptqkit
    ours = copy.deepcopy(calibrated)
    units = method.units(ours, ctx)

    def run_ours():
        settings = EngineSettings(batch_size=args.batch, show_progress=False)
        return Engine(ours, units, calib, device, settings).run(method.phases())
    torch.manual_seed(1005)
    history, seconds, peak, start_rss = measure(run_ours)
    iters = sum(r["iterations"] for r in history)
    rows.append(("ptqkit engine (qdrop)", len(units), iters, seconds, peak, start_rss,
                 top1(ours, eval_images, eval_labels)))
    del ours
    # ---------------------------------------------------------------------------------------- MQBench
    config = AttrDict(pattern="block", scale_lr=4e-5, warm_up=0.2, weight=cfg.algorithm.weight,
                      max_count=args.iters, b_range=[20, 2], keep_gpu=False, round_mode="learned_hard_sigmoid", prob=0.5)
    batches = [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)]
    original = mq_ptq.subgraph_reconstruction
    variants = [("MQBench ptq_reconstruction (QDrop), stock", False)]
    if not args.no_heap_row:
        variants.append(("MQBench ptq_reconstruction (QDrop) + the engine's heap setting", True))
    for name, retain in variants:
        stock = copy.deepcopy(calibrated)
        to_stock_mqbench(stock)
        count = {"units": 0}

        def counting(*a, **k):
            count["units"] += 1
            return original(*a, **k)
        mq_ptq.subgraph_reconstruction = counting
        torch.manual_seed(1005)
        try:
            with heap.retained_heap(retain):
                stock_out, seconds, peak, start_rss = measure(lambda: mq_ptq.ptq_reconstruction(stock, batches,
                                                                                              config))
        finally:
            mq_ptq.subgraph_reconstruction = original
        rows.append((name, count["units"], count["units"] * args.iters, seconds, peak, start_rss,
                     top1(stock_out, eval_images, eval_labels)))
        del stock, stock_out

    ours_row, mq_row = rows[:2]
    s_it = lambda r: r[3] / r[2]  # noqa: E731
    lines = [
        "# Reconstruction speed: ptqkit's engine against MQBench's stock ptq_reconstruction (QDrop)", "",
        f"Made by `python {' '.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d')}: one process, {args.threads} torch thread(s), {os.cpu_count()}-core CPU, "
        f"torch {torch.__version__}, Python {platform.python_version()}; load average at the end "
        f"{os.getloadavg()[0]:.1f}.", "",
        f"{cfg.model.name} (shared checkpoint), {args.bits}, per-channel weights, first/last-layer weights and the "
        f"last layer's input at 8 bit, histogram-MSE calibration on {len(calib)} images (seed 1005), shared by both; "
        f"{args.iters} iterations per unit at batch {args.batch}; top-1 on {len(eval_images)} evaluation images.", "",
        f"FP32 top-1 {fp32:.2f} %; round-to-nearest from the shared calibration {rtn:.2f} %.", "",
        "| reconstruction | units | iterations | wall s | s / iteration | peak RSS MB (start) | top-1 % | "
        "FP32 top-1 % |", "|---|---|---|---|---|---|---|---|"]
    for name, n_units, n_iters, sec, pk, st, acc in rows:
        lines.append(f"| {name} | {n_units} | {n_iters} | {sec:.0f} | {sec / n_iters:.4f} | {pk:.0f} ({st:.0f}) | "
                     f"{acc:.2f} | {fp32:.2f} |")
    lines += ["", f"Iterations per second, ptqkit over stock MQBench: **{s_it(mq_row) / s_it(ours_row):.2f}x**; "
              f"top-1 difference (ptqkit - MQBench): {ours_row[6] - mq_row[6]:+.2f}; peak RSS ptqkit / MQBench: "
              f"{ours_row[4] / mq_row[4]:.2f}."]
    if len(rows) > 2:
        lines.append(f"Against MQBench under the same heap setting: {s_it(rows[2]) / s_it(ours_row):.2f}x iterations "
                     f"per second, peak RSS {ours_row[4] / rows[2][4]:.2f}x.")
    text = "\n".join(lines + [""])
    print(text)
    rr.write_results(os.path.join(REPO, args.results), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
