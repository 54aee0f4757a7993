#!/usr/bin/env python
"""Post-training quantization from a YAML config (the command lives in ptqkit/cli.py).

    python ptq_main.py --config configs/cifar10/resnet20_w4a4_naive.yaml [--set key.path=value ...] [--dry-run]
    python ptq_main.py --resume runs/resnet20_w4a4_qdrop       # continue a killed or interrupted run
    torchrun --nproc_per_node 2 ptq_main.py --config ...       # calibration sharded over 2 processes
"""
import sys

from ptqkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
