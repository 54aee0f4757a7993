"""What every algorithm plugin shares: its config base class, the run context it receives, its base class."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ptqkit import quantize as pq  # module import: ptqkit.quantize imports algorithms.quantizers
from ptqkit.schema import spec


@dataclass
class AlgorithmConfig:
    """Base of every plugin's config. `name` is set from `algorithm.name` by the loader."""
    name: str = spec("naive", doc="registered algorithm")

    def finalize(self, cfg) -> None:
        """Resolve defaults that depend on the rest of the config (e.g. per-architecture λ)."""


@dataclass
class RunContext:
    cfg: Any                         # ptqkit.config.Config
    fp_model: nn.Module              # the full-precision model, eval mode, on `device`
    calib_images: torch.Tensor       # (N, C, H, W) on CPU
    calib_labels: torch.Tensor
    device: torch.device
    run_dir: str | None = None
    results: dict = field(default_factory=dict)  # what the algorithm adds to results.json
    show_progress: bool = True
    resume: dict | None = None       # saved progress to continue from (ptqkit.resume), reconstruction methods
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("ptq"))


class Algorithm:
    Config = AlgorithmConfig
    multi_process = False   # runs under torchrun (sharded calibration, averaged gradients): shown by a test

    def __init__(self, params: AlgorithmConfig):
        self.params = params

    def prepare(self, ctx: RunContext) -> tuple[torch.fx.GraphModule, pq.QuantLayout]:
        qmodel, layout = pq.prepare_quantized(ctx.fp_model, ctx.cfg.quant, ctx.cfg.model.leaf_modules)
        return qmodel.to(ctx.device), layout

    def run(self, ctx: RunContext) -> nn.Module:
        """Return the quantized model (fake quantizers on, observers off)."""
        raise NotImplementedError
