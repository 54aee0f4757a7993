"""Per-layer sensitivity to quantization, and the accumulated error along the network (ptqkit.sensitivity).

    python -m ptqkit.tools.sensitivity --config CONFIG [--set key=value ...] [--bits 2 3 4 8] [--what w|a|both]
                                       [--calib-images 256] [--eval-images 256] [--hessian] [--out DIR]

For each layer and bit-width: that layer alone quantized (round to nearest, calibrated ranges; everything else FP),
its effect on the logits on held-out calibration images (KL, top-1); then the model at the config's bits, each
layer's output against FP (SQNR, cosine, MSE). Prints the tables and writes sensitivity.json, sensitivity.csv,
accumulated.csv and sensitivity.png into DIR (default runs/sensitivity_<model>, never overwritten). The JSON is
what `quant.mixed.sensitivity` reads (docs/MIXED_PRECISION.md).
"""
from __future__ import annotations

import argparse
import sys

from ptqkit import data, sensitivity
from ptqkit.config import load_config
from ptqkit.errors import UserError
from ptqkit.pipeline import build_fp_model, new_run_dir, seed_everything, select_device, torch_threads
from ptqkit.quant.prepare import trace_check
from ptqkit.tools import cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ptqkit.tools.sensitivity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (model, data, quant)")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY.PATH=VALUE",
                        help="override config values, as ptq_main.py")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8], help="candidate bit-widths")
    parser.add_argument("--what", choices=sensitivity.WHATS, default="both",
                        help="w: each layer's weights alone; a: the quantizer(s) on its input alone; both (default)")
    parser.add_argument("--calib-images", type=int, default=256,
                        help="the first N images of the config's calibration draw observe the ranges (default 256)")
    parser.add_argument("--eval-images", type=int, default=256,
                        help="the next N (held out) are measured (default 256)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hessian", action="store_true",
                        help="also the HAWQ-v2 measure (Hutchinson trace of the Hessian, torch.func)")
    parser.add_argument("--hessian-samples", type=int, default=16)
    parser.add_argument("--no-accumulated", action="store_true", help="skip the accumulated (all layers) view")
    parser.add_argument("--out", default=None, help="output folder (default runs/sensitivity_<model>)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = the config's / default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.overrides = [item for group in args.overrides for item in group]
    return args


def settings_of(args, seed: int) -> sensitivity.Settings:
    for name in ("calib_images", "eval_images", "batch_size", "hessian_samples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    bad = [b for b in args.bits if not 2 <= b <= 8]
    if bad:
        raise UserError(f"--bits: expected bit-widths in [2, 8], got {bad[0]}")
    return sensitivity.Settings(bits=sorted(set(args.bits)), what=args.what, calib_images=args.calib_images,
                                eval_images=args.eval_images, batch_size=args.batch_size,
                                accumulated=not args.no_accumulated, hessian=args.hessian,
                                hessian_samples=args.hessian_samples, seed=seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    settings = settings_of(args, cfg.runtime.seed)
    with torch_threads(args.threads or cfg.runtime.threads):
        device = select_device(cfg.runtime.device)
        seed_everything(cfg.runtime.seed)
        fp_model = build_fp_model(cfg, device)
        trace_check(fp_model, cfg.model.leaf_modules)
        splits = data.make_splits(cfg.data)
        images, labels = data.draw_calibration(splits, cfg.data.calibration)
        result = sensitivity.analyse(cfg, fp_model, images, labels, device, settings, show_progress=not args.quiet)
        out_dir = new_run_dir(args.out or f"runs/sensitivity_{cfg.model.name}")
        result["command"] = "python -m ptqkit.tools.sensitivity " + " ".join(sys.argv[1:] if argv is None else argv)
        paths = sensitivity.write_outputs(result, out_dir)
    print(sensitivity.format_report(result))
    print(f"{result['seconds']['total']:.0f} s on {result['threads']} threads ({result['device']}); wrote "
          + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
