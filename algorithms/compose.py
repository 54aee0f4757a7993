"""`compose`: a reconstruction method assembled from YAML out of the parts of the published ones.

    algorithm:
      name: compose
      preset: mrecg          # optional: start from a published method's settings (qdrop, brecq_joint, brecq,
      pd: true               # adaround, pdquant, mrecg, ptmq), then change any part
      dc: false

The parts, each a config key (every default is QDrop's):
- what learns in which phase (`learn`): joint (rounding and activation steps together: QDrop, MQBench's BRECQ,
  PD-Quant, PTMQ), weights_first (rounding, then steps), two_stage (BRECQ: rounding with FP activations, then
  steps), rounding (AdaRound: rounding with FP activations), rounding_fixed_acts (rounding with activations
  quantized at their calibrated steps: MQBench's AdaRound);
- drop rule: `prob` (keep probability of activation quantization inside the unit) and `input_prob` (of the
  quantized unit input); 1.0 and 1.0 = no drop;
- loss terms: the reconstruction error (`rec_p`), PD-Quant's prediction difference (`pd`, with `lamb_r`, `T`,
  `pd_output`), and registered terms of one's own (`terms: {name: {arguments}}`);
- target: the FP output, or PD-Quant's distribution-corrected one (`dc`, with `lamb_c`, `bn_lr`, `dc_steps`,
  `dc_batch`);
- unit grouping: `granularity` (layer, block, stage), or MRECG's groups on top of it (`grouping: mrecg`, with
  `scheme`, `top_k`, `capacity`, ...);
- activation bit-widths: one (`act_bits: null`), or PTMQ's multi-bit set (`act_bits: paper` or groups);
- pre-passes (`prepasses`, every method has them).
A preset fills every key the published method has with that method's value (and turns its parts on); keys set
beside it win. `--dry-run` prints the resolved composition. A preset alone gives exactly the published method's
run (tests/algorithms/test_compose.py compares loss histories bit for bit).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ptqkit.algorithms.adaround import AdaRound
from ptqkit.algorithms.brecq import Brecq, BrecqJoint
from ptqkit.algorithms.engine import DropRule, Phase
from ptqkit.algorithms.mrecg import MRECG, GroupingKeys, MRECGGrouping
from ptqkit.algorithms.pdquant import PDKeys, PDQuant, DistributionCorrection, PredictionDifference
from ptqkit.algorithms.ptmq import PAPER_BIT_SETS, PTMQ, MixerKeys, MultiBit, PTMQConfig, check_bit_set
from ptqkit.algorithms.qdrop import QDrop
from ptqkit.algorithms.reconstruction import LEARN_MODES, Reconstruction, ReconstructionConfig
from ptqkit.algorithms.registry import get_term, register
from ptqkit.errors import ConfigError
from ptqkit.schema import spec

LEARN = tuple(LEARN_MODES)
# preset -> (the published method, the parts it turns on / the settings it has that are not keys of its own)
PRESETS: dict[str, tuple[type, dict]] = {
    "qdrop": (QDrop, {"learn": "joint"}),
    "brecq_joint": (BrecqJoint, {"learn": "joint", "prob": 1.0, "input_prob": 1.0}),
    "brecq": (Brecq, {"learn": "two_stage", "prob": 1.0, "input_prob": 1.0}),
    "adaround": (AdaRound, {"learn": "rounding", "prob": 1.0, "input_prob": 1.0}),
    "pdquant": (PDQuant, {"learn": "joint"}),
    "mrecg": (MRECG, {"learn": "joint", "grouping": "mrecg"}),      # MRECG on QDrop, its default base
    "ptmq": (PTMQ, {"learn": "joint", "act_bits": "paper"}),
}


@dataclass
class ComposeConfig(GroupingKeys, MixerKeys, PDKeys, ReconstructionConfig):
    """Every part's keys: the drop rule, BRECQ's second stage and the switches here; PD-Quant's (`PDKeys`), MRECG's
    (`GroupingKeys`, used with `grouping: mrecg`) and PTMQ's (`MixerKeys`, used with `act_bits`) from their files."""
    preset: Optional[str] = spec(None, choices=tuple(PRESETS),
                                 doc="start from a published method's settings; keys set beside it win")
    learn: str = spec("joint", choices=LEARN,
                      doc="joint | weights_first | two_stage (BRECQ) | rounding (AdaRound) | rounding_fixed_acts "
                          "(MQBench's AdaRound): what learns in which phase")
    # drop rule (QDrop)
    prob: float = spec(0.5, lo=0.0, hi=1.0, doc="drop rule: probability of keeping activation quantization")
    input_prob: float = spec(0.5, lo=0.0, hi=1.0, doc="drop rule: probability of taking the quantized unit input")
    # BRECQ's second stage (learn: two_stage)
    act_iters: int = spec(5000, lo=0, doc="two_stage: iterations per unit learning activation steps")
    act_lr: float = spec(4e-4, lo=0.0, doc="two_stage: Adam learning rate of the steps (cosine)")
    act_p: float = spec(2.4, lo=1.0, hi=4.0, doc="two_stage: norm of the second stage's reconstruction loss")
    # loss terms
    pd: bool = spec(False, doc="PD-Quant's prediction-difference term")
    terms: dict = spec(factory=dict, doc="registered loss terms of one's own: {name: {keyword arguments}}")
    # target
    dc: bool = spec(False, doc="PD-Quant's distribution correction of each unit's FP input (needs fold_bn false)")
    # grouping (MRECG)
    grouping: str = spec("units", choices=("units", "mrecg"),
                         doc="units: one unit per granularity step; mrecg: MRECG's groups of them")
    # activation bit-widths (PTMQ)
    act_bits: Any = spec(None, doc="null = one bit-width (quant.a.bits); paper = PTMQ's set for quant.w.bits; or "
                                   "groups low, mid, high, e.g. [4, 6, 8]")

    def default_bound_grad(self) -> str:
        """The preset's method's own (stop for brecq_joint), else QDrop's."""
        return PRESETS[self.preset][0].Config.BOUND_GRAD if self.preset else self.BOUND_GRAD

    def check(self, path: str) -> None:
        GroupingKeys.check(self, path)                          # the scheme's form
        PDKeys.check(self, path)
        if self.act_bits not in (None, "paper"):
            PTMQConfig.check(self, path)                        # the groups' form
        for name, args in self.terms.items():
            get_term(name)
            if not isinstance(args, dict):
                raise ConfigError(f"{path}.terms.{name}", "a mapping of the term's keyword arguments", args)

    def finalize(self, cfg) -> None:
        super().finalize(cfg)                                   # PDKeys: T, lamb_c, dc with folded BN
        if self.act_bits is not None:
            if cfg.quant.a.bits is None:
                raise ConfigError("algorithm.act_bits", "null with quant.a.bits null (weight-only quantization has "
                                  "no activation quantizer to switch)", self.act_bits)
            if self.learn != "joint":
                raise ConfigError("algorithm.act_bits", f"null with learn {self.learn} (PTMQ's multi-bit loss "
                                  "learns rounding and steps together: learn joint)", self.act_bits)
            if self.act_bits == "paper":
                if cfg.quant.w.bits not in PAPER_BIT_SETS:
                    raise ConfigError("algorithm.act_bits", f"a bit set (the paper has none for W{cfg.quant.w.bits})",
                                      "paper")
                self.act_bits = list(PAPER_BIT_SETS[cfg.quant.w.bits])
            check_bit_set(self.act_bits, cfg)


@register("compose")
class Compose(Reconstruction):
    Config = ComposeConfig

    @classmethod
    def expand(cls, tree: dict) -> dict:
        """The algorithm mapping with a preset's values under the keys set beside it."""
        preset = tree.get("preset")
        if preset is None or preset not in PRESETS:
            return tree                                         # an unknown preset is refused by the schema
        return {**preset_values(preset), **tree}

    def phases(self) -> list[Phase]:
        p = self.params
        return LEARN_MODES[p.learn](self, p.preset or self.name, DropRule(keep_prob=p.prob, input_prob=p.input_prob))

    def make_parts(self):
        p = self.params
        parts = []
        if p.grouping == "mrecg":
            parts.append(MRECGGrouping(p, "mrecg groups"))
        if p.act_bits is not None:
            parts.append(MultiBit(p))
        if p.pd:
            parts.append(PredictionDifference(p.lamb_r, p.T, p.pd_output, p.granularity))
        if p.dc:
            parts.append(DistributionCorrection(p.lamb_c, p.bn_lr, p.dc_steps, p.dc_batch))
        for name, args in p.terms.items():
            try:
                parts.append(get_term(name)(**args))
            except TypeError as exc:
                raise ConfigError(f"algorithm.terms.{name}", f"arguments its class accepts ({exc})", args) from None
        return parts

    def describe(self, ctx) -> str:
        return composition(self.params) + "\n" + super().describe(ctx)


def preset_values(preset: str) -> dict:
    """Every key of `compose` that the published method has, at that method's default, plus its parts."""
    method, switches = PRESETS[preset]
    ours = {f.name for f in dataclasses.fields(ComposeConfig) if f.init}
    values = {}
    for f in dataclasses.fields(method.Config):
        if f.init and f.name in ours and f.name != "name":
            values[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    # a key the method leaves null means "as my base has it" (MRECG's act_init_images)
    inherited = {k: v for k, v in method.inherited_defaults().items() if k in ours and k != "name" and values.get(k) is None}
    return {**values, **inherited, **switches}


def composition(p: ComposeConfig) -> str:
    """One line per part, as a dry run prints them."""
    drop = "none" if p.prob >= 1.0 and p.input_prob >= 1.0 else f"keep {p.prob:g}, quantized input {p.input_prob:g}"
    loss = [f"reconstruction (p = {p.rec_p:g})"]
    if p.pd:
        loss.append(f"prediction difference (1 / lamb_r = {1 / p.lamb_r:g}, T = {p.T:g}, output {p.pd_output})")
    loss += [f"{name} {args}" for name, args in p.terms.items()]
    target = (f"distribution-corrected FP output (lamb_c {p.lamb_c:g}, {p.dc_steps} steps per {p.dc_batch} images)"
              if p.dc else "FP output")
    grouping = p.granularity + (f", MRECG groups (scheme {p.scheme}" + (
        f", capacity {p.capacity}, top_k {p.top_k})" if p.scheme == "auto" else ")") if p.grouping == "mrecg" else "")
    bits = "one" if p.act_bits is None else f"multi-bit {p.act_bits}"
    lines = [f"composition{f' (from preset {p.preset})' if p.preset else ''}:",
             f"  learn:       {p.learn}",
             f"  drop rule:   {drop}",
             f"  loss:        {' + '.join(loss)}",
             f"  target:      {target}",
             f"  grouping:    {grouping}",
             f"  act bits:    {bits}",
             f"  pre-passes:  {', '.join(p.prepasses) or 'none'}"]
    return "\n".join(lines)
