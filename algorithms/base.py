"""What every algorithm plugin shares: its config base class, the run context it receives, its base class."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ptqkit.algorithms.prepass import PREPASSES, correct_bias, equalized
from ptqkit.quant import prepare as pq
from ptqkit.quant.quantizers import act_quantizers, reset_observer
from ptqkit.schema import spec


@dataclass
class AlgorithmConfig:
    """Base of every plugin's config. `name` is set from `algorithm.name` by the loader."""
    name: str = spec("naive", doc="registered algorithm")
    prepasses: list[str] = spec(factory=list, choices=PREPASSES,
                                doc="before the method: cle (cross-layer equalization of the FP model, DFQ) and/or "
                                    "bias_correction (empirical, after calibration, on prepass_images images)")
    prepass_images: int = spec(256, lo=1, doc="calibration images bias correction measures the mean shift on")

    def finalize(self, cfg) -> None:
        """Resolve defaults that depend on the rest of the config (the model's `algorithm_defaults` are applied
        before this is called)."""

    # `quant.a.bound_grad` where the config leaves it null: the method's own convention
    BOUND_GRAD = "pass"

    def default_bound_grad(self) -> str:
        return self.BOUND_GRAD


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
    # a model already prepared and calibrated elsewhere (MQBench's flow: ptqkit.from_mqbench), used as it is
    prepared: Optional[torch.fx.GraphModule] = None


class Algorithm:
    Config = AlgorithmConfig

    @classmethod
    def expand(cls, tree: dict) -> dict:
        """The raw `algorithm` mapping before it is checked (a method with presets fills them in here)."""
        return tree
    multi_process = False   # runs under torchrun (sharded calibration, averaged gradients): shown by a test

    def __init__(self, params: AlgorithmConfig):
        self.params = params

    def runs_multi_process(self) -> bool:
        """Whether this configured method may run under torchrun."""
        return type(self).multi_process

    def prepare(self, ctx: RunContext) -> tuple[torch.fx.GraphModule, pq.QuantLayout]:
        if ctx.prepared is not None:
            return ctx.prepared, pq.layout_of(ctx.prepared)
        fp_model = ctx.fp_model
        if "cle" in self.params.prepasses:
            fp_model, ctx.results["cle"] = equalized(fp_model, ctx.cfg.model.leaf_modules)
            if not ctx.cfg.quant.fold_bn:
                ctx.log.info("cle with BN unfolded (quant.fold_bn false): the equalization goes into BN's gamma and "
                             "beta, so the first layer of each pair keeps its quantized weights; it helps per-tensor "
                             "weights with quant.fold_bn true")
        qmodel, layout = pq.prepare_quantized(fp_model, ctx.cfg.quant, ctx.cfg.model.leaf_modules)
        return qmodel.to(ctx.device), layout

    def after_calibration(self, qmodel: torch.fx.GraphModule, ctx: RunContext,
                          images: Optional[torch.Tensor] = None) -> None:
        """What follows calibration before any method learns: the bias-correction pre-pass, if asked for. The
        activation ranges were observed before the biases moved, so they are observed again on `images` (the
        calibration images), the weights' ranges staying as they are."""
        if "bias_correction" in self.params.prepasses:
            batch = ctx.cfg.data.calibration.batch_size
            ctx.results["bias_correction"] = correct_bias(qmodel, ctx.calib_images[: self.params.prepass_images],
                                                          batch, ctx.device)
            acts = act_quantizers(qmodel)
            if images is not None and acts:
                for q in acts:
                    reset_observer(q)
                pq.calibrate(qmodel, images, batch, ctx.device)

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
