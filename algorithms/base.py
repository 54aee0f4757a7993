"""What every algorithm plugin shares: its config base class, the run context it receives, its base class."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ptqkit.quant import prepare as pq
from ptqkit.schema import spec


@dataclass
class AlgorithmConfig:
    """Base of every plugin's config. `name` is set from `algorithm.name` by the loader."""
    name: str = spec("naive", doc="registered algorithm")

    def finalize(self, cfg) -> None:
        """Resolve defaults that depend on the rest of the config (the model's `algorithm_defaults` are applied
        before this is called)."""


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
    resume: dict | None = None       # saved progress to continue from (ptqkit.algorithms.progress)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("ptq"))
    # top-1 of a model on the run's evaluation images (the pipeline's; None where there are none, e.g. a dry run)
    evaluate: Optional[Callable[[nn.Module, str], dict]] = None
    fp32: Optional[dict] = None      # the run's FP32 result on those images, once measured


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

    def describe(self, ctx: RunContext) -> Optional[str]:
        """The quantization plan a dry run prints (None: nothing beyond the config)."""
        return None

    def extra_evaluations(self, ctx: RunContext, qmodel: nn.Module,
                          evaluate: Callable[[nn.Module, str], dict]) -> Optional[dict]:
        """More evaluations of the returned model for results.json (e.g. PTMQ's every activation bit-width)."""
        return None
