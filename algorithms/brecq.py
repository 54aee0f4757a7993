"""BRECQ (Li et al. 2021) as published, and MQBench's joint variant.

`brecq`: two stages. (1) block-wise AdaRound with activations in full precision (inputs from the partly
quantized network, weights only); (2) activation step sizes re-initialised on a few images and learned per
block with the weights fixed, under an L_p loss (p = 2.4).
`brecq_joint`: MQBench's "BRECQ" — rounding and activation steps learned together with activations quantized,
i.e. QDrop with keep probability 1. As in MQBench's `ptq_reconstruction`, its reference, the activation steps start
from the global calibration (`act_init_images: 0`); QDrop's original code re-observes them on each unit's cached
inputs (256). Which of the two serves better depends on the network's depth and on `quant.fold_bn` and
`quant.a.bound_grad`; docs/RESULTS.md has the measured comparisons. Unlike the other methods, its activation
steps default to `quant.a.bound_grad: stop` (`Config.BOUND_GRAD`).
"""
from dataclasses import dataclass

from ptqkit.algorithms.engine import NO_DROP
from ptqkit.algorithms.reconstruction import Reconstruction, ReconstructionConfig, joint, two_stage
from ptqkit.algorithms.registry import register
from ptqkit.schema import spec


@register("brecq")
class Brecq(Reconstruction):
    @dataclass
    class Config(ReconstructionConfig):
        act_iters: int = spec(5000, lo=0, doc="stage 2: iterations per block learning activation steps")
        act_lr: float = spec(4e-4, lo=0.0, doc="stage 2: Adam learning rate of the steps (cosine)")
        act_p: float = spec(2.4, lo=1.0, hi=4.0, doc="stage 2: norm of the reconstruction loss")
        act_init_images: int = spec(64, lo=0)

        def finalize(self, cfg) -> None:
            super().finalize(cfg)
            if cfg.quant.a.bits is None:   # weight-only: there are no activation steps to learn
                self.act_iters = 0

    def phases(self):
        return two_stage(self, self.name, NO_DROP)


@register("brecq_joint")
class BrecqJoint(Reconstruction):
    @dataclass
    class Config(ReconstructionConfig):
        act_init_images: int = spec(0, lo=0, doc="re-observe each unit's activation ranges on this many of its "
                                                  "cached inputs before learning (0 = keep the global calibration, "
                                                  "as MQBench)")

        # Its activations are quantized at every iteration, so the gradient at the grid's ends reaches every
        # element QDrop's drop would have spared; `stop` is what MQBench's own quantizer computes on the torch
        # this toolkit runs (docs/MQBENCH_GAP.md) and is the better of the two on every network measured
        # (docs/RESULTS.md, ResNet-20 and ResNet-56).
        BOUND_GRAD = "stop"

    def phases(self):
        return joint(self, self.name, NO_DROP)
