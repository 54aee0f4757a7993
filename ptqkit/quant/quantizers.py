"""MQBench fake-quant modules extended with what reconstruction needs, and context managers over their state.

- `WeightQuantizer` (an MQBench `AdaRoundFakeQuantize`): round-to-nearest, or the soft-rounded weights of a
  `LearnedRounding` (AdaRound's rectified sigmoid h(V), for all the layers of a unit in flat tensors) while it is
  installed; `LearnedRounding.harden()` writes the hard-rounded weights back so that round-to-nearest reproduces
  them and the learned state can be dropped.
- `ActQuantizer` (an MQBench `QDropFakeQuantize`): LSQ-style learnable step size with a keep probability: each
  element is quantized with probability `keep_prob` (QDrop), otherwise passed through in full precision.
- `MultiBitActQuantizer` (an `ActQuantizer`): one step size and zero point per bit-width of a set, `active_bits`
  selecting the one in use (PTMQ); `activation_bits(model, bits)` switches a whole model at run time.

All three register themselves in MQBench's fake-quant table so `prepare_by_platform` inserts them by name.

Their observer and fake-quant switches are Python booleans (`observing`, `quantizing`, the `Switches` mixin) kept
in step with MQBench's uint8 buffers: the forward reads the booleans, because reading a buffer on CUDA waits for
the device at every call (ptqkit.quant.hostsync), while state_dict, ONNX export and MQBench's own code read the
buffers.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from mqbench import prepare_by_platform as _mq_prepare
from mqbench.fake_quantize.adaround_quantizer import AdaRoundFakeQuantize, adaround_forward
from mqbench.fake_quantize.qdrop_quantizer import (QDropFakeQuantize,
                                                   _fake_quantize_learnable_per_channel_affine_training,
                                                   _fake_quantize_learnable_per_tensor_affine_training)
from mqbench.fake_quantize.quantize_base import QuantizeBase
from mqbench.observer import EMAMinMaxObserver, MinMaxObserver

from ptqkit.precision import fake_quant_boundary
from ptqkit.quant import hostsync, kernels

from ptqkit.quant.kernels import GAMMA, ZETA


def _broadcast(t: torch.Tensor, like: torch.Tensor, ch_axis: int) -> torch.Tensor:
    if ch_axis == -1 or t.numel() == 1:
        return t
    shape = [1] * like.dim()
    shape[ch_axis] = like.shape[ch_axis]
    return t.reshape(shape)


class Switches:
    """The observer / fake-quant switches of this toolkit's quantizers as Python state (`observing`,
    `quantizing`), written through to MQBench's buffers (`observer_enabled`, `fake_quant_enabled`) by the
    enable_/disable_ methods and read back from them after a state_dict load (`read_switches`). Code that writes
    the buffers directly must call `read_switches()` after; `copy_switches` copies them between quantizers."""

    observing = True     # FakeQuantizeBase's buffers start at 1
    quantizing = True

    def read_switches(self) -> None:
        """The booleans from the buffers (a read of the device: outside the loops)."""
        self.observing = bool(self.observer_enabled[0])
        self.quantizing = bool(self.fake_quant_enabled[0])

    def enable_observer(self, enabled: bool = True) -> None:
        enabled = bool(enabled)
        if enabled != self.observing:
            self.observing = enabled
            self.observer_enabled.fill_(int(enabled))   # a write: no wait for the device

    def disable_observer(self) -> None:
        self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        enabled = bool(enabled)
        if enabled != self.quantizing:
            self.quantizing = enabled
            self.fake_quant_enabled.fill_(int(enabled))

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.read_switches()

    def _observes_on_device(self) -> bool:
        """Whether this forward observes in the loop's way (below) rather than MQBench's: only inside a
        reconstruction loop (FDDA's student observes every step), and only for the min/max observers, whose update
        and qparams are re-done here without torch's validity checks (each a read of the device)."""
        return hostsync.in_loop() and _device_observable(self.activation_post_process)


_SCHEMES = (torch.per_tensor_affine, torch.per_channel_affine, torch.per_tensor_symmetric,
            torch.per_channel_symmetric)


def _device_observable(obs) -> bool:
    return type(obs) in (MinMaxObserver, EMAMinMaxObserver) and not obs.pot_scale and obs.qscheme in _SCHEMES


@torch.no_grad()
def _observe(obs, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """MQBench's MinMaxObserver / EMAMinMaxObserver update with `x`, then torch's `_calculate_qparams`, in the same
    operations (the same values bit for bit) but without a read of the device: the EMA's first-observation test
    becomes a select, and the min <= max checks are left out (the observer has just seen `x`)."""
    if x.numel() == 0:
        return None
    x = x.detach().to(obs.min_val.dtype)
    if obs.ch_axis == -1:
        lo, hi = torch.aminmax(x)
    else:
        axes = list(range(x.dim()))
        axes[obs.ch_axis], axes[0] = 0, obs.ch_axis
        lo, hi = torch.aminmax(torch.flatten(x.permute(axes), start_dim=1), dim=1)
    if isinstance(obs, EMAMinMaxObserver):
        ema_lo = obs.min_val * obs.ema_ratio + lo * (1.0 - obs.ema_ratio)
        ema_hi = obs.max_val * obs.ema_ratio + hi * (1.0 - obs.ema_ratio)
        if obs.max_val.numel() <= 1:
            first = obs.max_val.isinf()
            obs.min_val, obs.max_val = torch.where(first, lo, ema_lo), torch.where(first, hi, ema_hi)
        else:
            obs.min_val, obs.max_val = ema_lo, ema_hi
    else:
        obs.min_val, obs.max_val = torch.min(obs.min_val, lo), torch.max(obs.max_val, hi)
    return _qparams(obs)


def _qparams(obs) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's UniformQuantizationObserverBase._calculate_qparams for the affine and symmetric schemes."""
    qmin, qmax = obs.quant_min, obs.quant_max
    min_neg = torch.min(obs.min_val, torch.zeros_like(obs.min_val))
    max_pos = torch.max(obs.max_val, torch.zeros_like(obs.max_val))
    zero_point = torch.zeros(min_neg.size(), dtype=torch.int64, device=min_neg.device)
    if obs.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric):
        max_pos = torch.max(-min_neg, max_pos)
        scale = torch.max(max_pos / (float(qmax - qmin) / 2), obs.eps)
        if obs.dtype in (torch.quint8, torch.uint8):
            zero_point = zero_point.new_full(zero_point.size(),
                                             (qmin + qmax) // 2 if obs.has_customized_qrange else 128)
        elif obs.dtype == torch.uint16:
            zero_point = zero_point.new_full(zero_point.size(), 2 ** 15)
    else:
        scale = torch.max((max_pos - min_neg) / float(qmax - qmin), obs.eps)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale).to(torch.int), qmin, qmax)
    return scale.reshape(1) if scale.dim() == 0 else scale, zero_point.reshape(1) if zero_point.dim() == 0 \
        else zero_point


class WeightQuantizer(Switches, AdaRoundFakeQuantize):
    """Weight fake-quant: round to nearest, or, while a `LearnedRounding` is installed, the soft-rounded weights
    it computed for this iteration."""

    soft_weight: torch.Tensor | None = None

    def init(self, *args, **kwargs):
        super().init(*args, **kwargs)   # MQBench's learned-rounding mode writes the buffers itself
        self.read_switches()

    @fake_quant_boundary   # float32 under autocast (runtime.compute_dtype, ptqkit.precision)
    def forward(self, X):
        if self.soft_weight is not None:
            return self.soft_weight
        if torch.jit.is_tracing() or (self.observing and not self._observes_on_device()):
            # tracing (ONNX export) and calibration: MQBench's forward as it is (its buffers are in step)
            return super().forward(X)
        if self.observing:
            qparams = _observe(self.activation_post_process, X)
            if qparams is not None:
                scale, zero_point = (t.to(self.scale.device) for t in qparams)
                if self.scale.shape != scale.shape:
                    self.scale.resize_(scale.shape)
                    self.zero_point.resize_(zero_point.shape)
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
        if not self.quantizing:
            return X
        # MQBench's formulas, with the per-tensor scale and zero point as tensors (its .item() waits on CUDA)
        if self.adaround:
            if getattr(self, "round_mode", None) != "learned_hard_sigmoid" or not hasattr(self, "alpha"):
                return super().forward(X)
            return adaround_forward(X, self.scale.data, self.zero_point.data.long(), self.quant_min, self.quant_max,
                                    self.ch_axis, self.alpha, self.zeta, self.gamma)
        if self.is_per_channel:
            return torch.fake_quantize_per_channel_affine(X, self.scale, self.zero_point, self.ch_axis,
                                                          self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, self.quant_min, self.quant_max)


class LearnedRounding:
    """AdaRound's learned rounding (docs/METHODS.md#learned-rounding) of a set of weight layers — one reconstruction
    unit — held in flat tensors: V, floor(w / s), and s, z and the integer range per element.

    V starts where h(V) equals the fractional part of w / s, so the soft weights start at the FP weights (inside the
    grid). One flat V is one optimiser parameter, and every iteration computes all the layers' soft weights and the
    regulariser in one pass (`kernels.soft_rounding`) whatever the layer count. While `installed()`, each layer's
    weight quantizer returns its slice of this iteration's soft weights; `harden()` writes h = 1[V >= 0] into the
    layers' weights, which round-to-nearest then reproduces exactly.
    """

    def __init__(self, layers: list[tuple[nn.Module, WeightQuantizer]]):
        self.layers = list(layers)
        alphas, bases, scales, zeros, los, his = [], [], [], [], [], []
        with torch.no_grad():
            for layer, wq in self.layers:
                w = layer.weight.detach()
                scale = _broadcast(wq.scale.detach(), w, wq.ch_axis).expand_as(w)
                zero = _broadcast(wq.zero_point.detach(), w, wq.ch_axis).to(w.dtype).expand_as(w)
                base = torch.floor(w / scale)
                rest = w / scale - base
                alphas.append(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
                bases.append(base)
                scales.append(scale)
                zeros.append(zero)
                los.append(torch.full_like(w, wq.quant_min))
                his.append(torch.full_like(w, wq.quant_max))
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts]) if ts else torch.empty(0)  # noqa: E731
        self.alpha = nn.Parameter(flat(alphas))
        self.base, self.scale, self.zero_point = flat(bases), flat(scales), flat(zeros)
        self.lo, self.hi = flat(los), flat(his)
        self.shapes = [layer.weight.shape for layer, _ in self.layers]
        self.sizes = [layer.weight.numel() for layer, _ in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def soft_rounding(self) -> torch.Tensor:
        """h(V) of every weight, flat."""
        return kernels.rectified_sigmoid(self.alpha.detach())[0]

    @contextlib.contextmanager
    def installed(self, beta: float | None = None):
        """Inside: the layers compute with this iteration's soft weights (computed once, however many forwards).
        Yields the regulariser Σ (1 − |2 h(V) − 1|^β) with `beta`, else None."""
        w, penalty = kernels.soft_rounding(self.alpha, self.base, self.scale, self.zero_point, self.lo, self.hi, beta)
        try:
            for (_, wq), part, shape in zip(self.layers, w.split(self.sizes), self.shapes):
                wq.soft_weight = part.view(shape)
            yield penalty if beta is not None else None
        finally:
            for _, wq in self.layers:
                wq.soft_weight = None

    @torch.no_grad()
    def hard_weights(self) -> list[torch.Tensor]:
        """The weights with h = 1[V >= 0], as MQBench's `get_hard_value` computes them."""
        t = (self.base + (self.alpha >= 0).to(self.base.dtype)).add_(self.zero_point)
        w = torch.clamp(t, self.lo, self.hi).sub_(self.zero_point).mul_(self.scale)
        return [part.view(shape) for part, shape in zip(w.split(self.sizes), self.shapes)]

    @torch.no_grad()
    def harden(self) -> None:
        """Write the hard-rounded weights into the layers; round-to-nearest reproduces them from now on."""
        for (layer, _), w in zip(self.layers, self.hard_weights()):
            layer.weight.data.copy_(w)


class ActQuantizer(Switches, QDropFakeQuantize):
    """Activation fake-quant with a learnable step size and QDrop's element-wise keep probability."""

    @property
    def keep_prob(self) -> float:
        return self.prob

    @keep_prob.setter
    def keep_prob(self, value: float) -> None:
        self.prob = float(value)

    # False: the step stays as calibrated (quant.learn_input_step sets it on the network input's quantizer, whose
    # step the engine leaves as calibrated in any case: see QuantConfig)
    learn_step = True
    # "pass": an element rounded onto the lowest or highest level passes the gradient (the papers' LSQ / round-STE
    # on the torch they used); "stop": it counts as clipped (quant.a.bound_grad, fakequant.c's header)
    bound_grad = "pass"

    def step_parameters(self) -> list[nn.Parameter]:
        """The step sizes reconstruction optimises (one here; a multi-bit quantizer has one per bit-width)."""
        return [self.scale] if self.learn_step else []

    @fake_quant_boundary   # float32 under autocast (runtime.compute_dtype, ptqkit.precision)
    def forward(self, X):
        if torch.jit.is_tracing() or (self.observing and not self._observes_on_device()):
            # tracing (ONNX export): MQBench's formula in torch ops, which the tracer records (the fused kernel
            # computes the same values but is opaque to it); calibration: MQBench's forward as it is
            return super().forward(X)
        if self.observing:   # inside a loop (FDDA): MQBench's forward, its switches and qparams on the device
            qparams = _observe(self.activation_post_process, X)
            if qparams is not None:
                scale, zero_point = (t.to(self.scale.device) for t in qparams)
                if self.ch_axis != -1:
                    self.scale.data = torch.ones_like(scale)
                    self.zero_point.resize_(zero_point.shape)
                self.scale.data.copy_(scale)
                self.zero_point.copy_(zero_point)
            if not self.quantizing:
                return X
            return self._mqbench_formula(X)
        if not self.quantizing:
            return X
        if self.is_per_channel:
            return self._per_channel(X)
        return kernels.act_fake_quant(X, self.scale, self.zero_point, self.quant_min, self.quant_max, self.prob,
                                      stop_at_bounds=self.bound_grad == "stop")

    def _mqbench_formula(self, X):
        """QDropFakeQuantize's quantization, as its forward computes it while observing."""
        if self.is_per_channel:
            out = _fake_quantize_learnable_per_channel_affine_training(X, self.scale, self.zero_point, self.ch_axis,
                                                                       self.quant_min, self.quant_max)
        else:
            out = _fake_quantize_learnable_per_tensor_affine_training(X, self.scale, self.zero_point, self.quant_min,
                                                                      self.quant_max)
        if self.prob < 1.0:   # the kernels' keep mask, as everywhere else (the same for a key on every device)
            return torch.where(kernels.keep_mask(X.shape, self.prob, X.device), out, X)
        return out

    def _per_channel(self, X):
        """The per-tensor kernel's formula per channel, in torch ops: MQBench's own would take its treatment of the
        bounds from the running torch's clamp instead of `bound_grad`."""
        shape = [1] * X.dim()
        shape[self.ch_axis] = X.shape[self.ch_axis]
        s = self.scale.reshape(shape)
        z = self.zero_point.reshape(shape).to(X.dtype)
        u = X / s
        q = torch.round(u).detach()
        lo, hi = self.quant_min - z, self.quant_max - z
        qc = torch.maximum(torch.minimum(q, hi), lo)
        inside = (q > lo) & (q < hi) if self.bound_grad == "stop" else q == qc
        out = torch.where(inside, (u + (q - u).detach()) * s, qc * s)
        if self.prob < 1.0:
            # the per-tensor kernels' keep mask (a hash of key and element index): the same mask for the same key
            # on every device and in every implementation
            out = torch.where(kernels.keep_mask(X.shape, self.prob, X.device), out, X)
        return out


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


def switches(q: QuantizeBase) -> tuple[bool, bool]:
    """(observing, quantizing): Python state for this toolkit's quantizers, MQBench's buffers for others."""
    if isinstance(q, Switches):
        return q.observing, q.quantizing
    return bool(q.observer_enabled[0]), bool(q.fake_quant_enabled[0])


def set_switches(q: QuantizeBase, observe: bool | None = None, quantize: bool | None = None) -> None:
    if observe is not None:
        q.enable_observer(bool(observe))
    if quantize is not None:
        q.enable_fake_quant(bool(quantize))


def copy_switches(dst: QuantizeBase, src: QuantizeBase) -> None:
    """`dst`'s switches as `src`'s (a quantizer built to replace `src`)."""
    if isinstance(dst, Switches):
        dst.read_switches()
    set_switches(dst, *switches(src))


def _flags(quantizers: Iterable[QuantizeBase]):
    return [(q, *switches(q)) for q in quantizers]


@contextlib.contextmanager
def quant_state(module: nn.Module, *, observe: bool | None = None, quantize: bool | None = None,
                only: Iterable[QuantizeBase] | None = None):
    """Set observer / fake-quant switches of the quantizers in `module` (or `only` those), restore them after.
    PD-Quant and FDDA enter it every iteration: for this toolkit's quantizers it reads Python state only."""
    quantizers = list(only) if only is not None else [q for _, q in fake_quantizers(module)]
    saved = _flags(quantizers)
    try:
        for q in quantizers:
            set_switches(q, observe, quantize)
        yield
    finally:
        for q, obs, fq in saved:
            set_switches(q, obs, fq)


def calibration_mode(module: nn.Module):
    """Observers record ranges on full-precision values (fake quantization off)."""
    return quant_state(module, observe=True, quantize=False)


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


def reset_observer(q: QuantizeBase) -> None:
    """Forget what the quantizer's observer has seen (the next observation starts a new range)."""
    obs = q.activation_post_process
    obs.min_val = torch.full_like(obs.min_val, float("inf"))
    obs.max_val = torch.full_like(obs.max_val, float("-inf"))


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

    `set_active_bits` is the one place that makes the alias. `Module.to` converts Parameters in place, so `scale`
    stays aliased, but it gives every buffer it moves a new object, name by name: after a move to another device
    `zero_point` is a copy of the selected `zero_point_b<bits>`, not the same tensor, until `reselect_bits(model)`
    makes the alias again, as `from_quantizer` and `ptqkit.saving.load_quantized` do after theirs. (A dtype
    conversion leaves the integer zero points alone.)
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
        copy_switches(new, q)
        new.prob, new.bound_grad = q.prob, q.bound_grad
        with torch.no_grad():
            for bits in new.bit_set:
                getattr(new, f"scale_b{bits}").copy_(q.scale.detach())
                getattr(new, f"zero_point_b{bits}").copy_(q.zero_point)
        new.to(q.scale.device)
        reselect_bits(new)
        return new

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

    def extra_repr(self):
        return super().extra_repr() + f", bit_set={list(self.bit_set)}, active_bits={self.active_bits}"


_mq_prepare.FakeQuantizeDict.setdefault("PTQMultiBitActQuantizer", MultiBitActQuantizer)


def multibit_quantizers(module: nn.Module) -> list[MultiBitActQuantizer]:
    return [m for _, m in fake_quantizers(module) if isinstance(m, MultiBitActQuantizer)]


def reselect_bits(module: nn.Module) -> None:
    """Every multi-bit quantizer in `module` (or `module` itself) at its selected bit-width again, its `scale` and
    `zero_point` the selected bit-width's tensors: after a move to another device (MultiBitActQuantizer)."""
    for q in multibit_quantizers(module):
        q.set_active_bits(q.active_bits)


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


def _multibit(target) -> list[MultiBitActQuantizer]:
    if isinstance(target, nn.Module):
        quantizers = multibit_quantizers(target)
        if not quantizers:
            raise ValueError("the model has no multi-bit activation quantizers (quantize it with algorithm ptmq)")
        return quantizers
    return list(target)


def set_activation_bits(target, bits: int) -> list[int]:
    """Switch the multi-bit activation quantizers of `target` (a model, or the quantizers themselves) to `bits`;
    return their previous selections, in order. Quantizers that are not multi-bit (those the 8-bit conventions fix:
    network input, last layer's input) keep their bit-width. Nothing changes if `bits` is not available in all."""
    quantizers = _multibit(target)
    available = sorted(set.intersection(*(set(q.bit_set) for q in quantizers))) if quantizers else []
    if quantizers and int(bits) not in available:
        raise ValueError(f"{bits}-bit activations are not available in this model (bit set: "
                         f"{', '.join(map(str, available))})")
    previous = [q.active_bits for q in quantizers]
    for q in quantizers:
        q.set_active_bits(bits)
    return previous


@contextlib.contextmanager
def activation_bits(target, bits: int):
    """Inside: the multi-bit activation quantizers of `target` (a model, or the quantizers) at `bits`; each one's
    previous selection is restored after.

        with activation_bits(qmodel, 6):
            logits = qmodel(images)
    """
    quantizers = _multibit(target)
    previous = set_activation_bits(quantizers, bits)
    try:
        yield target
    finally:
        for q, b in zip(quantizers, previous):
            q.set_active_bits(b)
