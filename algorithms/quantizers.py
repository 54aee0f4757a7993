"""MQBench fake-quant modules extended with what reconstruction needs, and context managers over their state.

- `WeightQuantizer` (an MQBench `AdaRoundFakeQuantize`): round-to-nearest until `init_rounding` is called; then
  learned rounding with the rectified sigmoid h(V) (soft), and `harden()` writes the hard-rounded weights back so
  that plain round-to-nearest reproduces them and the learned state can be dropped.
- `ActQuantizer` (an MQBench `QDropFakeQuantize`): LSQ-style learnable step size with a keep probability: each
  element is quantized with probability `keep_prob` (QDrop), otherwise passed through in full precision.

Both register themselves in MQBench's fake-quant table so `prepare_by_platform` inserts them by name.
"""
from __future__ import annotations

import contextlib
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


class ActQuantizer(QDropFakeQuantize):
    """Activation fake-quant with a learnable step size and QDrop's element-wise keep probability."""

    @property
    def keep_prob(self) -> float:
        return self.prob

    @keep_prob.setter
    def keep_prob(self, value: float) -> None:
        self.prob = float(value)

    def forward(self, X):
        if self.fake_quant_enabled[0] == 1 and self.observer_enabled[0] == 0 and not torch.is_grad_enabled() \
                and self.prob >= 1.0 and not self.is_per_channel:
            # Inference fast path: the fused kernel, same values as the STE formula.
            return torch.fake_quantize_per_tensor_affine(X, float(self.scale.item()), int(self.zero_point.item()),
                                                         self.quant_min, self.quant_max)
        return super().forward(X)


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
