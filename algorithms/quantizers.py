"""MQBench fake-quant modules extended with what reconstruction needs, and context managers over their state.

- `WeightQuantizer` (an MQBench `AdaRoundFakeQuantize`): round-to-nearest until `init_rounding` is called; then
  learned rounding with the rectified sigmoid h(V) (soft), and `harden()` writes the hard-rounded weights back so
  that plain round-to-nearest reproduces them and the learned state can be dropped.
- `ActQuantizer` (an MQBench `QDropFakeQuantize`): LSQ-style learnable step size with a keep probability: each
  element is quantized with probability `keep_prob` (QDrop), otherwise passed through in full precision.
- `MultiBitActQuantizer` (an `ActQuantizer`): one step size and zero point per bit-width of a set, `active_bits`
  selecting the one in use (PTMQ); `activation_bits(model, bits)` switches a whole model at run time.

All three register themselves in MQBench's fake-quant table so `prepare_by_platform` inserts them by name.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from mqbench import prepare_by_platform as _mq_prepare
from mqbench.fake_quantize.adaround_quantizer import AdaRoundFakeQuantize
from mqbench.fake_quantize.qdrop_quantizer import QDropFakeQuantize
from mqbench.fake_quantize.quantize_base import QuantizeBase

ZETA, GAMMA = 1.1, -0.1


def _broadcast(t: torch.Tensor, like: torch.Tensor, ch_axis: int) -> torch.Tensor:
    if ch_axis == -1 or t.numel() == 1:
        return t
    shape = [1] * like.dim()
    shape[ch_axis] = like.shape[ch_axis]
    return t.reshape(shape)


class WeightQuantizer(AdaRoundFakeQuantize):
    """Weight fake-quant: nearest rounding, or learned AdaRound rounding once `init_rounding` was called."""

    def init_rounding(self, weight: torch.Tensor) -> None:
        """Start learned rounding at V such that h(V) equals the fractional part of w / s."""
        self.adaround = True
        self.round_mode = "learned_hard_sigmoid"
        self.gamma, self.zeta = GAMMA, ZETA
        self.observer_enabled[0] = 0
        self.fake_quant_enabled[0] = 1
        scale = _broadcast(self.scale.data, weight, self.ch_axis)
        rest = weight.detach() / scale - torch.floor(weight.detach() / scale)
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        self.alpha = nn.Parameter(alpha)

    def soft_rounding(self) -> torch.Tensor:
        """h(V) in [0, 1], the learned rounding offset added to floor(w / s)."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    @torch.no_grad()
    def harden(self, weight: nn.Parameter) -> None:
        """Write the hard-rounded weights into `weight` and go back to nearest rounding (which now reproduces them)."""
        weight.data.copy_(self.get_hard_value(weight.data))
        self.adaround = False
        del self.alpha


def keep_mask(shape, keep_prob: float, device) -> torch.Tensor:
    """Bernoulli(keep_prob) mask. On CPU, 8 (or 16) random bits per element from 64-bit draws: about 4x faster
    than `rand_like` there; `keep_prob` is then realised to 1/256 (1/65536) resolution, exactly for 0.5."""
    if device.type != "cpu":
        return torch.rand(shape, device=device) < keep_prob
    n = math.prod(shape)
    if float(keep_prob * 256).is_integer():
        draws = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 7) // 8,), dtype=torch.int64)
        return draws.view(torch.uint8)[:n].view(shape) < int(keep_prob * 256)
    draws = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    return draws.view(torch.int16)[:n].view(shape) < int(round(keep_prob * 65536)) - 32768


class _LsqDropFn(torch.autograd.Function):
    """Per-tensor fake quantization with an LSQ step-size gradient and QDrop's keep mask, in one autograd node.

    out = keep ? (clamp(round(x/s) + z, qmin, qmax) - z) * s : x. Straight-through: d out/dx = 1 inside the
    integer range (and where dropped), 0 where clamped; d out/ds = round(x/s) - x/s inside, (clamped int - z)
    outside, 0 where dropped — exactly what MQBench's STE formula gives through autograd.

    On activation-sized tensors every elementwise pass and every fresh allocation costs about as much as the
    convolution, so the forward builds only what the backward needs — the d out/ds factor (float, in the x/s
    buffer) and the clamped-and-kept mask (bool) — and the backward is one masked copy and one dot product.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, mask):
        ds = x / scale
        q = torch.round(ds)
        # clamp(round + z, qmin, qmax) - z == clamp(round, qmin - z, qmax - z) exactly for integer-valued floats
        qc = torch.clamp(q, qmin - zero_point, qmax - zero_point)
        clamped = torch.ne(q, qc, out=torch.empty_like(q, dtype=torch.bool))
        del q
        ds.masked_fill_(clamped, 0.0)
        torch.sub(qc, ds, out=ds)                 # round(x/s) - x/s inside, clamped int - z outside
        out = qc.mul_(scale)
        if mask is not None:
            torch.where(mask, out, x, out=out)
            ds.mul_(mask)
            clamped.logical_and_(mask)
        ctx.save_for_backward(ds, clamped)
        return out

    @staticmethod
    def backward(ctx, grad):
        ds, clamped = ctx.saved_tensors
        grad_x = grad.masked_fill(clamped, 0.0)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = torch.dot(grad.reshape(-1), ds.reshape(-1)).reshape(1)
        return grad_x, grad_scale, None, None, None, None


class ActQuantizer(QDropFakeQuantize):
    """Activation fake-quant with a learnable step size and QDrop's element-wise keep probability."""

    @property
    def keep_prob(self) -> float:
        return self.prob

    @keep_prob.setter
    def keep_prob(self, value: float) -> None:
        self.prob = float(value)

    def step_parameters(self) -> list[nn.Parameter]:
        """The learnable step sizes reconstruction optimises (one here; a multi-bit quantizer has one per bit-width)."""
        return [self.scale]

    def forward(self, X):
        if self.observer_enabled[0] == 1 or self.fake_quant_enabled[0] != 1 or self.is_per_channel:
            return super().forward(X)
        zp = self.zero_point.to(X.dtype)
        if not torch.is_grad_enabled() and self.prob >= 1.0:
            # Inference: the same formula in place. torch's fused fake_quantize kernel is several times slower
            # than this on CPU (it also builds a gradient mask).
            scale = self.scale.detach()
            return X.div(scale).round_().add_(zp).clamp_(self.quant_min, self.quant_max).sub_(zp).mul_(scale)
        mask = keep_mask(X.shape, self.prob, X.device) if self.prob < 1.0 else None
        return _LsqDropFn.apply(X, self.scale, zp, self.quant_min, self.quant_max, mask)


_mq_prepare.FakeQuantizeDict.setdefault("PTQWeightQuantizer", WeightQuantizer)
_mq_prepare.FakeQuantizeDict.setdefault("PTQActQuantizer", ActQuantizer)


# ------------------------------------------------------------------------------------------ state switches
def fake_quantizers(module: nn.Module) -> Iterator[tuple[str, QuantizeBase]]:
    for name, m in module.named_modules():
        if isinstance(m, QuantizeBase):
            yield name, m


def weight_quantizers(module: nn.Module) -> list[WeightQuantizer]:
    return [m for _, m in fake_quantizers(module) if isinstance(m, WeightQuantizer)]


def act_quantizers(module: nn.Module) -> list[ActQuantizer]:
    return [m for _, m in fake_quantizers(module) if isinstance(m, ActQuantizer)]


def _flags(quantizers: Iterable[QuantizeBase]):
    return [(q, int(q.observer_enabled[0]), int(q.fake_quant_enabled[0])) for q in quantizers]


@contextlib.contextmanager
def quant_state(module: nn.Module, *, observe: bool | None = None, quantize: bool | None = None,
                only: Iterable[QuantizeBase] | None = None):
    """Set observer / fake-quant switches of the quantizers in `module` (or `only` those), restore them after."""
    quantizers = list(only) if only is not None else [q for _, q in fake_quantizers(module)]
    saved = _flags(quantizers)
    try:
        for q in quantizers:
            if observe is not None:
                q.observer_enabled[0] = int(observe)
            if quantize is not None:
                q.fake_quant_enabled[0] = int(quantize)
        yield
    finally:
        for q, obs, fq in saved:
            q.observer_enabled[0] = obs
            q.fake_quant_enabled[0] = fq


def calibration_mode(module: nn.Module):
    """Observers record ranges on full-precision values (fake quantization off)."""
    return quant_state(module, observe=True, quantize=False)


def quantized_mode(module: nn.Module):
    return quant_state(module, observe=False, quantize=True)


def fp_mode(module: nn.Module):
    """Every quantizer an identity: the prepared model computes the full-precision network."""
    return quant_state(module, observe=False, quantize=False)


@contextlib.contextmanager
def keep_probability(quantizers: Iterable[ActQuantizer], prob: float):
    quantizers = list(quantizers)
    saved = [q.keep_prob for q in quantizers]
    try:
        for q in quantizers:
            q.keep_prob = prob
        yield
    finally:
        for q, p in zip(quantizers, saved):
            q.keep_prob = p


def set_bits(q: QuantizeBase, bits: int) -> None:
    """Change a fake quantizer's bit-width (before calibration): its integer range and its observer's."""
    if q.is_symmetric_quant:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1
    q.quant_min, q.quant_max, q.bitwidth = qmin, qmax, bits
    obs = q.activation_post_process
    obs.quant_min, obs.quant_max = qmin, qmax


# ------------------------------------------------------------------------------------ multi-bit activations
class MultiBitActQuantizer(ActQuantizer):
    """An activation quantizer with one learnable step size and zero point per bit-width of `bit_set` (PTMQ).

    `active_bits` selects the pair the forward uses. `scale` and `zero_point` are the selected pair itself (the
    same Parameter / buffer objects as `scale_b<bits>` / `zero_point_b<bits>`), and `quant_min`, `quant_max`,
    `bitwidth` and the observer's range follow the selection, so the forward, the observers, export and saving
    see an ordinary quantizer at the selected bit-width, and learning `scale` learns the selected step.
    """

    def __init__(self, observer, bit_set=(4, 6, 8), active_bits: int | None = None, **observer_kwargs):
        super().__init__(observer, **observer_kwargs)
        self.bit_set = tuple(sorted(set(int(b) for b in bit_set)))
        initial_scale, initial_zero_point = self.scale.detach().clone(), self.zero_point.clone()
        for bits in self.bit_set:
            self.register_parameter(f"scale_b{bits}", nn.Parameter(initial_scale.clone(),
                                                                   requires_grad=self.scale.requires_grad))
            self.register_buffer(f"zero_point_b{bits}", initial_zero_point.clone())
        self.active_bits = None
        self.set_active_bits(active_bits if active_bits is not None else self.bit_set[0])

    @classmethod
    def from_quantizer(cls, q: ActQuantizer, bit_set, active_bits: int) -> "MultiBitActQuantizer":
        """A multi-bit quantizer with `q`'s observer (a copy), switches and keep probability; every bit-width's
        step starts at `q`'s step."""
        new = cls(lambda: copy.deepcopy(q.activation_post_process), bit_set=bit_set, active_bits=active_bits)
        new.fake_quant_enabled.copy_(q.fake_quant_enabled)
        new.observer_enabled.copy_(q.observer_enabled)
        new.prob = q.prob
        with torch.no_grad():
            for bits in new.bit_set:
                getattr(new, f"scale_b{bits}").copy_(q.scale.detach())
                getattr(new, f"zero_point_b{bits}").copy_(q.zero_point)
        return new.to(q.scale.device)

    def set_active_bits(self, bits: int) -> None:
        bits = int(bits)
        if bits not in self.bit_set:
            raise ValueError(f"{bits}-bit activations are not in this quantizer's bit set "
                             f"{', '.join(map(str, self.bit_set))}")
        # Aliasing (not copying) keeps every bit-width's step learnable through `scale` while it is selected.
        self._parameters["scale"] = self._parameters[f"scale_b{bits}"]
        self._buffers["zero_point"] = self._buffers[f"zero_point_b{bits}"]
        set_bits(self, bits)
        self.active_bits = bits

    def step_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, f"scale_b{bits}") for bits in self.bit_set]

    def _apply(self, fn, *args, **kwargs):
        # A dtype/device conversion may replace Parameter objects one name at a time, which would split the
        # alias between `scale` and the selected `scale_b<bits>`: point it again.
        super()._apply(fn, *args, **kwargs)
        if self.active_bits is not None:
            self.set_active_bits(self.active_bits)
        return self

    def extra_repr(self):
        return super().extra_repr() + f", bit_set={list(self.bit_set)}, active_bits={self.active_bits}"


_mq_prepare.FakeQuantizeDict.setdefault("PTQMultiBitActQuantizer", MultiBitActQuantizer)


def multibit_quantizers(module: nn.Module) -> list[MultiBitActQuantizer]:
    return [m for _, m in fake_quantizers(module) if isinstance(m, MultiBitActQuantizer)]


def make_multibit(gm: nn.Module, name: str, bit_set, active_bits: int) -> MultiBitActQuantizer:
    """Replace the activation quantizer `name` of `gm` by a multi-bit one built from it; return the new one."""
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    old = getattr(parent, attr)
    if not isinstance(old, ActQuantizer):
        raise TypeError(f"{name} is a {type(old).__name__}, not an activation quantizer")
    new = MultiBitActQuantizer.from_quantizer(old, bit_set, active_bits)
    setattr(parent, attr, new)
    return new


@contextlib.contextmanager
def active_bits(quantizers: Iterable[MultiBitActQuantizer], bits: int):
    """Select `bits` in the given multi-bit quantizers; restore each one's previous selection after."""
    quantizers = list(quantizers)
    saved = [q.active_bits for q in quantizers]
    try:
        for q in quantizers:
            q.set_active_bits(bits)
        yield
    finally:
        for q, b in zip(quantizers, saved):
            q.set_active_bits(b)


def set_activation_bits(model: nn.Module, bits: int) -> dict[str, int]:
    """Switch every multi-bit activation quantizer of `model` to `bits`; return the previous selection by name.

    Quantizers that are not multi-bit (those the 8-bit conventions fix: network input, last layer's input) keep
    their bit-width. Nothing changes if `bits` is not available everywhere."""
    quantizers = {n: q for n, q in fake_quantizers(model) if isinstance(q, MultiBitActQuantizer)}
    if not quantizers:
        raise ValueError("the model has no multi-bit activation quantizers (quantize it with algorithm ptmq)")
    available = sorted(set.intersection(*(set(q.bit_set) for q in quantizers.values())))
    if int(bits) not in available:
        raise ValueError(f"{bits}-bit activations are not available in this model (bit set: "
                         f"{', '.join(map(str, available))})")
    previous = {n: q.active_bits for n, q in quantizers.items()}
    for q in quantizers.values():
        q.set_active_bits(bits)
    return previous


@contextlib.contextmanager
def activation_bits(model: nn.Module, bits: int):
    """Run `model` with its multi-bit activation quantizers at `bits`; the previous selection is restored after.

        with activation_bits(qmodel, 6):
            logits = qmodel(images)
    """
    previous = set_activation_bits(model, bits)
    modules = dict(model.named_modules())
    try:
        yield model
    finally:
        for name, b in previous.items():
            modules[name].set_active_bits(b)
