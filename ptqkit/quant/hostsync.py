"""Where the host may wait for the device: the reconstruction loops promise not to, except at their log points.

On CUDA, reading a device tensor from Python (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, a copy to the CPU)
waits until every queued kernel has run; one such read per iteration is enough to leave the GPU idle between
iterations. The loops therefore mark their iterations (`loop()`) and the places where they read on purpose
(`log_point()`: the loss history, the non-finite check, an epoch's means). Two checks use the marks:

- tests/test_host_sync.py counts, on the CPU, every scalar read and device-to-host copy dispatched inside a loop
  and outside its log points (there must be none);
- `strict()` (python -m ptqkit.tools.gpu_check) turns torch's CUDA sync debug mode to "error" inside the loops,
  so that any synchronising call there raises, the log points excepted.

Values drawn from torch's CPU generator to make a host-side choice (a class, a bit-width, an augmentation) live on
the host in every run: `host_int` / `host_float` read them through numpy, which only CPU tensors allow, so that no
device read can hide behind them.
"""
from __future__ import annotations

import contextlib

import torch

_state = {"loop": 0, "log": 0, "strict": False, "saved": []}


def in_loop() -> bool:
    """Inside a loop's iterations and outside its log points: where the host must not wait for the device."""
    return _state["loop"] > 0 and _state["log"] == 0


def _cuda_debug(mode) -> None:
    if _state["strict"] and torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def loop():
    """Inside: the iterations of a reconstruction loop."""
    entering = _state["loop"] == 0
    if entering and _state["strict"] and torch.cuda.is_available():
        _state["saved"].append(torch.cuda.get_sync_debug_mode())
        _cuda_debug("error")
    _state["loop"] += 1
    try:
        yield
    finally:
        _state["loop"] -= 1
        if entering and _state["strict"] and torch.cuda.is_available():
            _cuda_debug(_state["saved"].pop())


@contextlib.contextmanager
def log_point():
    """Inside: the loop reads the device on purpose (history, checks, progress bar)."""
    strict = _state["strict"] and torch.cuda.is_available() and _state["loop"] > 0 and _state["log"] == 0
    if strict:
        _cuda_debug(0)
    _state["log"] += 1
    try:
        yield
    finally:
        _state["log"] -= 1
        if strict:
            _cuda_debug("error")


@contextlib.contextmanager
def strict(enabled: bool = True):
    """Inside: on CUDA, a synchronising call inside a loop (outside its log points) raises."""
    previous = _state["strict"]
    _state["strict"] = enabled
    try:
        yield
    finally:
        _state["strict"] = previous


def _host(t: torch.Tensor):
    if t.device.type != "cpu":
        raise ValueError(f"host_int/host_float read CPU tensors only (got one on {t.device})")
    return t.detach().numpy().item()


def host_int(t: torch.Tensor) -> int:
    """A CPU tensor's value (a draw from torch's CPU generator) as a Python int, without a device read."""
    return int(_host(t))


def host_float(t: torch.Tensor) -> float:
    """A CPU tensor's value as a Python float, without a device read."""
    return float(_host(t))
