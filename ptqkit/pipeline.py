"""One PTQ run: build model and data, measure FP32, run the algorithm, measure the quantized model, write results.

The FP32 and quantized accuracies are always measured on the same images in the same run.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import platform
import random
import resource
import subprocess
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ptqkit import data, distributed, precision, sensitivity
from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.engine import cuda_run_peak_mb, reset_cuda_run_peak
from ptqkit.algorithms.registry import get_algorithm, multi_process_algorithms
from ptqkit.cache import cache_dir
from ptqkit.config import Config, dump_config
from ptqkit.errors import ConfigError
from ptqkit.files import write_json
from ptqkit.models import build_model, load_checkpoint
from ptqkit.quant import layer_bits
from ptqkit.quant.prepare import trace_check
from ptqkit.saving import save_quantized

log = logging.getLogger("ptq")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "mqbench-torch2"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["ptqkit_commit"] = source_commit()
    return out


def source_commit() -> str | None:
    """The commit of the checkout this code runs from, with "+changes" when tracked files differ from it; None
    outside a git checkout (an installed wheel). Results tables name the engine that made each figure with it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty else "")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device", "cpu or auto (no CUDA device is visible)", name)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)


def peak_memory_mb(device: torch.device) -> dict:
    """The host's peak resident memory and, on CUDA, the largest allocation over the whole run (the engine resets
    torch's counter at every unit; ptqkit.algorithms.engine keeps the maximum across those resets)."""
    out = {"host_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = cuda_run_peak_mb(device)
    return out


def new_run_dir(path: str) -> str:
    """`path` if it is free, else `path-2`, `path-3`, ...: an earlier run's files are never overwritten."""
    candidate, k = path, 1
    while os.path.exists(candidate) and os.listdir(candidate):
        k += 1
        candidate = f"{path}-{k}"
    os.makedirs(candidate, exist_ok=True)
    return candidate



@torch.no_grad()
def evaluate(model: nn.Module, loader, device, desc: str = "eval", show_progress: bool = True) -> dict:
    model.eval()
    correct1 = correct5 = total = 0
    batches = loader.batches(device) if hasattr(loader, "batches") else loader
    for images, labels in tqdm(batches, total=len(loader), desc=desc, unit="batch", disable=not show_progress,
                               leave=False):
        logits = model(images.to(device))
        labels = labels.to(device)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top5[:, 0] == labels).sum().item()
        correct5 += (top5 == labels[:, None]).any(dim=1).sum().item()
        total += labels.numel()
    # several processes evaluate a shard each
    correct1, correct5, total = distributed.all_reduce(torch.tensor([correct1, correct5, total])).tolist()
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "images": total}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the architecture (its repr) and of every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluate_fp32(model: nn.Module, eval_set, device, show_progress: bool, reuse: bool) -> tuple[dict, bool]:
    """The FP32 result and whether it was reused: it is when the same model (architecture and weights) was evaluated
    on the same images (`eval_set.digest`: their bytes, labels and preset) on the same kind of device and torch
    version."""
    if not reuse:
        return evaluate(model, eval_set, device, "eval fp32", show_progress), False
    parts = [model_fingerprint(model), eval_set.digest, device.type, torch.__version__]
    if device.type == "cuda":   # TF32 convolutions (runtime.tf32) change the FP32 figure
        parts.append(f"tf32={torch.backends.cudnn.allow_tf32}")
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()
    path = os.path.join(cache_dir("fp32"), f"{key}.json")
    try:
        with open(path) as f:
            return json.load(f), True
    except (OSError, ValueError):
        pass
    result = evaluate(model, eval_set, device, "eval fp32", show_progress)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, result)
    except OSError as exc:   # a read-only home is no reason to fail a run
        log.warning("FP32 result not cached (%s)", exc)
    return result, False


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - start, 3)


def build_fp_model(cfg: Config, device) -> nn.Module:
    model = build_model(cfg.model.name, **cfg.model.kwargs)
    if cfg.model.checkpoint:
        naming = load_checkpoint(model, cfg.model.checkpoint, cfg.model.name)
        if naming is not None:
            log.info("checkpoint %s: %s names, mapped onto the zoo's %s", cfg.model.checkpoint, naming,
                     cfg.model.name)
    else:
        log.warning("model.checkpoint is null: the model has random weights, its accuracy means nothing")
    return model.eval().to(device)


def quant_summary(cfg: Config, size: dict | None = None) -> str:
    """W4A4; with per-layer bits (quant.layers) and the model's `size`, the bits the layers actually span, so that
    a mixed run is not reported as its uniform default."""
    q = cfg.quant
    label = f"W{q.w.bits}A{32 if q.a.bits is None else q.a.bits}"   # A32: activations in full precision
    if size is None or not q.layers:
        return label
    w = sorted({layer["w_bits"] for layer in size["layers"].values()})
    a = sorted({layer["a_bits"] or 32 for layer in size["layers"].values()})
    return f"per-layer W{_span(w)}A{_span(a)} (average {size['avg_w_bits']:.2f} weight bits)"


def _span(bits: list[int]) -> str:
    return str(bits[0]) if len(bits) == 1 else f"{bits[0]}-{bits[-1]}"


def check_multi_process(cfg: Config, algorithm) -> None:
    if not algorithm.runs_multi_process():
        raise ConfigError("algorithm.name", "an algorithm that runs under torchrun ("
                          + ", ".join(multi_process_algorithms()) + "; a composition without the parts that do "
                          "not: pd, grouping mrecg, act_bits)", cfg.algorithm.name)
    if cfg.quant.a.observer not in distributed.MERGEABLE_OBSERVERS:
        raise ConfigError("quant.a.observer", "minmax, mse or hist_mse under torchrun (EMA observers depend on the "
                          "order of batches, which processes split)", cfg.quant.a.observer)


@contextmanager
def torch_threads(n: int | None):
    """Inside: torch's intra-op thread count is `n` (None or 0: unchanged). Restored on exit, so that a run started
    from Python (ptqkit.tools.sweep, a notebook, the tests) leaves its caller's setting as it found it."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_CUBLAS_WORKSPACE = ":4096:8"    # what cuBLAS needs to be deterministic (CUDA's reproducibility notes)


@contextmanager
def numerics(tf32: bool = False, deterministic: bool = False):
    """Inside: CUDA's FP32 matmuls and convolutions in TF32 only if `tf32` (torch lets cuDNN use TF32 by default on
    Ampere and later, so "FP32" would not be); with `deterministic`, the same results from the same inputs on the
    same GPU (cuDNN's deterministic algorithms, no autotuning, torch's deterministic mode, cuBLAS's fixed
    workspace): what bit-exact resume on a GPU needs. Every setting is restored on exit (runtime.tf32,
    runtime.deterministic; docs/GPU.md)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = bool(tf32)
        if deterministic:
            # read when cuBLAS makes its workspace: before the run's first matmul on the GPU
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
            cudnn.deterministic, cudnn.benchmark = True, False
            # warn_only: an op with no deterministic CUDA kernel says so in the log instead of stopping the run
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def run(cfg: Config, run_dir: str, *, dry_run: bool = False, show_progress: bool = True,
        resume: dict | None = None) -> dict:
    """`resume`: progress saved by an earlier start of this run in `run_dir` (ptqkit.algorithms.progress)."""
    with torch_threads(cfg.runtime.threads), numerics(cfg.runtime.tf32, cfg.runtime.deterministic), \
            distributed.observers_stay_local():
        return _run(cfg, run_dir, dry_run=dry_run, show_progress=show_progress, resume=resume)


def _run(cfg: Config, run_dir: str, *, dry_run: bool, show_progress: bool, resume: dict | None) -> dict:
    device, algorithm_cls = _start(cfg, run_dir, resume)
    timer = PhaseTimer()
    with timer("model"):  # before the data: a mismatched checkpoint should fail in a second
        fp_model = _checked_fp_model(cfg, device)
    with timer("data"):
        splits = data.make_splits(cfg.data)
        calib_images, calib_labels = data.draw_calibration(splits, cfg.data.calibration)
        # decoded now, before any calibration: an unreadable image stops the run here (not for a dry run)
        loader = None if dry_run else data.evaluation_loader(splits, cfg.data.evaluation, distributed.shard_indices)
    algorithm = algorithm_cls(cfg.algorithm)
    ctx = RunContext(cfg=cfg, fp_model=fp_model, calib_images=calib_images, calib_labels=calib_labels,
                     device=device, run_dir=run_dir, show_progress=show_progress, resume=resume)
    log.info("model %s, %s, algorithm %s, %d calibration images, %d evaluation images, device %s%s",
             cfg.model.name, quant_summary(cfg), cfg.algorithm.name, len(calib_images),
             len(splits.evaluation_indices), device,
             f", {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
    mixed = _mixed_precision(ctx, timer, dry_run)
    if dry_run:
        return {"dry_run": _plan(ctx, algorithm, mixed)}
    ctx.evaluate = lambda model, desc: evaluate(model, loader, device, desc, show_progress)

    with timer("fp32_eval"):
        # several processes evaluate a shard each: a reused figure would leave the others alone in the all-reduce
        reuse = cfg.runtime.reuse_fp32 and distributed.world_size() == 1
        fp32, fp32_reused = evaluate_fp32(fp_model, loader, device, show_progress, reuse)
    log.info("FP32 top-1 %.2f %% (top-5 %.2f %%) on %d images%s", fp32["top1"], fp32["top5"], fp32["images"],
             " (reused: measured by an earlier run on the same model and images)" if fp32_reused else "")
    ctx.fp32 = fp32
    with timer("quantize"):
        qmodel = algorithm.run(ctx)
    if cfg.runtime.save_model and distributed.is_main():
        with timer("save"):   # before the evaluation: whatever happens there, the work is kept
            save_quantized(qmodel, cfg, os.path.join(run_dir, "quantized_model.pt"))
    with timer("quant_eval"):
        quant = evaluate(qmodel, loader, device, "eval quant", show_progress)
    size = sensitivity.model_size(qmodel, calib_images[:1].to(device))
    log.info("%s %s top-1 %.2f %% (FP32 %.2f %% on the same %d images)", cfg.algorithm.name,
             quant_summary(cfg, size), quant["top1"], fp32["top1"], quant["images"])
    extra = algorithm.extra_evaluations(ctx, qmodel, ctx.evaluate)
    results = _results(ctx, timer, fp32_reused, quant, size, mixed, extra)
    if distributed.is_main():
        write_json(os.path.join(run_dir, "results.json"), results)
    return results


def _start(cfg: Config, run_dir: str, resume: dict | None) -> tuple[torch.device, type]:
    """This process's device (torchrun's group joined), its seeds, the algorithm's class (refused under torchrun
    when it cannot run there), and on a first start the run folder's config.yaml."""
    device = distributed.init(cfg.runtime.device) or select_device(cfg.runtime.device)
    precision.check(cfg.runtime.compute_dtype, device)   # bfloat16 where the device has none: refused here
    reset_cuda_run_peak(device)
    # one stream per process: each draws its own batches and drop masks (rank 0 is the single-process run)
    seed_everything(cfg.runtime.seed + distributed.rank())
    algorithm_cls = get_algorithm(cfg.algorithm.name)
    if distributed.world_size() > 1:
        check_multi_process(cfg, algorithm_cls(cfg.algorithm))
    if resume is None and distributed.is_main():
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
    return device, algorithm_cls


def _checked_fp_model(cfg: Config, device) -> nn.Module:
    """The FP model, with what can be checked before any data is read: it traces, and the quant.layers patterns
    match its layers."""
    fp_model = build_fp_model(cfg, device)
    trace_check(fp_model, cfg.model.leaf_modules)
    layer_bits.check_patterns(cfg.quant.layers, layer_bits.fp_layers(fp_model), cfg.model.name)
    return fp_model


def _mixed_precision(ctx: RunContext, timer: PhaseTimer, dry_run: bool) -> dict | None:
    """`quant.mixed`: the allocation, which becomes quant.layers entries of the run's config
    (docs/MIXED_PRECISION.md), and its record for results.json (None without mixed precision)."""
    cfg = ctx.cfg
    if cfg.quant.mixed.enabled:
        with timer("mixed_precision"):
            return sensitivity.apply_mixed(cfg, ctx.fp_model, ctx.calib_images, ctx.calib_labels, ctx.device,
                                           ctx.run_dir, dry_run=dry_run, show_progress=ctx.show_progress)
    if ctx.resume is not None:
        # the first start turned the allocation into the config.yaml this run was rebuilt from; its record stays
        return sensitivity.read_mixed_record(ctx.run_dir)
    return None


def _plan(ctx: RunContext, algorithm, mixed: dict | None) -> str:
    """What a dry run prints after the resolved config: the mixed-precision note, the per-layer table, the
    algorithm's plan."""
    layers = sensitivity.describe_layers(ctx.cfg, ctx.fp_model, ctx.calib_images[:1].to(ctx.device))
    notes = [] if mixed is None else [sensitivity.plan_line(mixed) if "allocation" in mixed else mixed["note"]]
    # led by a blank line: the command prints the resolved config's YAML just before, and readers split there
    return "\n" + "\n\n".join(notes + [layers] + [t for t in [algorithm.describe(ctx)] if t])


def _results(ctx: RunContext, timer: PhaseTimer, fp32_reused: bool, quant: dict, size: dict, mixed: dict | None,
             extra: dict | None) -> dict:
    """results.json's contents."""
    cfg, fp32 = ctx.cfg, ctx.fp32
    results = {
        "model": cfg.model.name, "algorithm": cfg.algorithm.name, "bits": quant_summary(cfg, size),
        "fp32": fp32, "fp32_reused": fp32_reused, "quant": quant, "drop_top1": round(fp32["top1"] - quant["top1"], 3),
        "calibration_images": len(ctx.calib_images), "evaluation_images": quant["images"],
        "seconds": timer.seconds, "memory": peak_memory_mb(ctx.device), "device": str(ctx.device),
        "versions": versions(), "config": cfg.to_dict(), "algorithm_results": ctx.results,
        "processes": distributed.world_size(),
    }
    results["size"] = size
    if mixed is not None:
        results["mixed_precision"] = mixed
    if extra:
        results["extra_evaluations"] = extra
    if ctx.resume is not None:
        results["resumed"] = {"after_phase": ctx.resume["phase"], "after_unit": ctx.resume["unit"],
                              "note": "seconds cover the last start only"}
    return results
