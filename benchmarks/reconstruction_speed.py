#!/usr/bin/env python
"""Reconstruction speed: ptqkit's engine against its floor and against MQBench's stock
`mqbench.advanced_ptq.ptq_reconstruction`, QDrop settings, in ONE process, from the same calibrated model, images,
seed, iteration budget and thread count; then the shipped command end to end.

    python benchmarks/reconstruction_speed.py                         # ResNet-20 W2A4, 2,000 it/unit, 2 threads
    python benchmarks/reconstruction_speed.py --model mobilenet_v2 --bits W4A4 --iters 100 --images 128 \\
        --results benchmarks/results/reconstruction_speed_mobilenet_v2.md --no-end-to-end
    python benchmarks/reconstruction_speed.py --compute-dtype bfloat16     # + the bf16 floor and engine rows

What is timed, each in this process, one after another, on `--threads` torch threads:
- floor, per unit: the unit's forward and backward in FP32 with every quantizer off (`fp_mode`), the same batch
  drawn from the same cached FP inputs, the engine's reconstruction loss, weight gradients, no input gradient,
  `--floor-iters` iterations after 20 of warm-up. What no reconstruction of that unit can beat on this machine.
- the engine: `Engine.run` with QDrop's phase (keep 0.5, input mix 0.5, λ per architecture, β 20→2, warm-up 0.2,
  step lr 4e-5 cosine) and `act_init_images: 0`, so that it starts from the same ranges as MQBench. Loop alone =
  the sum of the units' `loop_seconds` (the iterations, nothing else); whole reconstruction = `Engine.run` wall
  clock (caching, hardening, unit errors included).
- MQBench: every quantizer turned back into the stock MQBench class it derives from (`AdaRoundFakeQuantize`,
  `QDropFakeQuantize`, same state), then `ptq_reconstruction` with the same hyper-parameters; its loop alone is
  the time inside its `subgraph_reconstruction` (the iterations and their set-up), the rest is its caching.
- with `--compute-dtype bfloat16` (runtime.compute_dtype), after the FP32 engine: the bf16 floor (the same units'
  forward under `torch.autocast` with quantizers off, the loss in float32, the backward) and the engine again with
  `compute_dtype` bfloat16 from the same calibrated model and seed. The JSON gets `bf16_floor_ratio` (bf16 engine
  loop over the FP32 floor: what bf16 gains against the FP32 floor), `bf16_top1`, and the bf16 loop over the bf16
  floor.
- top-1 of both on the evaluation images with FP32 on the same images, and peak resident memory of each (the
  high-water mark reset before it).
- end to end: the shipped command (`--end-to-end-config`, W2A4) as a user runs it, in a subprocess, with the load
  average before and after.
Results go to a markdown file (hand-written notes after its "## Notes" heading are kept) and, with the headline
figures as keys, to a JSON file beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reconstruction_resnet20 as rr  # noqa: E402
from calibration_speed import _rss_mb, config_tree, reset_peak_rss  # noqa: E402
from ptqkit import assets as ptq_assets  # noqa: E402


class AttrDict(dict):
    """MQBench reads its config both as `config.key` and with `in`."""
    __getattr__ = dict.__getitem__


def to_stock_mqbench(qmodel) -> None:
    """Every ptqkit quantizer back to the MQBench class it derives from; the state stays as calibrated."""
    from mqbench.fake_quantize.adaround_quantizer import AdaRoundFakeQuantize
    from mqbench.fake_quantize.qdrop_quantizer import QDropFakeQuantize
    from ptqkit.quant.quantizers import ActQuantizer, Switches, WeightQuantizer, fake_quantizers
    # Python refuses a __class__ change between classes whose bases differ in layout; with this toolkit's switch
    # mixin kept (its enable_/disable_ methods write MQBench's own buffers, as the stock ones do), every forward,
    # backward and observer is MQBench's.
    stock_weight = type("AdaRoundFakeQuantize", (Switches, AdaRoundFakeQuantize), {})
    stock_act = type("QDropFakeQuantize", (Switches, QDropFakeQuantize), {})
    for _, q in fake_quantizers(qmodel):
        if isinstance(q, WeightQuantizer):
            q.__class__ = stock_weight
        elif isinstance(q, ActQuantizer):
            q.__class__ = stock_act


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


def unit_floors(qmodel, units, images, device, batch: int, iters: int, loss_fn,
                dtype: torch.dtype = torch.float32) -> list[float]:
    """Seconds per iteration of each unit's forward + backward (weight gradients only), quantizers off: in FP32, or
    the forward under autocast to `dtype` as the engine's loop runs it (inputs, targets and the loss in FP32)."""
    from ptqkit import precision
    from ptqkit.algorithms.engine import prefix_values, run_batched
    from ptqkit.algorithms.graph import unit_module
    from ptqkit.quant.quantizers import fp_mode
    floors = []
    for param in qmodel.parameters():   # the engine's convention: nothing learns but what it asks for
        param.requires_grad_(False)
    for unit in units:
        module = unit_module(qmodel, unit)
        weights = [layer.weight for layer, _ in unit.weight_quantizers]
        with fp_mode(qmodel):
            (inputs,) = prefix_values(qmodel, [unit.input], images, 64, device, device, torch.float32)
            targets = run_batched(module, inputs, 64, device, device, torch.float32)
            saved = [w.requires_grad for w in weights]
            for w in weights:
                w.requires_grad_(True)
            try:
                def step():
                    idx = torch.randint(0, len(inputs), (batch,))
                    with precision.autocast(device, dtype):
                        out = module(inputs[idx])
                    loss = loss_fn(out, targets[idx], 2.0)
                    for w in weights:
                        w.grad = None
                    loss.backward()
                for _ in range(20):
                    step()
                start = time.perf_counter()
                for _ in range(iters):
                    step()
                floors.append((time.perf_counter() - start) / iters)
            finally:
                for w, flag in zip(weights, saved):
                    w.requires_grad_(flag)
                    w.grad = None
    return floors


def end_to_end(config: str, bits: str, out_dir: str, extra: tuple = ()) -> dict:
    w, a = bits.upper().lstrip("W").split("A")
    cmd = [sys.executable, "ptq_main.py", "--config", config, "--set", f"quant.w.bits={w}", "--set",
           f"quant.a.bits={a}", "--set", f"runtime.output_dir={out_dir}", *extra, "--quiet"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()
    if proc.returncode != 0:
        raise SystemExit(f"end-to-end run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    line = proc.stdout.strip().splitlines()[-1]
    run_dir = line.rsplit("-> ", 1)[-1].strip()
    results = json.load(open(os.path.join(REPO, run_dir, "results.json")))
    return {"command": " ".join(["python"] + cmd[1:-1]), "seconds": seconds, "load_before": load_before,
            "load_after": load_after, "line": line, "phase_seconds": results["seconds"],
            "top1": results["quant"]["top1"], "fp32_top1": results["fp32"]["top1"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=("resnet20", "mobilenet_v2"),
                        help="CIFAR-10 ResNet-20 or ImageNet MobileNetV2 on the ImageNet sample asset")
    parser.add_argument("--bits", default="W2A4")
    parser.add_argument("--iters", type=int, default=2000, help="iterations per unit, engine and MQBench")
    parser.add_argument("--floor-iters", type=int, default=300, help="timed iterations per unit of the floor")
    parser.add_argument("--images", type=int, default=1024, help="calibration images (seed 1005)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--assets", default=ptq_assets.root(),
                        help="the assets root (docs/ASSETS.md; default $PTQKIT_ASSETS, else ~/.cache/ptqkit/assets)")
    parser.add_argument("--results", default="benchmarks/results/reconstruction_speed.md")
    parser.add_argument("--no-mqbench", action="store_true")
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--end-to-end-config", default="configs/cifar10/resnet20_w4a4_qdrop.yaml")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="bfloat16: also the bf16 floor and the engine with runtime.compute_dtype bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)
    import warnings
    warnings.filterwarnings("ignore")

    from ptqkit import data
    import mqbench.advanced_ptq as mq_ptq
    from ptqkit.algorithms.base import RunContext
    from ptqkit.algorithms.engine import Engine, EngineSettings, reconstruction_loss
    from ptqkit.algorithms.registry import get_algorithm
    from ptqkit import pipeline, precision
    from ptqkit.algorithms import heap
    from ptqkit.quant import prepare as pq
    from ptqkit.config import validate

    bf16 = args.compute_dtype == "bfloat16"
    if bf16 and not precision.bf16_supported("cpu"):
        raise SystemExit("--compute-dtype bfloat16: this CPU has no native bfloat16 (AVX512-BF16, AMX or ARM BF16)")
    load_start = os.getloadavg()
    tree = config_tree(args.model, args.assets, "hist_mse", args.images, 2.4, args.bits)
    if args.model == "resnet20":
        tree["model"]["leaf_modules"] = ["OptionAShortcut"]   # MQBench's block search cannot walk its slices
    tree["data"]["calibration"]["batch_size"] = args.batch
    tree["data"]["evaluation"]["limit"] = args.eval_limit
    tree["algorithm"] = {"name": "qdrop", "iters": args.iters, "batch_size": args.batch, "act_init_images": 0}
    cfg = validate(tree)
    device = torch.device("cpu")
    pipeline.seed_everything(1005)
    fp_model = pipeline.build_fp_model(cfg, device)
    splits = data.make_splits(cfg.data)
    calib, calib_labels = data.draw_calibration(splits, cfg.data.calibration)
    xs, ys = zip(*data.evaluation_loader(splits, cfg.data.evaluation))
    eval_images, eval_labels = torch.cat(xs), torch.cat(ys)
    fp32 = top1(fp_model, eval_images, eval_labels)

    method = get_algorithm("qdrop")(cfg.algorithm)
    ctx = RunContext(cfg, fp_model, calib, calib_labels, device, show_progress=False)
    calibrated, _ = method.prepare(ctx)
    pq.calibrate(calibrated, calib, args.batch, device)
    rtn = top1(calibrated, eval_images, eval_labels)
    phases = method.phases()

    # ------------------------------------------------------------------------------------------ engine
    ours = copy.deepcopy(calibrated)
    units = method.units(ours, ctx)
    with heap.retained_heap(True):   # the engine's own allocator setting, for the floor too
        torch.manual_seed(1005)
        floor_model = copy.deepcopy(calibrated)
        floors = unit_floors(floor_model, method.units(floor_model, ctx), calib, device, args.batch, args.floor_iters,
                             reconstruction_loss)
        del floor_model
    settings = EngineSettings(batch_size=args.batch, show_progress=False)
    torch.manual_seed(1005)
    history, engine_wall, engine_peak, engine_start_rss = measure(
        lambda: Engine(ours, units, calib, device, settings).run(phases))
    engine_top1 = top1(ours, eval_images, eval_labels)
    del ours
    bf = None
    if bf16:   # the same units from the same calibrated model and seed, the loop under autocast
        with heap.retained_heap(True):
            torch.manual_seed(1005)
            floor_model = copy.deepcopy(calibrated)
            bf_floors = unit_floors(floor_model, method.units(floor_model, ctx), calib, device, args.batch,
                                    args.floor_iters, reconstruction_loss, torch.bfloat16)
            del floor_model
        ours_bf = copy.deepcopy(calibrated)
        bf_units = method.units(ours_bf, ctx)
        bf_settings = EngineSettings(batch_size=args.batch, show_progress=False, compute_dtype=torch.bfloat16)
        torch.manual_seed(1005)
        bf_history, bf_wall, bf_peak, bf_start_rss = measure(
            lambda: Engine(ours_bf, bf_units, calib, device, bf_settings).run(phases))
        bf = {"history": bf_history, "floors": bf_floors, "wall": bf_wall, "peak": bf_peak,
              "start_rss": bf_start_rss, "top1": top1(ours_bf, eval_images, eval_labels),
              "loop": sum(r["loop_seconds"] for r in bf_history),
              "floor_loop": sum(f * r["iterations"] for f, r in zip(bf_floors, bf_history))}
        del ours_bf
    unit_rows = []
    for record, floor in zip(history, floors):
        per_it = record["loop_seconds"] / record["iterations"]
        unit_rows.append({"unit": record["name"], "floor_ms": 1000 * floor, "engine_ms": 1000 * per_it,
                          "ratio": per_it / floor})
    if bf:
        for row, record, floor in zip(unit_rows, bf["history"], bf["floors"]):
            per_it = record["loop_seconds"] / record["iterations"]
            row.update(bf16_floor_ms=1000 * floor, bf16_engine_ms=1000 * per_it,
                       bf16_over_fp32_floor=per_it / (row["floor_ms"] / 1000), bf16_over_bf16_floor=per_it / floor)
    engine_loop = sum(r["loop_seconds"] for r in history)
    floor_loop = sum(f * r["iterations"] for f, r in zip(floors, history))
    iters_total = sum(r["iterations"] for r in history)

    # ----------------------------------------------------------------------------------------- MQBench
    mq = None
    if not args.no_mqbench:
        config = AttrDict(pattern="block", scale_lr=4e-5, warm_up=0.2, weight=cfg.algorithm.weight,
                          max_count=args.iters, b_range=[20, 2], keep_gpu=False, round_mode="learned_hard_sigmoid",
                          prob=0.5)
        batches = [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)]
        original = mq_ptq.subgraph_reconstruction
        loops: list[float] = []

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                loops.append(time.perf_counter() - start)
        stock = copy.deepcopy(calibrated)
        to_stock_mqbench(stock)
        mq_ptq.subgraph_reconstruction = timed
        torch.manual_seed(1005)
        import builtins
        quiet_print, builtins.print = builtins.print, (lambda *a, **k: None)  # MQBench prints every 500 iterations
        try:
            stock_out, mq_wall, mq_peak, mq_start_rss = measure(
                lambda: mq_ptq.ptq_reconstruction(stock, batches, config))
        finally:
            mq_ptq.subgraph_reconstruction = original
            builtins.print = quiet_print
        mq = {"units": len(loops), "loop": sum(loops), "wall": mq_wall, "peak": mq_peak, "start_rss": mq_start_rss,
              "iters": len(loops) * args.iters, "top1": top1(stock_out, eval_images, eval_labels),
              "unit_ms": [1000 * s / args.iters for s in loops]}
        del stock, stock_out
    load_before_e2e = os.getloadavg()

    e2e = e2e_bf16 = None
    if not args.no_end_to_end:
        e2e = end_to_end(args.end_to_end_config, args.bits, "runs/speed_end_to_end")
        if bf16:
            e2e_bf16 = end_to_end(args.end_to_end_config, args.bits, "runs/speed_end_to_end_bf16",
                                  ("--set", "runtime.compute_dtype=bfloat16"))

    # ----------------------------------------------------------------------------------------- report
    engine_s_it = engine_loop / iters_total
    lines = [
        f"# Reconstruction speed: {cfg.model.name} {args.bits}, QDrop settings", "",
        f"Made by `python {' '.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d')}: one process, {args.threads} torch threads, {os.cpu_count()}-core CPU, "
        f"torch {torch.__version__}, Python {platform.python_version()}. Load average (1 min) at the start "
        f"{load_start[0]:.2f}, before the end-to-end run {load_before_e2e[0]:.2f}; nothing else of ours ran.", "",
        f"One checkpoint (the assets'), per-channel weights, first/last-layer weights and the last layer's input at 8 bit, "
        f"histogram-MSE calibration on {len(calib)} images (seed 1005), shared by all; {args.iters} iterations per "
        f"unit at batch {args.batch}; top-1 on {len(eval_images)} evaluation images, FP32 {fp32:.2f} %, "
        f"round-to-nearest from the shared calibration {rtn:.2f} %.", "",
        "## Loop alone, per unit (ms per iteration)", "",
        "| unit | floor (FP32 fwd+bwd) | engine | engine / floor |" + (" MQBench |" if mq else "")
        + (" bf16 floor | bf16 engine | bf16 engine / FP32 floor |" if bf else ""),
        "|---|---|---|---|" + ("---|" if mq else "") + ("---|---|---|" if bf else "")]
    for i, r in enumerate(unit_rows):
        mq_cell = f" {mq['unit_ms'][i]:.2f} |" if mq and len(mq["unit_ms"]) == len(unit_rows) else (" – |" if mq else "")
        bf_cell = (f" {r['bf16_floor_ms']:.2f} | {r['bf16_engine_ms']:.2f} | {r['bf16_over_fp32_floor']:.2f} |"
                   if bf else "")
        lines.append(f"| {r['unit']} | {r['floor_ms']:.2f} | {r['engine_ms']:.2f} | {r['ratio']:.2f} |{mq_cell}"
                     + bf_cell)
    lines.append(f"| **all ({iters_total} iterations)** | {1000 * floor_loop / iters_total:.2f} | "
                 f"{1000 * engine_s_it:.2f} | **{engine_loop / floor_loop:.2f}** |"
                 + (f" {1000 * mq['loop'] / mq['iters']:.2f} |" if mq else "")
                 + (f" {1000 * bf['floor_loop'] / iters_total:.2f} | {1000 * bf['loop'] / iters_total:.2f} | "
                    f"**{bf['loop'] / floor_loop:.2f}** |" if bf else ""))
    lines += ["", "## Side by side", "",
              "| | loop s | s / iteration (loop) | whole reconstruction s | peak RSS MB (start) | top-1 % | "
              "FP32 top-1 % |", "|---|---|---|---|---|---|---|",
              f"| floor | {floor_loop:.0f} | {floor_loop / iters_total:.4f} | – | – | – | {fp32:.2f} |",
              f"| ptqkit engine | {engine_loop:.0f} | {engine_s_it:.4f} | {engine_wall:.0f} | "
              f"{engine_peak:.0f} ({engine_start_rss:.0f}) | {engine_top1:.2f} | {fp32:.2f} |"]
    out = {"model": cfg.model.name, "bits": args.bits, "threads": args.threads, "iters_per_unit": args.iters,
           "units": len(unit_rows), "floor_ratio": engine_loop / floor_loop, "engine_top1": engine_top1,
           "fp32_top1": fp32, "rtn_top1": rtn, "engine_loop_seconds": engine_loop,
           "engine_reconstruction_seconds": engine_wall, "floor_loop_seconds": floor_loop,
           "engine_peak_rss_mb": engine_peak, "per_unit": unit_rows,
           "load_average_start": load_start[0], "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(["python", os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}
    if bf:
        lines += [f"| bf16 floor | {bf['floor_loop']:.0f} | {bf['floor_loop'] / iters_total:.4f} | – | – | – | "
                  f"{fp32:.2f} |",
                  f"| ptqkit engine, bf16 | {bf['loop']:.0f} | {bf['loop'] / iters_total:.4f} | {bf['wall']:.0f} | "
                  f"{bf['peak']:.0f} ({bf['start_rss']:.0f}) | {bf['top1']:.2f} | {fp32:.2f} |"]
        out.update(bf16_floor_ratio=bf["loop"] / floor_loop, bf16_top1=bf["top1"],
                   bf16_over_bf16_floor=bf["loop"] / bf["floor_loop"], bf16_engine_loop_seconds=bf["loop"],
                   bf16_floor_loop_seconds=bf["floor_loop"], bf16_reconstruction_seconds=bf["wall"],
                   bf16_peak_rss_mb=bf["peak"])
    if mq:
        mq_s_it = mq["loop"] / mq["iters"]
        lines.append(f"| MQBench ptq_reconstruction (stock) | {mq['loop']:.0f} | {mq_s_it:.4f} | {mq['wall']:.0f} | "
                     f"{mq['peak']:.0f} ({mq['start_rss']:.0f}) | {mq['top1']:.2f} | {fp32:.2f} |")
        lines += ["", f"Engine / MQBench: loop per iteration **{engine_s_it / mq_s_it:.2f}x**, whole reconstruction "
                  f"**{engine_wall / mq['wall']:.2f}x**, peak RSS **{engine_peak / mq['peak']:.2f}x**; top-1 "
                  f"{engine_top1:.2f} vs {mq['top1']:.2f} (FP32 {fp32:.2f})."]
        out.update(loop_ratio=engine_s_it / mq_s_it, wall_ratio=engine_wall / mq["wall"],
                   peak_rss_ratio=engine_peak / mq["peak"], mqbench_top1=mq["top1"], mqbench_loop_seconds=mq["loop"],
                   mqbench_reconstruction_seconds=mq["wall"], mqbench_peak_rss_mb=mq["peak"])
    lines += ["", f"Engine loop / floor, all units: **{engine_loop / floor_loop:.2f}x**; worst unit "
              f"{max(unit_rows, key=lambda r: r['ratio'])['unit']} "
              f"{max(r['ratio'] for r in unit_rows):.2f}x."]
    if bf:
        lines += ["", f"bf16 engine loop / FP32 floor, all units: **{bf['loop'] / floor_loop:.2f}x** "
                  f"(bf16 loop / bf16 floor {bf['loop'] / bf['floor_loop']:.2f}x); top-1 {bf['top1']:.2f} in bf16 "
                  f"against {engine_top1:.2f} in FP32 (one seed)."]
    if e2e:
        ps = e2e["phase_seconds"]
        lines += ["", "## End to end", "",
                  f"`{e2e['command']}` (2 threads: torch's default on this machine): **{e2e['seconds']:.0f} s** "
                  f"({e2e['seconds'] / 60:.1f} min), load average {e2e['load_before'][0]:.2f} before and "
                  f"{e2e['load_after'][0]:.2f} after; phases (s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in ps.items())
                  + f". It printed: `{e2e['line']}`"]
        out.update(end_to_end_seconds=e2e["seconds"], end_to_end_top1=e2e["top1"],
                   end_to_end_load=[e2e["load_before"][0], e2e["load_after"][0]], end_to_end_phases=ps)
    if e2e_bf16:
        ps = e2e_bf16["phase_seconds"]
        lines += ["", f"With `runtime.compute_dtype=bfloat16`: `{e2e_bf16['command']}`: "
                  f"**{e2e_bf16['seconds']:.0f} s** ({e2e_bf16['seconds'] / 60:.1f} min), load average "
                  f"{e2e_bf16['load_before'][0]:.2f} before and {e2e_bf16['load_after'][0]:.2f} after; phases (s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in ps.items())
                  + f". It printed: `{e2e_bf16['line']}`"]
        out.update(bf16_end_to_end_seconds=e2e_bf16["seconds"], bf16_end_to_end_top1=e2e_bf16["top1"],
                   bf16_end_to_end_load=[e2e_bf16["load_before"][0], e2e_bf16["load_after"][0]],
                   bf16_end_to_end_phases=ps)
    out["load_average_end"] = os.getloadavg()[0]
    lines.append("")
    lines.append(f"Load average (1 min) at the end: {out['load_average_end']:.2f}.")
    text = "\n".join(lines + [""])
    print(text)
    rr.write_results(os.path.join(REPO, args.results), text)
    with open(os.path.join(REPO, os.path.splitext(args.results)[0] + ".json"), "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
