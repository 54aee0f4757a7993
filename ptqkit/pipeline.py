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

from ptqkit import data, distributed
from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.registry import get_algorithm, multi_process_algorithms
from ptqkit.cache import cache_dir
from ptqkit.config import Config, dump_config
from ptqkit.errors import ConfigError
from ptqkit.models import build_model, load_checkpoint
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
    out = {"host_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def new_run_dir(path: str) -> str:
    """`path` if it is free, else `path-2`, `path-3`, ...: an earlier run's files are never overwritten."""
    candidate, k = path, 1
    while os.path.exists(candidate) and os.listdir(candidate):
        k += 1
        candidate = f"{path}-{k}"
    os.makedirs(candidate, exist_ok=True)
    return candidate


def write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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
    key = hashlib.sha256("|".join([model_fingerprint(model), eval_set.digest, device.type,
                                   torch.__version__]).encode()).hexdigest()
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


def quant_summary(cfg: Config) -> str:
    q = cfg.quant
    return f"W{q.w.bits}A{32 if q.a.bits is None else q.a.bits}"   # A32: activations in full precision


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


def run(cfg: Config, run_dir: str, *, dry_run: bool = False, show_progress: bool = True,
        resume: dict | None = None) -> dict:
    """`resume`: progress saved by an earlier start of this run in `run_dir` (ptqkit.algorithms.progress)."""
    with torch_threads(cfg.runtime.threads):
        return _run(cfg, run_dir, dry_run=dry_run, show_progress=show_progress, resume=resume)


def _run(cfg: Config, run_dir: str, *, dry_run: bool, show_progress: bool, resume: dict | None) -> dict:
    device = distributed.init(cfg.runtime.device) or select_device(cfg.runtime.device)
    # one stream per process: each draws its own batches and drop masks (rank 0 is the single-process run)
    seed_everything(cfg.runtime.seed + distributed.rank())
    timer = PhaseTimer()
    algorithm_cls = get_algorithm(cfg.algorithm.name)
    if distributed.world_size() > 1:
        check_multi_process(cfg, algorithm_cls(cfg.algorithm))
    if resume is None and distributed.is_main():
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))

    with timer("model"):  # before the data: a mismatched checkpoint should fail in a second
        fp_model = build_fp_model(cfg, device)
        trace_check(fp_model, cfg.model.leaf_modules)
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
    if dry_run:
        return {"dry_run": algorithm.describe(ctx)}
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
    log.info("%s %s top-1 %.2f %% (FP32 %.2f %% on the same %d images)", cfg.algorithm.name, quant_summary(cfg),
             quant["top1"], fp32["top1"], quant["images"])
    extra = algorithm.extra_evaluations(ctx, qmodel, ctx.evaluate)
    results = {
        "model": cfg.model.name, "algorithm": cfg.algorithm.name, "bits": quant_summary(cfg),
        "fp32": fp32, "fp32_reused": fp32_reused, "quant": quant, "drop_top1": round(fp32["top1"] - quant["top1"], 3),
        "calibration_images": len(calib_images), "evaluation_images": quant["images"],
        "seconds": timer.seconds, "memory": peak_memory_mb(device), "device": str(device),
        "versions": versions(), "config": cfg.to_dict(), "algorithm_results": ctx.results,
        "processes": distributed.world_size(),
    }
    if extra:
        results["extra_evaluations"] = extra
    if resume is not None:
        results["resumed"] = {"after_phase": resume["phase"], "after_unit": resume["unit"],
                              "note": "seconds cover the last start only"}
    if distributed.is_main():
        write_json(os.path.join(run_dir, "results.json"), results)
    return results
