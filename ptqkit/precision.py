"""The arithmetic precision of reconstruction (`runtime.compute_dtype`): float32, or bfloat16 where the hardware
computes in it.

With bfloat16, the learning steps run under `torch.autocast`: the engine's unit forward and backward (the method's
own loss terms included, e.g. PD-Quant's pass through the rest of the network), PD-Quant's distribution
correction steps and FDDA's generator and student steps. Autocast computes the convolutions and linear layers in
bfloat16, which is where an iteration's time goes; what learns stays float32 and so does what it learns from:

- the rounding variables, step sizes, FDDA's weights and generator, PD-Quant's corrected inputs, and their
  optimisers' state are float32 tensors, never cast (autocast casts a copy for each convolution);
- every fake quantizer computes in float32 (`fake_quant_boundary`): its input is cast up and its kernel runs with
  autocast off, so that the fused C kernels (float32 only) serve it as in a float32 run, the compiled kernels
  need no graph of their own for autocast, and the division by the step, the rounding onto the grid and the step's
  gradient keep float32's 24-bit mantissa; a quantizer that is switched off passes its input through untouched;
- the losses and the statistics they compare (reconstruction error, rounding regulariser, prediction difference,
  BN statistics, distillation) are computed from float32 values (`float32`);
- the cached inputs and targets, the unit errors, the evaluation, the saved model and ONNX export are computed
  outside autocast, in float32.

`bf16_supported(device)` says whether a device computes in bfloat16 natively (a CPU with AVX512-BF16 or AMX, an
ARM CPU with BF16, a CUDA GPU of compute capability 8.0 or later). bfloat16 is there for speed, which needs those
instructions; torch would emulate it elsewhere, with its loss of precision and without the reason for it, so a
run asking for it on such a device is refused as it starts, before any work (`check`, called by ptqkit.pipeline
once the device is known; a saved config that names bfloat16 still loads anywhere).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from ptqkit.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# torch.cpu.get_capabilities() keys of native bfloat16 arithmetic: x86 (AVX512-BF16, AMX), ARM (BF16, SVE BF16)
_CPU_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a `runtime.compute_dtype` value."""
    return DTYPES[name]


def bf16_supported(device) -> bool:
    """Whether `device` computes in bfloat16 natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        if hasattr(torch.cpu, "get_capabilities"):
            caps = torch.cpu.get_capabilities()
            return any(bool(caps.get(key, False)) for key in _CPU_BF16)
        # an older torch: its x86 checks only
        return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                           "_is_amx_tile_supported"))
    return False


def check(name: str, device, key: str = "runtime.compute_dtype") -> None:
    """ConfigError (one line, naming `key`) where `name` asks for bfloat16 on a device without it."""
    if name == "bfloat16" and not bf16_supported(device):
        what = "this CPU has neither AVX512-BF16, AMX nor ARM BF16" if torch.device(device).type == "cpu" else \
            "this GPU computes bfloat16 natively only from compute capability 8.0 (Ampere) on"
        raise ConfigError(key, f"float32 on this {torch.device(device).type} ({what})", name)


def autocast(device, dtype: torch.dtype = torch.float32):
    """Inside: convolutions and linear layers on `device` compute in `dtype` (torch.autocast), and the rest as
    autocast decides; float32: nothing changes. The one place the learning steps enter reduced precision: the
    engine's loop, PD-Quant's distribution correction and FDDA's steps call it. Autocast's state is restored on
    exit."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def float32(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32 (itself when it is), differentiably: what a loss or a statistic reduces."""
    return t if t.dtype == torch.float32 or not t.is_floating_point() else t.float()


def fake_quant_boundary(forward):
    """Decorates a fake quantizer's forward: under autocast, the input is cast to float32 and the forward runs with
    autocast off (its output is float32); a quantizer neither observing nor quantizing passes its input through
    as it is. Outside autocast: the forward itself, nothing added."""
    @functools.wraps(forward)
    def wrapped(self, X):
        device_type = X.device.type
        if not torch.is_autocast_enabled(device_type) or not (self.observing or self.quantizing):
            return forward(self, X)
        with torch.autocast(device_type, enabled=False):
            return forward(self, float32(X))
    return wrapped
