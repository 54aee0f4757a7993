#!/usr/bin/env python
"""torch.compile of the fake-quant kernels against the C kernels and plain torch ops, on the CPU, in ONE process:
whether the compiled version (inductor: C++/OpenMP here, Triton on CUDA) is close enough to the C kernels to replace
them, and what compiling costs.

    python benchmarks/fakequant_compile.py                # ResNet-20 W2A4 and MobileNetV2 W4A4, 2 threads
    python benchmarks/fakequant_compile.py --models resnet20 --iters 20 --images 64 --repeats 1 \\
        --results /tmp/fakequant_compile_smoke.md        # a check that it runs (no figure to keep)

What is measured, on `--threads` torch threads:
- the reconstruction loop alone (the units' `loop_seconds`: the iterations, nothing else) of QDrop (keep 0.5, input
  mix 0.5) on every unit (or `--units` of them, spread over the network), once per implementation and repeat, the
  three implementations interleaved (c, compiled, torch, c, ...) from the same calibrated model, seed and batches;
  the median over repeats per unit. The keep masks are the same in all three (a hash of key and element index),
  so the runs compute the same values: each unit's final error is printed beside its time;
- compiling: seconds and inductor kernels of each graph (training forward, backward, inference forward, input mix,
  keep mask, soft rounding), compiled once before the loops; graphs compiled during each unit (none expected:
  the tensors are flat and their length dynamic, so a new unit's shapes reuse the graphs).
The decision the toolkit takes from it (ptqkit/quant/kernels.py): the compiled version replaces the C kernels on the
CPU where its loop is within 10 % of theirs; otherwise the C kernels stay for the CPU and CUDA runs the compiled
version. Results go to a markdown file and a JSON file beside it, with the command, commit, threads and the load
average before and after: time it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from calibration_speed import config_tree  # noqa: E402
from reconstruction_resnet20 import write_results  # noqa: E402
from ptqkit import assets as ptq_assets  # noqa: E402
from ptqkit import data, pipeline  # noqa: E402
from ptqkit.algorithms.base import RunContext  # noqa: E402
from ptqkit.algorithms.engine import Engine, EngineSettings  # noqa: E402
from ptqkit.algorithms.registry import get_algorithm  # noqa: E402
from ptqkit.config import validate  # noqa: E402
from ptqkit.quant import kernels  # noqa: E402

IMPLEMENTATIONS = ("c", "compiled", "torch")
BITS = {"resnet20": "W2A4", "mobilenet_v2": "W4A4"}


def compile_costs() -> list[dict]:
    """Each graph compiled alone: seconds, graphs and inductor kernels it added."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, 32, 32, generator=gen)
    scale, zp = torch.tensor([0.1]), torch.zeros(1, dtype=torch.int)
    rows = []
    state = {}

    def train_forward():
        state["x"] = x.clone().requires_grad_()
        state["s"] = scale.clone().requires_grad_()
        state["y"] = kernels.act_fake_quant(state["x"], state["s"], zp, 0, 15, 0.5)

    def soft(beta):
        w = x.reshape(-1)[:50000]
        alpha = torch.randn(w.shape, generator=gen).requires_grad_()
        out, penalty = kernels.soft_rounding(alpha, torch.floor(w / 0.02), torch.full_like(w, 0.02),
                                             torch.zeros_like(w), torch.full_like(w, -8.0), torch.full_like(w, 7.0),
                                             beta)
        (out.sum() + penalty).backward()

    steps = [("training forward (keep 0.5)", train_forward),
             ("backward", lambda: state["y"].sum().backward()),
             ("training forward (keep 1)", lambda: kernels.act_fake_quant(x.clone().requires_grad_(), scale, zp, 0,
                                                                          15, 1.0)),
             ("inference forward (keep 1)", lambda: kernels.act_fake_quant(x, scale, zp, 0, 15, 1.0)),
             ("inference forward (keep 0.5)", lambda: kernels.act_fake_quant(x, scale, zp, 0, 15, 0.5)),
             ("input mix", lambda: kernels.mix_rows(x, x + 1, torch.arange(16), 0.5, "cpu")),
             ("keep mask", lambda: kernels.keep_mask(x.shape, 0.5, "cpu")),
             ("soft rounding (no regulariser)", lambda: soft(None)),
             ("soft rounding with regulariser", lambda: soft(20.0))]
    with kernels.using("compiled"):
        for name, fn in steps:
            before = kernels.compile_stats()
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            after = kernels.compile_stats()
            rows.append({"graph": name, "seconds": round(seconds, 2), "graphs": after["graphs"] - before["graphs"],
                         "kernels": after["kernels"] - before["kernels"]})
    return rows


def spread(items: list, count: int | None) -> list[int]:
    if not count or count >= len(items):
        return list(range(len(items)))
    return sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]


def measure_model(model: str, args) -> dict:
    tree = config_tree(model, args.assets, "hist_mse", args.images, 2.4, BITS[model])
    if model == "resnet20":
        tree["model"]["leaf_modules"] = ["OptionAShortcut"]
    else:
        tree["model"]["algorithm_defaults"] = {"weight": 0.1, "T": 1.0, "lamb_c": 0.005}
        tree["data"]["calibration_fraction"] = 0.5
    tree["algorithm"] = {"name": "qdrop", "iters": args.iters, "batch_size": 32, "act_init_images": 0}
    cfg = validate(tree)
    device = torch.device("cpu")
    pipeline.seed_everything(1005)
    fp_model = pipeline.build_fp_model(cfg, device)
    calib, labels = data.draw_calibration(data.make_splits(cfg.data), cfg.data.calibration)
    method = get_algorithm("qdrop")(cfg.algorithm)
    ctx = RunContext(cfg, fp_model, calib, labels, device, show_progress=False)
    phases = method.run_phases()
    calibrated = method.calibrated_model(ctx, phases)
    picked = spread(method.units(calibrated, ctx), args.units)
    settings = EngineSettings(batch_size=32, show_progress=False)
    times = {impl: {} for impl in IMPLEMENTATIONS}
    errors = {impl: {} for impl in IMPLEMENTATIONS}
    compiled_per_unit = {}
    for repeat in range(args.repeats):
        for impl in IMPLEMENTATIONS:
            qmodel = copy.deepcopy(calibrated)
            units = method.units(qmodel, ctx)
            units = [units[i] for i in picked]
            torch.manual_seed(1005)
            with kernels.using(impl):
                history = Engine(qmodel, units, calib, device, settings).run(phases)
            for record in history:
                times[impl].setdefault(record["name"], []).append(record["loop_seconds"] / record["iterations"])
                errors[impl][record["name"]] = record["final_rec_loss"]
                if impl == "compiled" and repeat == 0:
                    compiled_per_unit[record["name"]] = record.get("compiled")
            del qmodel
            print(f"  {model} repeat {repeat + 1}/{args.repeats} {impl}: "
                  f"{1000 * sum(statistics.median(v) for v in times[impl].values()):.2f} ms per iteration "
                  f"summed over units", flush=True)
    names = list(times["c"])
    rows = [{"unit": n, **{f"{impl}_ms": 1000 * statistics.median(times[impl][n]) for impl in IMPLEMENTATIONS},
             **{f"{impl}_final_error": errors[impl][n] for impl in IMPLEMENTATIONS},
             "graphs_compiled_in_unit": (compiled_per_unit.get(n) or {}).get("graphs")} for n in names]
    totals = {impl: sum(r[f"{impl}_ms"] for r in rows) for impl in IMPLEMENTATIONS}
    return {"model": model, "bits": BITS[model], "iters": args.iters, "images": args.images, "units": rows,
            "total_ms_per_iteration_summed_over_units": totals,
            "compiled_over_c": totals["compiled"] / totals["c"], "torch_over_c": totals["torch"] / totals["c"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,mobilenet_v2")
    parser.add_argument("--iters", type=int, default=500, help="iterations per unit and implementation")
    parser.add_argument("--images", type=int, default=256, help="calibration images (seed 1005)")
    parser.add_argument("--units", type=int, default=None, help="this many units spread over the network "
                                                                  "(default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--assets", default=ptq_assets.root())
    parser.add_argument("--results", default="benchmarks/results/fakequant_compile.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if kernels.library() is None:
        raise SystemExit("the C kernels are not built here (no C compiler?): nothing to compare against")
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    costs = compile_costs()
    if kernels.compile_failed():
        raise SystemExit("torch.compile failed here (see the warning above): nothing to compare")
    models = [measure_model(m, args) for m in args.models.split(",")]
    load_after = os.getloadavg()
    out = {"command": " ".join(["python"] + sys.argv), "commit": pipeline.source_commit(), "started": started,
           "torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after,
           "compile": costs, "models": models}
    worst = max(m["compiled_over_c"] for m in models)
    out["decision"] = ("compiled within 10 % of the C kernels on every model: it can replace them on the CPU"
                       if worst <= 1.10 else
                       f"compiled {worst:.2f}x the C kernels' loop time at worst: the C kernels stay for the CPU, "
                       "CUDA runs the compiled version")
    lines = [f"# torch.compile against the C kernels: the reconstruction loop on the CPU", "",
             f"`{out['command']}` at {out['commit']}, {started}; torch {out['torch']}, {args.threads} threads on "
             f"{out['cores']} cores; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.", "",
             "## Compiling (once per process; graphs are reused by every unit)", "",
             "| graph | seconds | graphs | inductor kernels |", "|---|---|---|---|"]
    lines += [f"| {c['graph']} | {c['seconds']:.1f} | {c['graphs']} | {c['kernels']} |" for c in costs]
    for m in models:
        lines += ["", f"## {m['model']} {m['bits']} QDrop, {m['iters']} iterations per unit, median of "
                      f"{args.repeats}", "",
                  "| unit | C ms/it | compiled ms/it | torch ops ms/it | compiled / C | graphs compiled in the unit |"
                  " final error C / compiled / torch |", "|---|---|---|---|---|---|---|"]
        for r in m["units"]:
            lines.append(f"| {r['unit']} | {r['c_ms']:.3f} | {r['compiled_ms']:.3f} | {r['torch_ms']:.3f} | "
                         f"{r['compiled_ms'] / r['c_ms']:.2f} | {r['graphs_compiled_in_unit']} | "
                         f"{r['c_final_error']:.5g} / {r['compiled_final_error']:.5g} / {r['torch_final_error']:.5g} |")
        t = m["total_ms_per_iteration_summed_over_units"]
        lines.append(f"| **all** | {t['c']:.3f} | {t['compiled']:.3f} | {t['torch']:.3f} | "
                     f"**{m['compiled_over_c']:.2f}** | | |")
    lines += ["", f"Decision: {out['decision']}."]
    print(write_results(args.results, "\n".join(lines) + "\n", data=out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
