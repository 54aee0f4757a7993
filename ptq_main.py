#!/usr/bin/env python
"""Post-training quantization from a YAML config.

    python ptq_main.py --config configs/cifar10/resnet20_w4a4_naive.yaml [--set key.path=value ...] [--dry-run]

Bad input (unknown key, wrong type or range, missing file, mismatched checkpoint, untraceable model) is reported
as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value (YAML syntax), repeatable")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the quantization plan, calibrate nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def setup_logging(run_dir: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir:
        handlers.append(logging.FileHandler(os.path.join(run_dir, "log.txt")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)
    # Known, harmless noise from mqbench-torch2 on torch 2.x.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*logger.warn.*")


def main(argv=None) -> int:
    args = parse_args(argv)
    from ptqkit.errors import UserError
    try:
        from ptqkit.config import dump_config, load_config
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            setup_logging(None)
            print(dump_config(cfg), end="")
            import tempfile
            from ptqkit import pipeline
            with tempfile.TemporaryDirectory() as tmp:
                plan = pipeline.run(cfg, tmp, dry_run=True, show_progress=False)["dry_run"]
            if plan:
                print(plan)
            return 0
        from ptqkit import pipeline
        run_dir = pipeline.new_run_dir(cfg.runtime.output_dir)
        setup_logging(run_dir)
        logging.getLogger("ptq").info("run folder %s", run_dir)
        results = pipeline.run(cfg, run_dir, show_progress=not args.quiet)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    q, fp = results["quant"], results["fp32"]
    print(f"{results['model']} {results['bits']} {results['algorithm']}: top-1 {q['top1']:.2f} % "
          f"(FP32 {fp['top1']:.2f} % on the same {q['images']} images) -> {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
