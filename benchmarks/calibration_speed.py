#!/usr/bin/env python
"""Calibration speed of the MSE range observers: MQBench's MSEObserver and EMAMSEObserver against
ptqkit's HistogramMSEObserver (`observer: hist_mse`), in one process, on the same model, calibration images and
seed, through the toolkit's own path (config validation, prepare_quantized, calibrate).

    python benchmarks/calibration_speed.py                       # the whole protocol, 1 thread
    python benchmarks/calibration_speed.py --models resnet20 --observers hist_mse mse --resnet-images 256

Protocol: W4A4, per-channel asymmetric weights, per-tensor asymmetric activations, first/last-layer weights and the
last layer's input at 8 bit, BN unfolded (Academic), the same observer and p for weights and activations, batch 32.
(a) CIFAR-10 ResNet-20 (the assets' checkpoint, docs/ASSETS.md), 256 and 1,024 calibration images drawn with seed
1005 from the training images, evaluated on all 10,000 test images. (b) ImageNet MobileNetV2 (the ImageNet sample
asset's Coral checkpoint, preset imagenet_pm1), the 1,000 sample images split by the toolkit's data module into a 500-image calibration pool and a
500-image evaluation half; 16 and 64 calibration images.

Measured per configuration:
- calibration seconds: `ptqkit.quant.prepare.calibrate` alone (wall clock);
- peak memory: the process's resident-set high-water mark during calibration (reset just before it through
  /proc/self/clear_refs), and its growth over the resident set at the start of calibration;
- act rel-L2: per activation quantizer sqrt(sum ||Q(x) - x||^2 / sum ||x||^2) over the calibration images, x the
  quantizer's input in the full-precision network, averaged over the quantizers; w rel-L2 the same on the weights;
- logit MSE: mean squared difference of the quantized and FP32 logits on the evaluation images;
- top-1 on the evaluation images, with FP32 on the same images.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ptqkit import assets as ptq_assets  # noqa: E402

OBSERVER_NAMES = {"minmax": "MinMaxObserver (reference)", "mse": "MQBench MSEObserver",
                  "ema_mse": "MQBench EMAMSEObserver", "hist_mse": "ptqkit HistogramMSEObserver"}


def parse_bits(text: str) -> tuple[int, int]:
    w, a = text.upper().lstrip("W").split("A")
    return int(w), int(a)


def config_tree(model: str, assets: str, observer: str, num_images: int, p: float, bits: str) -> dict:
    w_bits, a_bits = parse_bits(bits)
    quant = {"w": {"bits": w_bits, "per_channel": True, "observer": observer, "p": p},
             "a": {"bits": a_bits, "observer": observer, "p": p}}
    if model == "resnet20":
        root = os.path.join(assets, "cifar10")
        return {"model": {"name": "cifar_resnet20", "checkpoint": os.path.join(root, "resnet20-12fca82f.th")},
                "data": {"root": root, "preset": "cifar10",
                         "calibration": {"split": "train", "num_images": num_images, "batch_size": 32,
                                         "seed": 1005},
                         "evaluation": {"split": "test", "batch_size": 500, "workers": 2}},
                "quant": quant, "algorithm": {"name": "naive"}, "runtime": {"device": "cpu"}}
    root = os.path.join(assets, "imagenet")
    return {"model": {"name": "mobilenet_v2", "checkpoint": os.path.join(root, "mobilenet_v2_coral.pth")},
            "data": {"root": os.path.join(root, "sample"), "preset": "imagenet_pm1",
                     "calibration": {"split": None, "num_images": num_images, "batch_size": 32, "seed": 1005},
                     "evaluation": {"split": None, "batch_size": 100, "workers": 2}},
            "quant": quant, "algorithm": {"name": "naive"}, "runtime": {"device": "cpu"}}


# ------------------------------------------------------------------------------------------- memory
def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Return freed heap pages to the system, then restart the high-water mark from the current resident set."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # else memory freed by earlier runs hides this run's peak
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def logits_of(model, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def quantizer_errors(qmodel, images: torch.Tensor, batch: int) -> tuple[float, float]:
    """(mean act rel-L2, mean weight rel-L2): each quantizer applied alone to its full-precision input."""
    from ptqkit.quant.quantizers import act_quantizers, fp_mode, weight_quantizers
    sums: dict[int, list[float]] = {}

    def hook(q, inputs, _output):
        x = inputs[0]
        xq = torch.fake_quantize_per_tensor_affine(x, float(q.scale), int(q.zero_point), q.quant_min, q.quant_max)
        acc = sums.setdefault(id(q), [0.0, 0.0])
        acc[0] += float((xq - x).pow(2).sum())
        acc[1] += float(x.pow(2).sum())

    handles = [q.register_forward_hook(hook) for q in act_quantizers(qmodel)]
    try:
        with fp_mode(qmodel):
            for i in range(0, len(images), batch):
                qmodel(images[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    act = [(e / max(n, 1e-30)) ** 0.5 for e, n in sums.values()]
    weights = []
    modules = dict(qmodel.named_modules())
    for name, module in modules.items():
        q = getattr(module, "weight_fake_quant", None)
        if q is None:
            continue
        w = module.weight
        wq = torch.fake_quantize_per_channel_affine(w, q.scale, q.zero_point.int(), q.ch_axis, q.quant_min,
                                                    q.quant_max) if q.is_per_channel else q(w)
        weights.append(float((wq - w).norm() / w.norm()))
    assert len(weights) == len(weight_quantizers(qmodel))
    return sum(act) / len(act), sum(weights) / len(weights)


# -------------------------------------------------------------------------------------------- runs
def load_eval_images(splits, eval_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    from ptqkit import data
    xs, ys = zip(*data.evaluation_loader(splits, eval_cfg))
    return torch.cat(xs), torch.cat(ys)


def run_model(model_key: str, bits: str, sizes: list[int], observers: list[str], args) -> tuple[list[dict], dict]:
    from ptqkit import data
    from ptqkit.quant import prepare as pq
    from ptqkit.config import validate
    from ptqkit.pipeline import build_fp_model, seed_everything

    base = validate(config_tree(model_key, args.assets, "minmax", max(sizes), args.p, bits))
    splits = data.make_splits(base.data)
    eval_images, eval_labels = load_eval_images(splits, base.data.evaluation)
    if args.eval_limit:
        eval_images, eval_labels = eval_images[:args.eval_limit], eval_labels[:args.eval_limit]
    fp_model = build_fp_model(base, torch.device("cpu"))
    fp_logits = logits_of(fp_model, eval_images, args.eval_batch)
    fp_top1 = 100.0 * float((fp_logits.argmax(1) == eval_labels).float().mean())
    info = {"model": base.model.name, "bits": bits.upper(), "fp_top1": fp_top1, "eval_images": len(eval_images),
            "calibration_pool": len(splits.calibration_pool)}
    print(f"{base.model.name}: FP32 top-1 {fp_top1:.2f} % on {len(eval_images)} evaluation images", flush=True)

    # One untimed calibration first, so that no measured run pays for lazy initialisation.
    warm = validate(config_tree(model_key, args.assets, "minmax", 2, args.p, bits))
    warm_model, _ = pq.prepare_quantized(fp_model, warm.quant)
    pq.calibrate(warm_model, data.draw_calibration(splits, warm.data.calibration)[0], 32, "cpu")
    del warm_model

    rows = []
    for n in sizes:
        for observer in observers:
            cfg = validate(config_tree(model_key, args.assets, observer, n, args.p, bits))
            images, _ = data.draw_calibration(splits, cfg.data.calibration)
            seed_everything(cfg.runtime.seed)
            qmodel, _ = pq.prepare_quantized(fp_model, cfg.quant)
            exact_peak = reset_peak_rss()
            rss_before = _rss_mb("VmRSS")
            start, cpu_start = time.perf_counter(), time.process_time()
            pq.calibrate(qmodel, images, cfg.data.calibration.batch_size, "cpu")
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            peak = _rss_mb("VmHWM")
            act_err, w_err = quantizer_errors(qmodel, images, cfg.data.calibration.batch_size)
            q_logits = logits_of(qmodel, eval_images, args.eval_batch)
            row = {"model": base.model.name, "bits": bits.upper(), "images": n, "observer": observer,
                   "seconds": seconds, "cpu_seconds": cpu_seconds,
                   "act_rel_l2": act_err, "w_rel_l2": w_err,
                   "logit_mse": float((q_logits - fp_logits).pow(2).mean()),
                   "top1": 100.0 * float((q_logits.argmax(1) == eval_labels).float().mean()), "fp_top1": fp_top1,
                   "peak_rss_mb": peak if exact_peak else None,
                   "rss_growth_mb": (peak - rss_before) if exact_peak and peak and rss_before else None}
            rows.append(row)
            print(format_row(row, rows), flush=True)
            del qmodel
    return rows, info


# -------------------------------------------------------------------------------------------- report
HEADER = ("| model | bits | calib. images | observer | calib. s | speed-up of hist_mse | calib. CPU s | "
          "speed-up (CPU s) | act rel-L2 | w rel-L2 | logit MSE | top-1 % | FP32 top-1 % | peak RSS MB (+growth) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def speedup(row: dict, rows: list[dict], key: str) -> str:
    ours = [r for r in rows if r["model"] == row["model"] and r["images"] == row["images"]
            and r["observer"] == "hist_mse"]
    if not ours or row["observer"] == "hist_mse":
        return "–"
    return f"{row[key] / ours[0][key]:.1f}x"


def format_row(r: dict, rows: list[dict]) -> str:
    mem = "n/a" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} (+{r['rss_growth_mb']:.0f})"
    return (f"| {r['model']} | {r['bits']} | {r['images']} | {OBSERVER_NAMES[r['observer']]} | {r['seconds']:.2f} | "
            f"{speedup(r, rows, 'seconds')} | {r['cpu_seconds']:.2f} | {speedup(r, rows, 'cpu_seconds')} | "
            f"{r['act_rel_l2']:.4f} | {r['w_rel_l2']:.4f} | {r['logit_mse']:.4f} | "
            f"{r['top1']:.2f} | {r['fp_top1']:.2f} | {mem} |")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(rows: list[dict], infos: list[dict], args, elapsed: float, load: tuple[float, float]) -> str:
    import importlib.metadata as md
    command = "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:])
    lines = [
        "# Calibration speed of the MSE range observers",
        "",
        f"Made by `{command}` (from the repository root) on {time.strftime('%Y-%m-%d')}: one process, "
        f"{args.threads} torch thread(s) on a {os.cpu_count()}-core {cpu_name()} shared with other work, "
        f"torch {torch.__version__}, mqbench-torch2 {md.version('mqbench-torch2')}, Python "
        f"{platform.python_version()}; {elapsed / 60:.0f} min in all. Load average (1 min) {load[0]:.1f} at the "
        f"start, {load[1]:.1f} at the end" + (
            ": other processes competed for the cores, so wall-clock seconds are inflated and noisy; the CPU "
            "seconds of this process (1 thread) are the steadier measure." if max(load) > os.cpu_count() else "."),
        "",
        f"Per-channel asymmetric weights, per-tensor asymmetric activations, first/last-layer weights and the "
        f"last layer's input at 8 bit, BN unfolded (Academic backend), the named observer for weights and "
        f"activations with p = {args.p}, calibration batch 32, calibration draw seed 1005.",
        "",
    ]
    for info in infos:
        lines.append(f"- {info['model']} {info['bits']}: FP32 top-1 {info['fp_top1']:.2f} % on {info['eval_images']} "
                     f"evaluation images; calibration images drawn from a pool of {info['calibration_pool']}.")
    lines += ["", HEADER] + [format_row(r, rows) for r in rows] + [
        "",
        "Speed-up of hist_mse: the row's calibration seconds (wall clock, or CPU time of the process) over "
        "HistogramMSEObserver's on the same model and images. act rel-L2: per activation quantizer "
        "sqrt(sum ||Q(x) - x||^2 / sum ||x||^2) on the calibration images (x its full-precision input), averaged "
        "over quantizers; w rel-L2: the same on the weights. "
        "logit MSE: quantized vs FP32 logits on the evaluation images. Peak RSS: the process's resident-set "
        "high-water mark during calibration (reset before it), growth over the resident set when calibration "
        "started.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenet_v2"],
                        choices=["resnet20", "mobilenet_v2"])
    parser.add_argument("--observers", nargs="+", default=["minmax", "hist_mse", "mse", "ema_mse"],
                        choices=list(OBSERVER_NAMES))
    parser.add_argument("--resnet-images", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--mbv2-images", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--resnet-bits", default="W4A4")
    parser.add_argument("--mbv2-bits", default="W8A4",
                        help="W4 per-channel round-to-nearest leaves MobileNetV2 at 0-3 %% top-1 whatever the observer")
    parser.add_argument("--p", type=float, default=2.0, help="norm of the MSE searches (config quant.*.p)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-batch", type=int, default=100)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N images only (quick)")
    parser.add_argument("--assets", default=ptq_assets.root(),
                        help="the assets root (docs/ASSETS.md; default $PTQKIT_ASSETS, else ~/.cache/ptqkit/assets)")
    parser.add_argument("--results", default="benchmarks/results/calibration_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    logging.basicConfig(level=logging.WARNING)
    import warnings
    warnings.filterwarnings("ignore")
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    rows, infos = [], []
    for model in args.models:
        sizes = args.resnet_images if model == "resnet20" else args.mbv2_images
        bits = args.resnet_bits if model == "resnet20" else args.mbv2_bits
        model_rows, info = run_model(model, bits, sizes, args.observers, args)
        rows += model_rows
        infos.append(info)
    text = report(rows, infos, args, time.perf_counter() - start, (load_start, os.getloadavg()[0]))
    path = os.path.join(REPO, args.results)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
