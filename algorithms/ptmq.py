"""PTMQ (Xu et al., AAAI 2024): post-training multi-bit quantization. One block-wise reconstruction gives a model
whose activation bit-width can be switched at run time (`activation_bits(model, bits)`) without re-optimising.

Weights have one bit-width and one learned rounding (AdaRound, the engine's), shared by every activation
bit-width. Every activation quantizer holds one step size and zero point per bit-width of the set
(`MultiBitActQuantizer`); the set is three groups low < mid < high (W4 → A{4, 6, 8}), and each iteration draws one
bit-width b_g from each group g (a group of one bit-width always gives that one). Per unit and iteration:

    f_g   = unit(x_g), the unit's multi-bit quantizers at b_g            (g = low, mid, high)
    x_g   = where(u < input_prob, x_q(b_g), x_fp)                        x_q(b): input from the partly quantized
                                                                          network, all of it at b bits
    f_mix = where(u' < mixed_p, f_fp, λ1 f_low + λ2 f_mid + λ3 f_high)   Multi-bit Feature Mixer
    L     = γ1 MSE(f_fp, f_mix) + γ2 MSE(f_high, f_mid) + γ3 MSE(f_high, f_low)   Group-wise Distillation loss
            + the engine's rounding regulariser

MSE is the mean over all elements, as in the reference code (so γ = 100 balances it against the regulariser).
Every unit learns on L, the first (stem) and the last (classifier) included: the unofficial reference code gives
those a zero reconstruction loss, and evaluates only the low bit-width; neither is copied.

Choices the paper leaves open (it released no code):
- inputs: f_g sees the unit input the deployed model has at b_g (the network before the unit at b_g bits), mixed
  element-wise with the full-precision input with probability 1 - `input_prob` (QDrop's input mix; 0.5 carries the
  mixer's FP replacement to the next unit, as the reference's mixed block output does);
- step sizes: initialised per unit and per bit-width on the unit's own inputs at that bit-width (the engine's
  `act_init_images` protocol), learned with Adam (`a_lr`, 4e-3 in the reference) under a cosine decay;
- quantizers the 8-bit conventions fix (the network input, the last layer's input when `last_layer_a_bits` is set)
  are ordinary quantizers and stay 8-bit at every selection; with `last_layer_a_bits: null` the last layer's
  input switches with the rest;
- QDrop's in-unit drop is off (`prob` 1.0): the paper's loss compares quantized features with each other.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from ptqkit import precision
from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.engine import (DropRule, Hooks, Phase, UnitCache, init_act_steps, phase_state,
                                      reconstruction_loss)
from ptqkit.algorithms.graph import prefix_module
from ptqkit.algorithms.reconstruction import Part, Reconstruction, ReconstructionConfig
from ptqkit.algorithms.registry import register
from ptqkit.algorithms.units import Unit
from ptqkit.errors import ConfigError
from ptqkit.quant import hostsync
from ptqkit.quant import prepare as pq
from ptqkit.quant.kernels import keep_mask
from ptqkit.quant.quantizers import (ActQuantizer, MultiBitActQuantizer, activation_bits, fake_quantizers,
                                     make_multibit, multibit_quantizers, reset_observer, set_activation_bits)
from ptqkit.schema import spec

log = logging.getLogger(__name__)

__all__ = ["PTMQ", "activation_bits", "set_activation_bits", "bit_groups"]

# The paper's activation sets by weight bit-width.
PAPER_BIT_SETS = {3: [3, 6, 8], 4: [4, 6, 8], 6: [6, 7, 8], 8: [6, 7, 8]}
_BITS_FORM = ("three bit groups low < mid < high, each a bit-width in [2, 8] or a list of them, e.g. [4, 6, 8] "
              "or [[3, 4], 6, 8]")


def bit_groups(value) -> Optional[list[tuple[int, ...]]]:
    """The (low, mid, high) groups of an `act_bits` value, or None if it is not of that form."""
    if not isinstance(value, list) or len(value) != 3:
        return None
    groups = []
    for entry in value:
        group = entry if isinstance(entry, list) else [entry]
        if not group or not all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in group):
            return None
        if len(set(group)) != len(group):
            return None
        groups.append(tuple(sorted(group)))
    if any(max(a) >= min(b) for a, b in zip(groups, groups[1:])):
        return None
    return groups


@dataclass
class MixerKeys:
    """PTMQ's feature mixer and distillation weights: the method's own, and `compose`'s with `act_bits`."""
    lambda1: float = spec(1 / 3, lo=0.0, doc="feature mixer weight of the low bit-width output")
    lambda2: float = spec(1 / 3, lo=0.0, doc="feature mixer weight of the mid bit-width output")
    lambda3: float = spec(1 / 3, lo=0.0, doc="feature mixer weight of the high bit-width output")
    mixed_p: float = spec(0.5, lo=0.0, hi=1.0, doc="feature mixer: probability of an element taking the FP value")
    gamma1: float = spec(100.0, lo=0.0, doc="distillation loss weight of MSE(f_fp, f_mix)")
    gamma2: float = spec(100.0, lo=0.0, doc="distillation loss weight of MSE(f_high, f_mid)")
    gamma3: float = spec(100.0, lo=0.0, doc="distillation loss weight of MSE(f_high, f_low)")


@dataclass
class PTMQConfig(MixerKeys, ReconstructionConfig):
    iters: int = spec(5000, lo=1, doc="iterations per unit")
    a_lr: float = spec(4e-3, lo=0.0, doc="Adam learning rate of the activation step sizes (cosine to 0)")
    act_bits: Any = spec(None, doc="activation bit groups low, mid, high: [4, 6, 8], or lists drawn from per "
                                   "iteration ([[3, 4], 6, 8]); must hold quant.a.bits; null = the paper's set "
                                   "for quant.w.bits (W3 [3, 6, 8], W4 [4, 6, 8], W6/W8 [6, 7, 8])")
    input_prob: float = spec(0.5, lo=0.0, hi=1.0, doc="probability of taking the quantized unit input (else FP)")
    prob: float = spec(1.0, lo=0.0, hi=1.0, doc="QDrop keep probability inside the unit (1.0 = no drop)")

    def check(self, path: str) -> None:
        if self.act_bits is not None and bit_groups(self.act_bits) is None:
            raise ConfigError(f"{path}.act_bits", _BITS_FORM, self.act_bits)

    def finalize(self, cfg) -> None:
        super().finalize(cfg)
        if cfg.quant.a.bits is None:
            raise ConfigError("quant.a.bits", "a bit-width (PTMQ switches activation bit-widths; weight-only "
                              "quantization has no activation quantizer)", None)
        if self.act_bits is None:
            w_bits = cfg.quant.w.bits
            if w_bits not in PAPER_BIT_SETS:
                raise ConfigError("algorithm.act_bits", f"a bit set (the paper has none for W{w_bits}): "
                                  + _BITS_FORM, None)
            self.act_bits = list(PAPER_BIT_SETS[w_bits])
        check_bit_set(self.act_bits, cfg)


def check_bit_set(act_bits, cfg) -> None:
    """The bit set must hold quant.a.bits: the bit-width the model is returned, evaluated and saved at."""
    bits = sorted({b for g in bit_groups(act_bits) for b in g})
    if cfg.quant.a.bits not in bits:
        raise ConfigError("algorithm.act_bits", f"a set holding quant.a.bits = {cfg.quant.a.bits} (the "
                          "bit-width the model is returned, evaluated and saved at)", act_bits)


class PTMQHooks(Hooks):
    """The per-bit-width unit inputs, step initialisation and loss of PTMQ, on top of the engine's loop."""

    def __init__(self, gm: fx.GraphModule, images: torch.Tensor, device: torch.device, store: torch.device,
                 dtype: torch.dtype, batch: int, params: PTMQConfig, default_bits: int):
        self.gm, self.images, self.device, self.store, self.dtype = gm, images, device, store, dtype
        self.batch, self.params, self.default_bits = batch, params, default_bits
        self.groups = bit_groups(params.act_bits)
        self.bit_set = sorted({b for g in self.groups for b in g})
        self.records: list[dict] = []
        self._unit_state = None

    # -------------------------------------------------------------------------------------- per unit
    @torch.no_grad()
    def _inputs_by_bits(self, unit: Unit, cache: UnitCache, phase: Phase) -> dict[int, torch.Tensor]:
        inputs = {self.default_bits: cache.q_in}
        others = [b for b in self.bit_set if b != self.default_bits]
        if unit.input.op == "placeholder":
            return {**inputs, **{b: cache.q_in for b in others}}
        prefix = prefix_module(self.gm, [unit.input])
        for bits in others:
            values = []
            with phase_state(self.gm, phase), activation_bits(self.gm, bits):
                for start in range(0, len(self.images), self.batch):
                    (value,) = prefix(self.images[start:start + self.batch].to(self.device))
                    values.append(value.to(self.store, self.dtype))
            inputs[bits] = torch.cat(values)
        return inputs

    def unit_start(self, unit: Unit, module: fx.GraphModule, cache: UnitCache, phase: Phase) -> UnitCache:
        quantizers = [q for q in unit.act_quantizers if isinstance(q, MultiBitActQuantizer)]
        inputs = self._inputs_by_bits(unit, cache, phase)
        if self.params.act_init_images > 0:
            # The default bit-width last: quantizers fixed by the conventions keep the range seen at it.
            for bits in sorted(self.bit_set, key=lambda b: b == self.default_bits):
                with activation_bits(quantizers, bits):
                    init_act_steps(module, unit, UnitCache(inputs[bits], None, None), self.params.act_init_images,
                                   self.batch, self.device)
        self._unit_state = (module, cache, phase, quantizers, inputs)
        return cache

    def reconstruction(self, unit, module, batch, it, phase):
        p = self.params
        _, _, _, quantizers, inputs = self._unit_state
        drawn = [g[0] if len(g) == 1 else g[hostsync.host_int(torch.randint(len(g), ()))] for g in self.groups]
        outs = []
        for bits in drawn:
            # the phase's drop rule (QDrop's input mix) on the input the deployed model has at these bits
            x = phase.drop.unit_input(inputs[bits], batch.cache.fp_in, batch.idx, self.device)
            with activation_bits(quantizers, bits):
                outs.append(precision.float32(module(x)))   # blended and compared in float32
        f_low, f_mid, f_high = outs
        blend = p.lambda1 * f_low + p.lambda2 * f_mid + p.lambda3 * f_high
        target = batch.target
        mixed = torch.where(keep_mask(blend.shape, p.mixed_p, blend.device), target, blend)
        parts = {"gd_fp_mix": F.mse_loss(mixed, target), "gd_high_mid": F.mse_loss(f_mid, f_high),
                 "gd_high_low": F.mse_loss(f_low, f_high)}
        rec = p.gamma1 * parts["gd_fp_mix"] + p.gamma2 * parts["gd_high_mid"] + p.gamma3 * parts["gd_high_low"]
        return mixed, rec, parts

    @torch.no_grad()
    def unit_end(self, unit: Unit) -> None:
        """Record the hardened unit's error at every bit-width, each on its own inputs (no mixing)."""
        module, cache, phase, quantizers, inputs = self._unit_state
        errors = {}
        with phase_state(self.gm, phase):
            for bits in self.bit_set:
                total = 0.0
                with activation_bits(quantizers, bits):
                    for start in range(0, len(cache.fp_out), self.batch):
                        x = inputs[bits][start:start + self.batch].to(self.device, torch.float32)
                        target = cache.fp_out[start:start + self.batch].to(self.device, torch.float32)
                        total += reconstruction_loss(module(x), target, 2.0).item() * len(x)
                errors[bits] = total / max(len(cache.fp_out), 1)
        self.records.append({"name": unit.name, "final_rec_loss_by_bits": errors})
        log.info("ptmq %-24s final rec loss %s", unit.name,
                 ", ".join(f"A{b} {e:.5g}" for b, e in errors.items()))
        self._unit_state = None

    def results(self) -> dict:
        return {"ptmq": {"bit_groups": [list(g) for g in self.groups], "bit_set": self.bit_set,
                         "active_bits": self.default_bits, "units": self.records}}


@dataclass
class MultiBit(Part):
    """PTMQ's multi-bit activations as a part: every activation quantizer but those the 8-bit conventions fix
    holds one step per bit-width of `params.act_bits`, steps are initialised per bit-width on each unit's own
    inputs, the loss is PTMQ's mixer and group-wise distillation, and the model is evaluated at every bit-width.
    `params` holds the PTMQConfig keys (act_bits, lambda1-3, mixed_p, gamma1-3, act_init_images, cache_device,
    cache_dtype)."""
    params: Any
    name = "multibit"
    multi_process = False   # its multi-bit quantizers are not merged over processes yet

    @property
    def groups(self) -> list[tuple[int, ...]]:
        return bit_groups(self.params.act_bits)

    @property
    def bit_set(self) -> list[int]:
        return sorted({b for g in self.groups for b in g})

    def phase(self, phase: Phase) -> Phase:
        # Steps are initialised per bit-width by PTMQHooks, and the drop rule applied to each bit-width's input.
        return dataclasses.replace(phase, act_init_images=0)

    def prepare(self, qmodel, layout, ctx: RunContext) -> None:
        """Every activation quantizer multi-bit, except those the conventions or quant.layers entries fix."""
        fixed = set(layout.input_quantizers) | set(layout.layer_act_quantizers)
        if layout.last_input_quantizer is not None and ctx.cfg.quant.last_layer_a_bits is not None:
            fixed.add(layout.last_input_quantizer)
        names = [n for n, q in fake_quantizers(qmodel) if isinstance(q, ActQuantizer) and n not in fixed]
        for name in names:
            make_multibit(qmodel, name, self.bit_set, ctx.cfg.quant.a.bits)

    def calibrate(self, qmodel, ctx: RunContext, batch: int) -> bool:
        if self.params.act_init_images > 0:
            # Every unit re-observes its activation ranges at each bit-width on its own inputs: this pass only
            # sets the weight ranges.
            images, passes = ctx.calib_images[:batch], [ctx.cfg.quant.a.bits]
        else:
            images, passes = ctx.calib_images, self.bit_set
        with tqdm(total=len(images) * len(passes), desc="calibrate", unit="img",
                  disable=not ctx.show_progress) as bar:
            for bits in passes:
                with activation_bits(qmodel, bits):
                    for q in multibit_quantizers(qmodel):
                        reset_observer(q)
                    pq.calibrate(qmodel, images, batch, ctx.device, bar)
        return True

    def hooks(self, qmodel, units, ctx: RunContext, method) -> Hooks:
        p = self.params
        store = ctx.device if p.cache_device == "auto" else torch.device(p.cache_device)
        return PTMQHooks(qmodel, ctx.calib_images, ctx.device, store, getattr(torch, p.cache_dtype),
                         method.engine_settings(ctx).eval_batch, p, ctx.cfg.quant.a.bits)

    def notes(self, qmodel) -> str:
        fixed = [f"{n} ({q.bitwidth} bit)" for n, q in fake_quantizers(qmodel)
                 if isinstance(q, ActQuantizer) and not isinstance(q, MultiBitActQuantizer)]
        groups = ", ".join("/".join(map(str, g)) for g in self.groups)
        return (f"activation bit groups (low, mid, high): {groups}; {len(multibit_quantizers(qmodel))} multi-bit "
                "activation quantizers; fixed by the conventions: " + (", ".join(fixed) or "none"))

    def extra_evaluations(self, ctx: RunContext, qmodel, evaluate) -> dict:
        """The model at every activation bit-width of its set, FP32 (the run's, on the same images) beside."""
        fp32 = ctx.fp32 if ctx.fp32 is not None else evaluate(ctx.fp_model, "eval fp32")
        w_bits, rows = ctx.cfg.quant.w.bits, {}
        for bits in self.bit_set:
            with activation_bits(qmodel, bits):
                result = evaluate(qmodel, f"eval A{bits}")
            rows[f"W{w_bits}A{bits}"] = {**result, "act_bits": bits, "fp32_top1": fp32["top1"],
                                         "drop_top1": round(fp32["top1"] - result["top1"], 3)}
            log.info("ptmq W%dA%d top-1 %.2f %% (FP32 %.2f %% on the same %d images)", w_bits, bits,
                     result["top1"], fp32["top1"], result["images"])
        return {"activation_bits": rows}


@register("ptmq")
class PTMQ(Reconstruction):
    multi_process = False   # its multi-bit quantizers are not merged over processes yet
    Config = PTMQConfig

    def phases(self) -> list[Phase]:
        p = self.params
        return [self.base_phase(learn_rounding=True, learn_act_scale=True, quant_acts=True,
                                drop=DropRule(keep_prob=p.prob, input_prob=p.input_prob))]

    def make_parts(self):
        return [MultiBit(self.params)]
