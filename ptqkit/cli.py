"""The command: post-training quantization from a YAML config (`ptq_main.py` at the repository root, `ptq` or
`python -m ptqkit` when installed).

    python ptq_main.py --config configs/cifar10/resnet20_w4a4_naive.yaml [--set key.path=value ...] [--dry-run]
    python ptq_main.py --resume runs/resnet20_w4a4_qdrop       # continue a killed or interrupted run
    torchrun --nproc_per_node 2 ptq_main.py --config ...       # calibration sharded over 2 processes

Bad input (unknown key, wrong type or range, missing file, mismatched checkpoint, untraceable model) is reported
as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import warnings

from ptqkit import distributed, pipeline
from ptqkit.algorithms.progress import progress_path, read_progress
from ptqkit.config import dump_config, load_config
from ptqkit.errors import UserError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted reconstruction run in its folder, from its saved progress")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY.PATH=VALUE",
                        help="override config values (YAML syntax): --set a.b=1 c.d=2, and/or repeated")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the quantization plan, calibrate nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.overrides = [item for group in args.overrides for item in group]
    if (args.config is None) == (args.resume is None):
        parser.error("give either --config FILE or --resume RUN_DIR")
    if args.resume and (args.overrides or args.dry_run):
        parser.error("--resume continues a run with its saved config: --set and --dry-run do not apply")
    return args


def _load(args):
    """The config and, for --resume, the run folder and its saved progress."""
    if args.resume is None:
        return load_config(args.config, args.overrides), None, None
    run_dir = args.resume.rstrip("/")
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder '{run_dir}': not found")
    if os.path.exists(os.path.join(run_dir, "results.json")):
        raise UserError(f"run folder '{run_dir}': already finished (results.json is there)")
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    return cfg, run_dir, read_progress(progress_path(run_dir))


def setup_logging(run_dir: str | None, level=logging.INFO) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir:
        handlers.append(logging.FileHandler(os.path.join(run_dir, "log.txt")))
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)
    # Known, harmless noise from mqbench-torch2 on torch 2.x.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*logger.warn.*")


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = None
    made_run_dir = False
    try:
        cfg, run_dir, progress = _load(args)
        if args.dry_run:
            setup_logging(None)
            print(dump_config(cfg), end="")
            with tempfile.TemporaryDirectory() as tmp:
                plan = pipeline.run(cfg, tmp, dry_run=True, show_progress=False)["dry_run"]
            if plan:
                print(plan)
            return 0
        distributed.init(cfg.runtime.device)    # joins torchrun's process group; nothing in a single process
        main_process = distributed.is_main()
        if run_dir is None:  # one folder for all processes, made by the first
            run_dir = distributed.broadcast_object(pipeline.new_run_dir(cfg.runtime.output_dir)
                                                   if main_process else None)
            made_run_dir = main_process
        setup_logging(run_dir if main_process else None, logging.INFO if main_process else logging.WARNING)
        logging.getLogger("ptq").info("%s %s", "resuming in run folder" if progress else "run folder", run_dir)
        results = pipeline.run(cfg, run_dir, show_progress=main_process and not args.quiet, resume=progress)
        distributed.shutdown()
        if not main_process:
            return 0
    except UserError as exc:
        if made_run_dir:
            _remove_if_nothing_done(run_dir)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted_message(run_dir), file=sys.stderr)
        return 130
    q, fp = results["quant"], results["fp32"]
    print(f"{results['model']} {results['bits']} {results['algorithm']}: top-1 {q['top1']:.2f} % "
          f"(FP32 {fp['top1']:.2f} % on the same {q['images']} images) -> {run_dir}")
    return 0


def _remove_if_nothing_done(run_dir: str) -> None:
    """A run that failed before any of its work was saved (bad checkpoint, unreadable images, ...) leaves no run
    folder behind: nothing in it would be worth keeping, and the next try would otherwise get a `-2` suffix."""
    if any(os.path.exists(os.path.join(run_dir, name)) for name in ("progress.pt", "results.json")):
        return
    for handler in logging.getLogger().handlers[:]:
        if isinstance(handler, logging.FileHandler):
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)


def _interrupted_message(run_dir: str | None) -> str:
    if run_dir is None:
        return "interrupted before the run started"
    try:
        done = read_progress(progress_path(run_dir))["history"]
    except UserError:
        return f"interrupted; no unit was finished, nothing to resume in {run_dir}"
    return (f"interrupted; {len(done)} finished units are saved in {progress_path(run_dir)} "
            f"(last: {done[-1]['name']}); continue with: python ptq_main.py --resume {run_dir}")

