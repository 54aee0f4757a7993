"""QDrop (Wei et al. 2022): joint reconstruction of rounding and activation steps with activation quantization
randomly dropped, element-wise, inside the unit (`prob` = probability of KEEPING quantization) and a random
element-wise mix of quantized and full-precision unit inputs (`input_prob`)."""
from dataclasses import dataclass

from ptqkit.algorithms.engine import DropRule
from ptqkit.algorithms.reconstruction import LEARN_MODES, Reconstruction, ReconstructionConfig
from ptqkit.algorithms.registry import register
from ptqkit.schema import spec


@register("qdrop")
class QDrop(Reconstruction):
    @dataclass
    class Config(ReconstructionConfig):
        prob: float = spec(0.5, lo=0.0, hi=1.0, doc="probability of keeping activation quantization")
        input_prob: float = spec(0.5, lo=0.0, hi=1.0, doc="probability of taking the quantized unit input")
        order: str = spec("together", choices=("together", "weights_first"),
                          doc="together: rounding and steps learn jointly; weights_first: rounding with steps "
                              "fixed, then steps with rounding fixed (same iterations each)")

    def phases(self):
        p = self.params
        learn = LEARN_MODES["joint" if p.order == "together" else "weights_first"]
        return learn(self, self.name, DropRule(keep_prob=p.prob, input_prob=p.input_prob))
