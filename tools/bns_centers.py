"""Write the BNS centers (per-class BatchNorm input statistics, FDDA; ptqkit.algorithms.bns) of a run config's
model on its calibration images to a file.

    python -m ptqkit.tools.bns_centers --config CFG.yaml --out centers.pt [--set key.path=value ...]

The model, checkpoint, data and calibration draw come from the run config (FDDA's: one image per class,
`data.calibration.per_class: 1`); the file is what `algorithm.centers` of the `fdda` algorithm takes.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from ptqkit import data
from ptqkit.algorithms.bns import compute_bns_centers
from ptqkit.config import load_config
from ptqkit.pipeline import build_fp_model, select_device
from ptqkit.tools import cli

log = logging.getLogger("ptq.bns_centers")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config (model, checkpoint, data, calibration draw)")
    parser.add_argument("--out", required=True, help="output file (.pt)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = select_device(cfg.runtime.device)
    model = build_fp_model(cfg, device)
    splits = data.make_splits(cfg.data)
    images, labels = data.draw_calibration(splits, cfg.data.calibration)
    centers = compute_bns_centers(model, images, labels, cfg.data.calibration.batch_size, device)
    centers["model"] = cfg.model.name
    torch.save(centers, args.out)
    log.info("BNS centers of %d classes x %d BN layers (%d images) -> %s", len(centers["classes"]),
             len(centers["layers"]), len(images), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
