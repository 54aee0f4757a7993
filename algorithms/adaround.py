"""AdaRound (Nagel et al. 2020): layer-wise learned rounding of the weights, activations in full precision
while rounding is learned; activation ranges come from the calibration observers."""
from dataclasses import dataclass

from ptqkit.algorithms.reconstruction import Reconstruction, ReconstructionConfig
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
        return [self.base_phase(learn_rounding=True, learn_act_scale=False, quant_acts=False, act_init_images=0)]
