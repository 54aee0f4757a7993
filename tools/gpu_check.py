"""The GPU acceptance script: does this checkout compute the same on the GPU as on the CPU, without the host waiting
for the device inside the loops, and how fast. One command, at most 8 minutes on one GPU; a JSON report; exit 0
when every check passed, 1 when one failed (or no GPU is visible), 2 for bad input.

    python -m ptqkit.tools.gpu_check                                 # every check below
    python -m ptqkit.tools.gpu_check --report benchmarks/results/gpu_check_h100.json
    python -m ptqkit.tools.gpu_check --cpu-smoke                     # no GPU: the script's CPU parts
    python -m ptqkit.tools.gpu_check --config CFG.yaml --set data.root=/data/imagenet --skip speed,numerics
                                                                     # a config about to run, CPU beside CUDA

Checks (docs/GPU.md says what each means and what it costs):
- compile: torch.compile builds the fake-quant kernels for CUDA (before any loop; the graphs and kernels it made);
- elements: CPU against CUDA element for element (the CPU's C kernels the reference; CUDA's compiled kernels and
  its plain torch ops): keep masks for fixed keys, the fake quantizer's forward and backward under both
  `bound_grad` conventions, soft rounding and its regulariser, the input mix from caches on either device;
- methods: every registered method end to end on ResNet-20 at --iters iterations per unit (a few hundred loop
  iterations each) on CUDA, with torch's CUDA sync debug mode set to "error" inside the loops (a synchronising
  call there fails the method), and the same run on the CPU: top-1 within --tolerance points; MobileNetV2 on the
  ImageNet sample (QDrop after cross-layer equalization, whose ReLU6 bounds are buffers on the model's device)
  where that asset is present; with --config, that config alone (its agreement and time per iteration);
- speed: QDrop ResNet-20 W2A4 at the protocol budget (1,024 images, 2,000 iterations per unit): each unit's loop
  against its FP32 floor on the same GPU (the unit's forward and backward with quantizers off, as
  benchmarks/reconstruction_speed.py measures it on the CPU), at most --max-floor-ratio in total; the whole run;
  the CUDA peak; graphs compiled after the first unit (none expected);
- numerics: the same short run twice under runtime.deterministic gives the same bits; its loop time and that
  with runtime.tf32 beside the default's (reported, no threshold);
- torchrun (two or more GPUs): naive PTQ over all GPUs equals one GPU exactly; QDrop within 2.5 points;
- time: the whole script within --budget seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from ptqkit import assets, data, pipeline
from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.engine import prefix_values, reconstruction_loss, run_batched
from ptqkit.algorithms.graph import unit_module
from ptqkit.algorithms.registry import get_algorithm, registered_algorithms
from ptqkit.config import load_config
from ptqkit.errors import UserError
from ptqkit.quant import hostsync, kernels
from ptqkit.quant.quantizers import fp_mode
from ptqkit.tools import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET20 = "configs/cifar10/resnet20_w4a4_{}.yaml"
MOBILENET = "configs/imagenet/mobilenet_v2_sample_w4a4_qdrop.yaml"
SPEED_CONFIG = "configs/cifar10/resnet20_w4a4_qdrop.yaml"
CONFIGS = {"ptmq": "configs/cifar10/resnet20_w4_ptmq.yaml",
           "compose": "configs/cifar10/compose/resnet20_w2a2_pd_mrecg.yaml"}
TORCHRUN_TOLERANCE = 2.5      # points of top-1, as tests/test_distributed.py (two draw orders of a short run)


# ------------------------------------------------------------------------------------------------ elements
def _inputs(seed: int = 0) -> dict:
    """CPU tensors shaped and scaled like a unit's activations and weights, with exact zeros (a ReLU's output)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, 16, 16, generator=gen) * 1.7
    x[:, ::3] = x[:, ::3].clamp_min(0)
    w = torch.randn(64 * 64 * 9, generator=gen) * 0.05
    cache_q = torch.randn(96, 16, 8, 8, generator=gen)
    return {"x": x, "grad": torch.randn(x.shape, generator=gen), "w": w,
            "alpha": torch.randn(w.shape, generator=gen), "g_w": torch.randn(w.shape, generator=gen),
            "cache_q": cache_q, "cache_fp": cache_q + 0.1 * torch.randn(cache_q.shape, generator=gen),
            "rows": torch.randint(0, 96, (32,), generator=gen)}


STEP = 0.21          # the fake quantizer's step in the element checks


def _compute(device: str, impl: str, inp: dict) -> dict:
    """Every kernel's results on `device` through implementation `impl`: name -> (CPU tensor, how it may differ
    from the reference's: exact, ties, sum, close)."""
    dev = torch.device(device)
    out = {}
    with kernels.using(impl):
        for i, key in enumerate((0, 1, 2 ** 63 + 5, 987654321)):
            for shape in ((1000003,), (32, 16, 32, 32)):
                out[f"mask key{i} {shape}"] = (kernels.keep_mask(shape, 0.3 + 0.1 * i, dev, key=key).cpu(), "exact")
        x, grad = inp["x"].to(dev), inp["grad"].to(dev)
        for keep_prob in (1.0, 0.5):
            for bound in ("pass", "stop"):
                for zero in (0, 3):
                    name = f"fake-quant keep={keep_prob} bound_grad={bound} z={zero}"
                    xr = x.clone().requires_grad_()
                    s = torch.tensor([STEP], device=dev, requires_grad=True)
                    torch.manual_seed(17)           # the mask key, from the CPU generator on either device
                    y = kernels.act_fake_quant(xr, s, torch.tensor([zero], device=dev), 0, 15, keep_prob,
                                               stop_at_bounds=bound == "stop")
                    y.backward(grad)
                    out[f"{name}: output"] = (y.detach().cpu(), "ties")
                    out[f"{name}: input gradient"] = (xr.grad.cpu(), "ties")
                    out[f"{name}: step gradient"] = (s.grad.cpu(), "sum")
            torch.manual_seed(17)
            with torch.no_grad():
                y = kernels.act_fake_quant(x, torch.tensor([STEP], device=dev), torch.tensor([2], device=dev), 0, 15,
                                           keep_prob)
            out[f"fake-quant keep={keep_prob} inference: output"] = (y.cpu(), "ties")
        w = inp["w"].to(dev)
        scale = torch.full_like(w, 0.02)
        base, zero = torch.floor(w / scale), torch.zeros_like(w)
        lo, hi = torch.full_like(w, -2.0), torch.full_like(w, 1.0)
        for beta in (None, 20.0, 2.0):
            alpha = inp["alpha"].to(dev).clone().requires_grad_()
            w_q, penalty = kernels.soft_rounding(alpha, base, scale, zero, lo, hi, beta)
            ((w_q * inp["g_w"].to(dev)).sum() + 0.01 * penalty).backward()
            out[f"soft rounding beta={beta}: weights"] = (w_q.detach().cpu(), "close")
            out[f"soft rounding beta={beta}: regulariser"] = (penalty.detach().reshape(1).cpu(), "close")
            out[f"soft rounding beta={beta}: gradient"] = (alpha.grad.cpu(), "close")
        for store in ("cpu", device):   # the caches on the CPU (cache_device cpu) or on the model's device
            a, b = inp["cache_q"].to(store), inp["cache_fp"].to(store)
            out[f"input mix, cache on {torch.device(store).type}"] = (
                kernels.mix_rows(a, b, inp["rows"], 0.5, dev, key=424242).cpu(), "exact")
    return out


def _compare(reference: dict, got: dict, grad: torch.Tensor) -> dict:
    """name -> how `got` differs from `reference`, and whether that is allowed:
    - exact (masks, mixes): equal;
    - ties (outputs, input gradients): equal but where x / s sits on a rounding tie (a division that rounds
      otherwise), in at most 1e-5 of the elements, an output then one step apart;
    - sum (the step gradient, a sum over every element): within 1e-6 of the summed magnitudes, plus what the
      output's tie elements may move it;
    - close (soft rounding: exp and pow of another library): within 1e-5 of the largest magnitude."""
    out, tie_counts = {}, {}
    for name, (ref, kind) in reference.items():
        ref, other = ref.double(), got[name][0].double()
        if ref.shape != other.shape:
            out[name] = {"passed": False, "why": f"shape {tuple(other.shape)} against {tuple(ref.shape)}"}
            continue
        diff = (ref - other).abs()
        worst = float(diff.max()) if diff.numel() else 0.0
        scale = max(1.0, float(ref.abs().max()))
        if kind == "exact":
            mismatched = int((diff > 0).sum())
            out[name] = {"passed": mismatched == 0, "mismatched": mismatched}
        elif kind == "ties":
            mismatched = int((diff > 1e-6 * scale).sum())
            allowed = max(1, int(1e-5 * ref.numel()))
            ok = mismatched <= allowed and (worst <= STEP * 1.0001 or "gradient" in name)
            tie_counts[name.rsplit(":", 1)[0]] = mismatched
            out[name] = {"passed": ok, "mismatched": mismatched, "allowed": allowed, "max_abs_diff": worst}
        elif kind == "sum":
            g_max, g_sum = float(grad.abs().max()), float(grad.double().abs().sum())
            bound = 1e-6 * 16 * g_sum + tie_counts.get(name.rsplit(":", 1)[0], 0) * 16 * g_max
            out[name] = {"passed": worst <= bound, "abs_diff": worst, "bound": bound, "value": float(ref.sum())}
        else:
            out[name] = {"passed": worst <= 1e-5 * scale, "max_abs_diff": worst, "bound": 1e-5 * scale}
    return out


def check_elements(paths: list[tuple[str, str]]) -> dict:
    """The reference (CPU, its default implementation) against each (device, implementation) in `paths`."""
    inp = _inputs()
    reference = _compute("cpu", "auto", inp)
    result = {"reference": f"cpu/{kernels.implementation('cpu')}", "paths": {}, "passed": True}
    for device, impl in paths:
        label = f"{device}/{impl}"
        try:
            got = _compute(device, impl, inp)
        except Exception as exc:    # a path that cannot run fails the check, with the reason
            result["paths"][label] = {"passed": False, "error": _error(exc)}
            result["passed"] = False
            continue
        checks = _compare(reference, got, inp["grad"])
        failed = {name: c for name, c in checks.items() if not c["passed"]}
        # a compiled path that fell back to torch ops would pass while not checking what it should
        uses_compiled = impl == "compiled" or (impl == "auto" and kernels.implementation(device) == "compiled")
        ok = not failed and not (uses_compiled and kernels.compile_failed())
        result["paths"][label] = {"passed": ok, "compared": len(checks), "failed": failed,
                                  "ties": {k: c["mismatched"] for k, c in checks.items()
                                           if c.get("mismatched") and c["passed"]},
                                  "compile_failed": kernels.compile_failed()}
        result["passed"] &= ok
        print(f"  {label} against {result['reference']}: {len(checks) - len(failed)}/{len(checks)} agree"
              + (f"; differ: {', '.join(list(failed)[:4])}" if failed else ""), flush=True)
    return result


# ------------------------------------------------------------------------------------------------ runs
def method_overrides(name: str, iters: int) -> list[str]:
    """A short run of method `name`: `iters` loop iterations per unit (and per epoch, FDDA), its inner
    optimisations cut to match."""
    if name == "naive":
        return []
    if name == "fdda":
        return [f"algorithm.iters_per_epoch={iters}", "algorithm.epochs=3", "algorithm.warmup_epochs=1",
                "algorithm.act_freeze_epoch=2", "algorithm.trust_epoch=1", "algorithm.g_lr_milestones=[2]"]
    out = [f"algorithm.iters={iters}"]
    if name == "brecq":
        out.append(f"algorithm.act_iters={iters}")
    if name in ("pdquant", "compose"):
        out += ["algorithm.dc_steps=20", "algorithm.dc_batch=64"]
    return out


def method_config(name: str) -> str:
    return CONFIGS.get(name, RESNET20.format(name))


def shipped_methods() -> list[str]:
    """The registered methods that ship with a ResNet-20 config (a plugin a user or a test registered has none)."""
    return [n for n in registered_algorithms() if os.path.exists(os.path.join(REPO, method_config(n)))]


def mobilenet_overrides(iters: int) -> list[str]:
    """QDrop after cross-layer equalization: its per-channel ReLU6 bounds are buffers a CUDA model must hold."""
    return [f"algorithm.iters={iters}", "algorithm.prepasses=[cle]"]


def _path(config: str) -> str:
    """A config named relative to the repository (the shipped ones) or to the working directory."""
    return config if os.path.exists(config) else os.path.join(REPO, config)


def method_jobs(names: list[str], iters: int, config: str | None, sets: list[str]) -> list[tuple[str, str, list]]:
    """(label, config, overrides) of the short runs: every method's shipped ResNet-20 config, or `config`."""
    if config is not None:
        name = load_config(_path(config), sets).algorithm.name
        return [(os.path.basename(config), config, method_overrides(name, iters) + sets)]
    return [(name, method_config(name), method_overrides(name, iters) + sets) for name in names]


def one_run(config: str, overrides: list[str], device: str, out: str, strict: bool = False) -> dict:
    cfg = load_config(_path(config), overrides + [
        f"runtime.device={device}", "runtime.save_model=false", "runtime.reuse_fp32=false",
        f"runtime.output_dir={out}"])
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    with hostsync.strict(strict):
        results = pipeline.run(cfg, out, show_progress=False)
    seconds = time.perf_counter() - start
    units = results["algorithm_results"].get("units", [])
    iters = sum(u.get("iterations", 0) for u in units)
    loop = sum(u.get("loop_seconds", 0.0) for u in units)
    return {"device": device, "top1": results["quant"]["top1"], "fp32": results["fp32"]["top1"],
            "images": results["quant"]["images"], "seconds": round(seconds, 2), "iterations": iters,
            "loop_seconds": round(loop, 3), "ms_per_iter": round(1000 * loop / iters, 4) if iters else None,
            "memory": results.get("memory"), "units": units}


def _short(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "units"}


def check_methods(jobs: list[tuple[str, str, list[str]]], iters: int, images: int, eval_limit: int,
                  tolerance: float, tmp: str, cuda: bool, mobilenet: bool) -> dict:
    """Each (label, config, overrides) on CUDA (loops strict) and on the CPU, top-1 side by side; on a CPU-only
    machine the CPU run."""
    rows, passed = {}, True
    jobs = list(jobs)
    if mobilenet:
        jobs.append(("mobilenet_v2 qdrop+cle", MOBILENET, mobilenet_overrides(iters)))
    for label, config, overrides in jobs:
        common = [f"data.evaluation.limit={eval_limit}"] + overrides
        if load_config(_path(config), overrides).data.calibration.per_class is None:
            common.insert(0, f"data.calibration.num_images={images}")
        row = {"config": config, "overrides": common}
        try:
            cpu = one_run(config, common, "cpu", os.path.join(tmp, label.replace(" ", "_"), "cpu"))
            row["cpu"] = _short(cpu)
            if cuda:
                gpu = one_run(config, common, "cuda", os.path.join(tmp, label.replace(" ", "_"), "cuda"), strict=True)
                row["cuda"] = _short(gpu)
                row["gap"] = round(abs(gpu["top1"] - cpu["top1"]), 3)
                row["passed"] = row["gap"] <= tolerance
            else:
                row["passed"] = True
        except Exception as exc:
            row["passed"] = False
            row["error"] = _error(exc)
        passed &= row["passed"]
        rows[label] = row
        print(f"  {label}: " + ", ".join(f"{dev.upper()} {row[dev]['top1']:.2f} %" + _per_iteration(row[dev])
                                         for dev in ("cpu", "cuda") if dev in row) +
              (f" (gap {row['gap']:.2f} points)" if "gap" in row else "") +
              ("" if row["passed"] else f"  FAILED {row.get('error', '')[:300]}"), flush=True)
    return {"passed": passed, "tolerance": tolerance, "iters_per_unit": iters, "runs": rows}


def _per_iteration(run: dict) -> str:
    return f" at {run['ms_per_iter']:.2f} ms/iteration" if run.get("ms_per_iter") else ""


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    where = traceback.extract_tb(exc.__traceback__)
    ours = [f"{f.filename.replace(REPO + os.sep, '')}:{f.lineno}" for f in where if REPO in f.filename]
    return (text.splitlines()[0] if text else type(exc).__name__)[:400] + (f" (at {ours[-1]})" if ours else "")


# ------------------------------------------------------------------------------------------------ speed
def unit_floors(config: str, overrides: list[str], device: torch.device, iters: int) -> list[float]:
    """Seconds per iteration of each unit's FP32 forward and backward (quantizers off, weight gradients, the
    engine's loss on a batch from the cached FP inputs): what no reconstruction of that unit can beat here."""
    cfg = load_config(_path(config), overrides + [f"runtime.device={device.type}"])
    pipeline.seed_everything(cfg.runtime.seed)
    fp_model = pipeline.build_fp_model(cfg, device)
    images, labels = data.draw_calibration(data.make_splits(cfg.data), cfg.data.calibration)
    ctx = RunContext(cfg, fp_model, images, labels, device, show_progress=False)
    method = get_algorithm(cfg.algorithm.name)(cfg.algorithm)
    qmodel, _ = method.prepare(ctx)
    units = method.units(qmodel, ctx)
    batch = cfg.algorithm.batch_size
    for param in qmodel.parameters():
        param.requires_grad_(False)
    with pipeline.numerics(cfg.runtime.tf32, cfg.runtime.deterministic):   # as the run: FP32 is FP32
        return [_floor(qmodel, unit, images, batch, device, iters) for unit in units]


def _floor(qmodel, unit, images: torch.Tensor, batch: int, device: torch.device, iters: int) -> float:
    module = unit_module(qmodel, unit)
    weights = [layer.weight for layer, _ in unit.weight_quantizers]
    with fp_mode(qmodel):
        (inputs,) = prefix_values(qmodel, [unit.input], images, 256, device, device, torch.float32)
        targets = run_batched(module, inputs, 256, device, device, torch.float32)
        for w in weights:
            w.requires_grad_(True)

        def step():
            idx = torch.randint(0, len(inputs), (batch,)).to(device, non_blocking=True)
            loss = reconstruction_loss(module(inputs[idx]), targets[idx], 2.0)
            for w in weights:
                w.grad = None
            loss.backward()
        try:
            for _ in range(20):
                step()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                step()
            torch.cuda.synchronize(device)
            return (time.perf_counter() - start) / iters
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None


def check_speed(iters: int, images: int, floor_iters: int, max_ratio: float, tmp: str) -> dict:
    overrides = ["quant.w.bits=2", f"algorithm.iters={iters}", f"data.calibration.num_images={images}"]
    device = torch.device("cuda", torch.cuda.current_device())
    run = one_run(SPEED_CONFIG, overrides, "cuda", os.path.join(tmp, "speed"))
    floors = unit_floors(SPEED_CONFIG, overrides, device, floor_iters)
    rows = []
    for unit, floor in zip(run["units"], floors):
        per_it = unit["loop_seconds"] / max(unit["iterations"], 1)
        rows.append({"unit": unit["name"], "floor_ms": round(1000 * floor, 4), "loop_ms": round(1000 * per_it, 4),
                     "ratio": round(per_it / floor, 3), "compiled": unit.get("compiled"),
                     "cuda_peak_mb": unit.get("cuda_peak_mb")})
    floor_total = sum(f * u["iterations"] for f, u in zip(floors, run["units"]))
    ratio = run["loop_seconds"] / floor_total if floor_total else math.inf
    recompiles = sum((r["compiled"] or {}).get("graphs", 0) for r in rows[1:])
    return {"passed": ratio <= max_ratio and recompiles == 0, "loop_over_floor": round(ratio, 3),
            "max_ratio": max_ratio, "graphs_compiled_after_the_first_unit": recompiles,
            "top1": run["top1"], "fp32": run["fp32"], "run_seconds": run["seconds"],
            "loop_seconds": run["loop_seconds"], "ms_per_iter": run["ms_per_iter"], "memory": run["memory"],
            "config": SPEED_CONFIG, "overrides": overrides, "units": rows}


def check_numerics(iters: int, images: int, tmp: str) -> dict:
    """runtime.deterministic: the same bits twice; the loop time with it and with runtime.tf32 beside the
    default's."""
    base = ["quant.w.bits=2", f"algorithm.iters={iters}", f"data.calibration.num_images={images}",
            "data.evaluation.limit=2000"]
    runs = {}
    for label, extra in (("default", []), ("deterministic", ["runtime.deterministic=true"]),
                         ("deterministic again", ["runtime.deterministic=true"]), ("tf32", ["runtime.tf32=true"])):
        runs[label] = one_run(SPEED_CONFIG, base + extra, "cuda", os.path.join(tmp, "numerics", label))
    losses = [[u["final_rec_loss"] for u in runs[k]["units"]] for k in ("deterministic", "deterministic again")]
    same = losses[0] == losses[1] and runs["deterministic"]["top1"] == runs["deterministic again"]["top1"]
    default_ms = runs["default"]["ms_per_iter"] or math.nan
    return {"passed": same, "deterministic_runs_identical": same,
            "loop_ms_per_iter": {k: r["ms_per_iter"] for k, r in runs.items()},
            "deterministic_cost": round(runs["deterministic"]["ms_per_iter"] / default_ms, 3),
            "tf32_speedup": round(default_ms / runs["tf32"]["ms_per_iter"], 3),
            "top1": {k: r["top1"] for k, r in runs.items()}}


def check_torchrun(gpus: int, iters: int, images: int, tmp: str) -> dict:
    rows, passed = {}, True
    for name, overrides in (("naive", []), ("qdrop", [f"algorithm.iters={iters}"])):
        config = RESNET20.format(name)
        common = overrides + [f"data.calibration.num_images={images}", "data.evaluation.limit=2000",
                              "quant.a.observer=minmax", "quant.w.observer=minmax"]
        one = one_run(config, common, "cuda", os.path.join(tmp, "torchrun", name, "one"))
        out = os.path.join(tmp, "torchrun", name, "many")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
               "--master_port", str(29400 + os.getpid() % 500), os.path.join(REPO, "ptq_main.py"), "--quiet",
               "--config", os.path.join(REPO, config)]
        for o in common + ["runtime.device=cuda", "runtime.save_model=false", "runtime.reuse_fp32=false",
                           f"runtime.output_dir={out}"]:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            rows[name] = {"passed": False, "error": last}
            passed = False
            continue
        many = json.load(open(os.path.join(out, "results.json")))["quant"]["top1"]
        gap = abs(many - one["top1"])
        ok = gap == 0 if name == "naive" else gap <= TORCHRUN_TOLERANCE
        rows[name] = {"passed": ok, "one_gpu": one["top1"], f"{gpus}_gpus": many, "gap": round(gap, 3),
                      "tolerance": 0.0 if name == "naive" else TORCHRUN_TOLERANCE}
        passed &= ok
    return {"passed": passed, "gpus": gpus, "runs": rows}


# ------------------------------------------------------------------------------------------------ the command
def _environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "commit": pipeline.source_commit(),
           "cpu_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
           "kernels": {"cpu": kernels.implementation("cpu")}}
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                   gpu=torch.cuda.get_device_name(0), kernels={"cpu": kernels.implementation("cpu"),
                                                               "cuda": kernels.implementation("cuda")})
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", default="gpu_check.json", help="where the JSON report goes")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="without a GPU: the element checks between the CPU's implementations and one method "
                             "end to end on the CPU (what can be checked of this script on a machine without CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="--cpu-smoke: leave out the compiled kernels")
    parser.add_argument("--iters", type=int, default=30, help="methods: loop iterations per unit")
    parser.add_argument("--images", type=int, default=256, help="methods: calibration images")
    parser.add_argument("--eval-limit", type=int, default=2000, help="methods: evaluation images")
    parser.add_argument("--tolerance", type=float, default=1.0, help="largest top-1 gap CUDA vs CPU (points)")
    parser.add_argument("--methods", default=None, help="comma-separated; default every registered method")
    parser.add_argument("--config", default=None, help="methods: this config alone (e.g. the ImageNet one about to "
                                                        "run: its agreement and time per iteration)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="methods: overrides of the runs (e.g. data.root=/data/imagenet)")
    parser.add_argument("--speed-iters", type=int, default=2000, help="speed: iterations per unit (the protocol)")
    parser.add_argument("--speed-images", type=int, default=1024, help="speed: calibration images (the protocol)")
    parser.add_argument("--floor-iters", type=int, default=200, help="speed: timed iterations of each unit's floor")
    parser.add_argument("--max-floor-ratio", type=float, default=1.5, help="speed: loop time / FP32 floor, at most")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds the whole script may take")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out: compile, elements, methods, "
                                                    "speed, numerics, torchrun")
    args = parser.parse_args(argv)
    names = args.methods.split(",") if args.methods else shipped_methods()
    unknown = sorted(set(names) - set(registered_algorithms()))
    if unknown:
        raise UserError(f"--methods: {', '.join(unknown)} not registered (registered: "
                        f"{', '.join(registered_algorithms())})")
    if args.cpu_smoke and args.methods is None and args.config is None:
        names = ["qdrop"]
    jobs = method_jobs(names, args.iters if not args.cpu_smoke else 2, args.config, args.overrides)
    for _, config, overrides in jobs:   # bad input, or a config key a method lost: one line before any work
        load_config(_path(config), overrides)
    skip = {s for s in args.skip.split(",") if s}
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("gpu_check: no CUDA device is visible (python -m ptqkit.tools.gpu_check --cpu-smoke checks the "
              "script's CPU parts)", file=sys.stderr)
        return 1
    start = time.perf_counter()
    report = {"command": " ".join(["python -m ptqkit.tools.gpu_check"] + (argv if argv is not None else sys.argv[1:])),
              "environment": _environment(), "checks": {}}

    def record(name: str, fn) -> None:
        if name in skip:
            return
        t0 = time.perf_counter()
        print(f"{name} ...", flush=True)
        try:
            result = fn()
        except Exception as exc:
            result = {"passed": False, "error": _error(exc)}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["checks"][name] = result
        print(f"{name}: {'passed' if result['passed'] else 'FAILED'} ({result['seconds']:.0f} s)"
              + (f" {result['error']}" if "error" in result else ""), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if cuda and not args.cpu_smoke:
            # compiled before any strict loop (autotuning synchronises); the graphs and kernels it made
            record("compile", lambda: {**kernels.warm_up("cuda"), "failed": kernels.compile_failed(),
                                       "passed": not kernels.compile_failed()})
            record("elements", lambda: check_elements([("cuda", "auto"), ("cuda", "torch")]))
            mobilenet = os.path.exists(_asset("imagenet/mobilenet_v2_coral.pth"))
            record("methods", lambda: check_methods(jobs, args.iters, args.images, args.eval_limit, args.tolerance,
                                                    tmp, True, mobilenet and args.config is None))
            record("speed", lambda: check_speed(args.speed_iters, args.speed_images, args.floor_iters,
                                                args.max_floor_ratio, tmp))
            record("numerics", lambda: check_numerics(200, 256, tmp))
            if torch.cuda.device_count() >= 2:
                record("torchrun", lambda: check_torchrun(torch.cuda.device_count(), 200, 256, tmp))
        else:
            paths = [("cpu", "torch")] + ([] if args.no_compile else [("cpu", "compiled")])
            record("elements", lambda: check_elements(paths))
            record("methods", lambda: check_methods(jobs, 2, 64, 200, args.tolerance, tmp, False, False))
    seconds = time.perf_counter() - start
    report["seconds"] = round(seconds, 1)
    report["checks"]["time"] = {"passed": seconds <= args.budget, "seconds": round(seconds, 1),
                                "budget": args.budget}
    report["passed"] = all(c["passed"] for c in report["checks"].values())
    report["environment"]["load_average_after"] = list(os.getloadavg())
    if os.path.dirname(args.report):
        os.makedirs(os.path.dirname(args.report), exist_ok=True)
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1, default=str)
    failed = [k for k, c in report["checks"].items() if not c["passed"]]
    print(f"gpu_check: {'passed' if not failed else 'FAILED: ' + ', '.join(failed)} in {seconds:.0f} s "
          f"(report: {args.report})")
    return 0 if not failed else 1


def _asset(path: str) -> str:
    return os.path.join(assets.root(), path)


if __name__ == "__main__":
    sys.exit(cli(main))
