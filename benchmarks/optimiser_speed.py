#!/usr/bin/env python
"""The optimiser and the plateau schedule: ptqkit's own (`kernels.Adam`: fakequant.c's `ptq_adam`, one OpenMP pass
per parameter; `kernels.Plateau`: ReduceLROnPlateau's rule kept on the device) against torch's
(`torch.optim.Adam(fused=True)`, `torch.optim.Adam` as it defaults, `ReduceLROnPlateau`), on the CPU, in ONE
process, on the parameter sizes the loops step.

    python benchmarks/optimiser_speed.py                                  # 2 threads, 2,000 steps per case
    python benchmarks/optimiser_speed.py --steps 20 --repeats 1 --results /tmp/optimiser_smoke.md   # runs?

Cases, each the step the loop takes (gradients already there, as after `backward`):
- a reconstruction unit of ResNet-20 / MobileNetV2 (the smallest, a middle and the largest): one flat rounding
  variable V of the unit's weight count and three one-element activation steps, whose learning rate the cosine
  schedule changes every step;
- PD-Quant's distribution correction: one input tensor x̂ of dc_batch images at a unit's input size, Adam plus the
  plateau schedule on its loss every step (ReduceLROnPlateau needs the loss on the host: one read each step on a
  GPU; `kernels.Plateau` reads nothing).
Median over `--repeats` of the time per step, the implementations interleaved. What the toolkit takes from it:
`kernels.CPU_ADAM` is "c" only where ptq_adam is measurably faster than torch's fused Adam on every case, else
"torch"; the plateau schedule is torch's where a loss read costs nothing (the CPU) unless ours is faster. Results
go to a markdown file and a JSON file beside it, with the command, commit, threads and load average before and after.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ptqkit import pipeline  # noqa: E402
from ptqkit.models import build_model  # noqa: E402
from ptqkit.quant import kernels  # noqa: E402
from reconstruction_resnet20 import write_results  # noqa: E402


def unit_weight_counts(model_name: str) -> dict[str, int]:
    """Weights of the conv / linear layers per reconstruction block: ResNet-20's stages' blocks and MobileNetV2's
    `features.i`, the stem and the classifier units of their own."""
    model = build_model(model_name)
    counts: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            parts = name.split(".")
            unit = ".".join(parts[:2]) if parts[0] in ("layer1", "layer2", "layer3", "features") else parts[0]
            counts[unit] = counts.get(unit, 0) + m.weight.numel()
    return counts


def cases(models: list[str]) -> list[dict]:
    out = []
    for model in models:
        counts = unit_weight_counts(model)
        sizes = sorted(set(counts.values()))
        for n in (sizes[0], sizes[len(sizes) // 2], sizes[-1]):   # the smallest, a middle and the largest unit
            unit = next(u for u, c in counts.items() if c == n)
            out.append({"case": f"{model} unit {unit} (V: {n} weights, 3 steps)", "sizes": [n], "steps": 3,
                        "plateau": False})
    # PD-Quant's correction: 32 images at ResNet-20's layer1 input and at MobileNetV2's features.2 input
    out.append({"case": "DC x̂, 32 x 16 x 32 x 32", "sizes": [32 * 16 * 32 * 32], "steps": 0, "plateau": True})
    out.append({"case": "DC x̂, 32 x 16 x 112 x 112", "sizes": [32 * 16 * 112 * 112], "steps": 0, "plateau": True})
    return out


def build(case: dict, impl: str):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in case["sizes"]]
    steps = [torch.rand(1, generator=gen).requires_grad_() for _ in range(case["steps"])]
    for p in params + steps:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    groups = [{"params": params, "lr": 1e-3}] + ([{"params": steps, "lr": 4e-5}] if steps else [])
    if impl == "c":
        opt = kernels.Adam(groups)
        assert opt.native, "the C kernels are not built here"
    else:
        opt = torch.optim.Adam(groups, fused=impl == "torch_fused")
    plateau = None
    if case["plateau"]:
        plateau = kernels.Plateau(opt, patience=10, min_lr=1e-6) if impl == "c" else \
            torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=10, min_lr=1e-6)
    return opt, plateau, steps


def time_steps(case: dict, impl: str, n: int) -> float:
    opt, plateau, steps = build(case, impl)
    loss = torch.tensor(1.0, dtype=torch.float64)

    def one(i: int) -> None:
        if steps:   # the cosine schedule of the activation steps, as the engine sets it every step
            opt.param_groups[-1]["lr"] = 4e-5 * (1 + math.cos(math.pi * i / n)) / 2
        opt.step()
        if plateau is not None:
            value = loss * (1 + 1e-3 * math.sin(i))
            plateau.step(value if impl == "c" else float(value))
    for i in range(min(20, n)):
        one(i)
    start = time.perf_counter()
    for i in range(n):
        one(i)
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cifar_resnet20,mobilenet_v2")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default="benchmarks/results/optimiser_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.library() is None:
        raise SystemExit("the C kernels are not built here (no C compiler?): nothing to compare against")
    load_before = os.getloadavg()
    impls = ("c", "torch_fused", "torch_default")
    rows = []
    for case in cases(args.models.split(",")):
        seconds = {impl: [] for impl in impls}
        for _ in range(args.repeats):
            for impl in impls:
                seconds[impl].append(time_steps(case, impl, args.steps))
        row = {"case": case["case"], **{f"{impl}_us": 1e6 * statistics.median(v) for impl, v in seconds.items()}}
        rows.append(row)
        print(f"{row['case']}: " + ", ".join(f"{impl} {row[f'{impl}_us']:.1f} us" for impl in impls), flush=True)
    load_after = os.getloadavg()
    c_faster = all(r["c_us"] < 0.9 * r["torch_fused_us"] for r in rows)
    decision = ("ptq_adam at least 10 % faster than torch's fused Adam in every case: kernels.CPU_ADAM = \"c\""
                if c_faster else "torch's fused Adam as fast or faster in some case: kernels.CPU_ADAM = \"torch\"")
    out = {"command": " ".join(["python"] + sys.argv), "commit": pipeline.source_commit(), "torch": torch.__version__,
           "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
           "load_average_before": load_before, "load_average_after": load_after, "rows": rows, "decision": decision,
           "cpu_adam_now": kernels.CPU_ADAM}
    lines = ["# Adam and the plateau schedule: ptqkit's against torch's, on the CPU", "",
             f"`{out['command']}` at {out['commit']}; torch {out['torch']}, {args.threads} threads; load average "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. Microseconds per step, median of "
             f"{args.repeats} x {args.steps} steps.", "",
             "| case | kernels.Adam (C) | torch Adam fused | torch Adam default |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['c_us']:.1f} | {r['torch_fused_us']:.1f} | {r['torch_default_us']:.1f} |"
              for r in rows]
    lines += ["", "The DC rows include the plateau schedule: kernels.Plateau (on the device) beside the C Adam, "
                  "ReduceLROnPlateau (a float loss) beside torch's.", "", f"Decision: {decision} "
              f"(now: {kernels.CPU_ADAM!r})."]
    print(write_results(args.results, "\n".join(lines) + "\n", data=out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
