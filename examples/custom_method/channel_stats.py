"""An out-of-tree method for ptqkit, in one file: QDrop plus a loss on the statistics of each unit's output.

Block reconstruction matches a unit's quantized output to its FP output element by element. Weight rounding at 2
bits also moves each output channel's mean and spread, and the next unit's activation quantizer and BN-free
residual path see that shift in every image. This term adds, per unit, the squared differences of the per-channel
mean and standard deviation (over images and positions) of the quantized output and the FP target:

    L = L_rec + stats_weight * sum_c [ (mu_q,c - mu_fp,c)^2 + (sigma_q,c - sigma_fp,c)^2 ]

It registers two things (docs/NEW_METHOD.md walks through them):
- `qdrop_stats`, a method: `algorithm: {name: qdrop_stats, stats_weight: 1.0, ...}`;
- `channel_stats`, a loss term any composition can add: `algorithm: {name: compose, preset: pdquant,
  terms: {channel_stats: {weight: 1.0}}}`.
A config loads this file with `custom_imports: [channel_stats]` (looked up beside the config, then in the
working directory, then on the Python path); nothing in the ptqkit package changes.
"""
from dataclasses import dataclass

from ptqkit.algorithms.engine import Hooks
from ptqkit.algorithms.qdrop import QDrop
from ptqkit.algorithms.reconstruction import Part
from ptqkit.algorithms.registry import register, register_term
from ptqkit.schema import spec


class ChannelStatsHooks(Hooks):
    """Adds the statistics term to every iteration's loss (logged as `stats` in each unit's history)."""

    def __init__(self, weight: float):
        self.weight = weight

    def extra_loss(self, unit, out_q, batch, it, phase):
        if out_q.dim() != 4:                  # the classifier's logits: no channels over positions
            return {}
        dims = (0, 2, 3)
        target = batch.target
        mean = (out_q.mean(dims) - target.mean(dims)).square().sum()
        std = (out_q.std(dims) - target.std(dims)).square().sum()
        return {"stats": self.weight * (mean + std)}


@register_term("channel_stats")
class ChannelStats(Part):
    """The term as a part: a method adds it in `make_parts`, a composition under `terms`."""
    name = "channel_stats"

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    def hooks(self, qmodel, units, ctx, method):
        return ChannelStatsHooks(self.weight)


@register("qdrop_stats")
class QDropStats(QDrop):
    """QDrop with the channel-statistics term. Everything else (phases, drop rule, units) is QDrop's."""

    @dataclass
    class Config(QDrop.Config):
        stats_weight: float = spec(1.0, lo=0.0, doc="weight of the channel-statistics term")

    def make_parts(self):
        return super().make_parts() + [ChannelStats(self.params.stats_weight)]
