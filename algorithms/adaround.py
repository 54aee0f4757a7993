"""AdaRound (Nagel et al. 2020): layer-wise learned rounding of the weights, activations in full precision
while rounding is learned; activation ranges come from the calibration observers."""
from dataclasses import dataclass

from ptqkit.algorithms.engine import NO_DROP
from ptqkit.algorithms.reconstruction import Reconstruction, ReconstructionConfig, rounding
from ptqkit.algorithms.registry import register
from ptqkit.algorithms.units import GRANULARITIES
from ptqkit.schema import spec


@register("adaround")
class AdaRound(Reconstruction):
    @dataclass
    class Config(ReconstructionConfig):
        iters: int = spec(10000, lo=1, doc="iterations per layer")
        granularity: str = spec("layer", choices=GRANULARITIES)

    def phases(self):
        return rounding(self, self.name, NO_DROP)
