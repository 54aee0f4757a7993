"""Fused elementwise kernels of the quantizer backend: activation fake quantization with QDrop's keep mask (forward
and backward in one pass each), the unit-input mix, and the keep mask itself.

Why: on CPU, reconstruction is bound by memory passes over activation-sized tensors, not by the convolutions'
arithmetic alone. In torch ops a dropped LSQ fake quantizer takes about a dozen passes forward and three backward;
`fakequant.c` takes one each (benchmarks/results/reconstruction_speed.md has the breakdown).

Three implementations with the same values, chosen per device by `implementation()` (`PTQKIT_KERNELS`):
- `c`: `fakequant.c`, compiled at first use with the system C compiler into the per-user cache (`ptqkit.cache`:
  `PTQKIT_CACHE`, default `~/.cache/ptqkit`), for contiguous float32 CPU tensors; the default on CPU;
- `compiled`: the torch-ops formulas of the fake quantizer (forward, backward), the keep mask, the input mix and
  the soft rounding through `torch.compile` (inductor: Triton on CUDA, C++ on the CPU), on flat tensors with their
  length marked dynamic, so that a new batch size or feature-map size does not compile again; the default on CUDA
  (benchmarks/fakequant_compile.py measures it against `c` on the CPU);
- `torch`: the same arithmetic in plain torch ops (`PTQKIT_KERNELS=torch`, or `0`), everywhere, for debugging.
`using(name)` selects one for a block of code.
On the torch paths every scalar stays a tensor on the device (zero point, step gradient, regulariser, mask key),
so that no kernel call reads the device from the host (ptqkit.quant.hostsync).
The keep mask is a counter-based hash of (key, element index) — SplitMix64, see fakequant.c — so all three give the
same mask for the same key, whatever the device, thread count or tensor layout. A key is drawn from torch's default
(CPU) generator for every call, as a 0-dim int64 tensor, so `torch.manual_seed` fixes the masks and a saved random
state replays them on either device.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache

import torch

from ptqkit.cache import cache_dir
from ptqkit.quant import hostsync

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakequant.c")
KEEP_ALL = 1 << 16            # threshold that keeps every element
_GAMMA = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared")
_LIBS = ("-lm",)     # with glibc, also libmvec: the vector expf/powf of the rounding kernel
_MASK64 = (1 << 64) - 1
IMPLEMENTATIONS = ("c", "compiled", "torch")


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 torch holds it."""
    return v - (1 << 64) if v >= 1 << 63 else v


# ------------------------------------------------------------------------------------------- build and load
def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compile(compiler: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-o", tmp, SOURCE, *_LIBS], check=True, capture_output=True, text=True)
        os.replace(tmp, target)   # atomic: processes building at once each publish a whole library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library():
    """The compiled kernels (ctypes), or None where they cannot be had (the reason is logged once) or where
    PTQKIT_KERNELS asks for torch ops."""
    return None if _requested() == "torch" else _built()


@lru_cache(maxsize=1)
def _built():
    # cached apart from the PTQKIT_KERNELS check: a process that once asked for torch ops may ask for C later
    if platform.system() != "Linux":
        log.info("fused fake-quant kernels: only built on Linux; using torch ops")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("fused fake-quant kernels: no C compiler (cc/gcc) found; using torch ops (slower on CPU)")
        return None
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(_FLAGS + _LIBS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = os.path.join(cache_dir("kernels"), f"fakequant-{digest}.so")
    try:
        if not os.path.exists(target):
            _compile(compiler, target)
        lib = ctypes.CDLL(target)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        log.warning("fused fake-quant kernels: build failed (%s); using torch ops (slower on CPU)",
                    detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__)
        return None
    f32, i64, u64, u32, cint = ctypes.c_float, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
    ptr = ctypes.c_void_p
    lib.ptq_fq_forward.argtypes = [ptr, ptr, ptr, i64, f32, f32, f32, u64, u32, cint, cint]
    lib.ptq_fq_forward.restype = None
    lib.ptq_fq_backward.argtypes = [ptr, ptr, ptr, i64, cint, cint]
    lib.ptq_fq_backward.restype = ctypes.c_double
    lib.ptq_round_soft.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, f32, ptr, ptr, ptr, cint]
    lib.ptq_round_soft.restype = ctypes.c_double
    lib.ptq_adam.argtypes = [ptr, ptr, ptr, ptr, i64, f32, f32, f32, f32, f32, f32, cint]
    lib.ptq_adam.restype = None
    lib.ptq_row_stats.argtypes = [ptr, i64, i64, ptr, ptr, cint]
    lib.ptq_row_stats.restype = None
    lib.ptq_row_stats_backward.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ptr, cint]
    lib.ptq_row_stats_backward.restype = None
    lib.ptq_bn_distance.argtypes = [ptr, i64, i64, i64, ptr, ptr, f32, ptr, ptr, ptr, cint]
    lib.ptq_bn_distance.restype = ctypes.c_double
    lib.ptq_sqdist_grad.argtypes = [ptr, ptr, ptr, i64, f32, cint]
    lib.ptq_sqdist_grad.restype = ctypes.c_double
    lib.ptq_mix_rows.argtypes = [ptr, ptr, ptr, i64, i64, ptr, u64, u32, cint]
    lib.ptq_mix_rows.restype = None
    lib.ptq_keep_mask.argtypes = [ptr, i64, u64, u32, cint]
    lib.ptq_keep_mask.restype = None
    return lib


_forced: list[str] = []


@contextlib.contextmanager
def using(name: str):
    """Inside: every kernel call in this process takes implementation `name` (auto, c, compiled, torch) whatever
    PTQKIT_KERNELS says: the acceptance script and the benchmarks put the implementations side by side."""
    if name not in IMPLEMENTATIONS + ("auto",):
        raise ValueError(f"kernel implementation {name!r}: expected one of auto, {', '.join(IMPLEMENTATIONS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _requested() -> str:
    """`using(...)`, else PTQKIT_KERNELS: auto (unset; also 1), c, compiled, torch (also 0)."""
    if _forced:
        return _forced[-1]
    value = os.environ.get("PTQKIT_KERNELS", "auto").strip().lower()
    value = {"0": "torch", "1": "auto", "": "auto"}.get(value, value)
    if value not in IMPLEMENTATIONS + ("auto",):
        _warn_once(f"PTQKIT_KERNELS={value!r} is not one of auto, c, compiled, torch; using auto")
        return "auto"
    return value


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def implementation(device) -> str:
    """Which implementation serves tensors on `device`: `c` (CPU only, where it is built), `compiled` or `torch`.
    auto and c: the C kernels on the CPU, else torch ops there; torch.compile on CUDA. compiled, torch: that one
    on every device. A compiled kernel that fails to build falls back to torch ops, with one warning."""
    device = torch.device(device)
    choice = _requested()
    if choice in ("auto", "c"):
        if device.type == "cpu":
            return "c" if library() is not None else "torch"
        choice = "compiled" if device.type == "cuda" else "torch"
    return choice


def _native(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors) and \
        implementation("cpu") == "c"


# ---------------------------------------------------------------------------------------------- the mask
def threshold(keep_prob: float) -> int:
    """keep_i = draw_i < threshold, draws uniform on 0..65535: keep_prob realised to 1/65536."""
    return max(0, min(KEEP_ALL, int(round(keep_prob * KEEP_ALL))))


def new_key() -> torch.Tensor:
    """A 64-bit mask key from torch's default (CPU) generator, as a 0-dim int64 tensor: the torch paths use it as
    it is (moved to the device without waiting), the C kernels read its bits on the host."""
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64)


def _key_int(key) -> int:
    """The key's 64 bits as the unsigned integer the C kernels take."""
    return (hostsync.host_int(key) if isinstance(key, torch.Tensor) else int(key)) & _MASK64


def _key_on(key, device) -> torch.Tensor | int:
    """An int key as it is; a key tensor on `device` (a copy that does not wait, where it moves)."""
    if isinstance(key, torch.Tensor):
        return key.to(device, non_blocking=True)
    return key


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)   # logical shift of an int64 bit pattern


def draws(n: int, key: int, device) -> torch.Tensor:
    """The 16-bit draws of elements 0..n-1 (int32), in torch ops: fakequant.c's `draws`."""
    words = (n + 3) // 4
    base = _key_on(key, device) if isinstance(key, torch.Tensor) else _signed(key)
    z = base + torch.arange(words, dtype=torch.int64, device=device) * _signed(_GAMMA)
    z = (z ^ _lsr(z, 30)) * _signed(_M1)
    z = (z ^ _lsr(z, 27)) * _signed(_M2)
    z = z ^ _lsr(z, 31)
    parts = torch.stack([_lsr(z, 16 * k) & 0xFFFF for k in range(4)], dim=1)
    return parts.reshape(-1)[:n].to(torch.int32)


def keep_mask(shape, keep_prob: float, device, key: torch.Tensor | int | None = None) -> torch.Tensor:
    """Bool mask, each element True with probability `keep_prob` (to 1/65536)."""
    key = new_key() if key is None else key
    n = 1
    for s in shape:
        n *= int(s)
    thr = threshold(keep_prob)
    device = torch.device(device)
    impl = implementation(device)
    if device.type == "cpu" and impl == "c":
        out = torch.empty(shape, dtype=torch.uint8)
        library().ptq_keep_mask(out.data_ptr(), n, _key_int(key), thr, torch.get_num_threads())
        return out.view(torch.bool)
    if impl == "compiled" and n > 1:
        out = _run_compiled("mask", n, _key_on(_key_tensor(key, device), device), thr)
        if out is not None:
            return out.reshape(shape)
    return (draws(n, key, device) < thr).reshape(shape)


def _mix(a: torch.Tensor, b: torch.Tensor, key, thr: int) -> torch.Tensor:
    """where(keep, a, b) over the elements of a (and b, of a's shape): the torch-ops mix."""
    return torch.where((draws(a.numel(), key, a.device) < thr).view(a.shape), a, b)


def mix_rows(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, keep_prob: float, device,
             key: torch.Tensor | int | None = None) -> torch.Tensor:
    """where(keep_mask, a[rows], b[rows]) in float32 on `device`: QDrop's unit-input mix, drawn straight from
    the two caches (no gathered copies of either)."""
    key = new_key() if key is None else key
    thr = threshold(keep_prob)
    device = torch.device(device)
    impl = implementation(device)
    if device.type == "cpu" and impl == "c" and _native(a, b):
        rows = rows.to(torch.int64).contiguous()
        out = torch.empty((len(rows),) + tuple(a.shape[1:]), dtype=torch.float32)
        width = out[0].numel() if len(rows) else 0
        library().ptq_mix_rows(a.data_ptr(), b.data_ptr(), rows.data_ptr(), len(rows), width, out.data_ptr(),
                               _key_int(key), thr, torch.get_num_threads())
        return out
    qa, qb = gather_rows(a, rows, device), gather_rows(b, rows, device)
    if impl == "compiled" and qa.numel() > 1:
        out = _run_compiled("mix", _flat(qa), _flat(qb), _key_on(_key_tensor(key, device), device), thr)
        if out is not None:
            return out.view(qa.shape)
    return _mix(qa, qb, key, thr)


# ------------------------------------------------------------------------------------------ host and device
def pinned_staging(store_device, compute_device) -> bool:
    """Whether rows gathered from a cache on `store_device` for `compute_device` go through pinned host memory:
    a cache held on the CPU (algorithm.cache_device cpu) for a CUDA model. A copy from pinned memory runs without
    the host waiting for it, and at the link's full speed; from ordinary (pageable) memory the driver first copies
    it once more on the host."""
    return torch.device(store_device).type == "cpu" and torch.device(compute_device).type == "cuda"


def gather_rows(cached: torch.Tensor, idx: torch.Tensor, device) -> torch.Tensor:
    """Rows `idx` of a cached tensor, as float32 on `device`, without the host waiting: on the device, the index
    goes there; from a CPU cache to a GPU, the rows are gathered into pinned memory and copied asynchronously (the
    pinned block is not reused before the copy is done: torch's caching host allocator records it)."""
    device = torch.device(device)
    if pinned_staging(cached.device, device):
        staged = _pinned_empty((len(idx),) + tuple(cached.shape[1:]), cached.dtype)
        torch.index_select(cached, 0, idx.to(torch.int64), out=staged)
        # in the cache's dtype over the link (half the bytes for a float16 cache), converted on the device
        return staged.to(device, non_blocking=True).to(torch.float32)
    if cached.device.type != "cpu":
        rows = cached.index_select(0, idx.to(cached.device, non_blocking=True))
        # towards the CPU the copy must be complete before the host reads it: a blocking copy
        return rows.to(device, torch.float32, non_blocking=device.type != "cpu")
    return cached[idx].to(device, torch.float32)


def _pinned_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`; from the CPU to a GPU through pinned memory, without the host waiting for the copy."""
    device = torch.device(device)
    if t.device.type == "cpu" and pinned_staging(t.device, device):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ------------------------------------------------------------------------------------- fake quantization
CODE_OFFSET = 1048576.0   # fakequant.c: a kept, clamped element's code is its clamped integer +/- this


def _reference_forward(x, scale, lo, hi, key, thr, train, stop_at_bounds=False):
    """out (and the backward's code when `train`) in torch ops: fakequant.c's ptq_fq_forward."""
    u = x / scale
    q = torch.round(u)
    qc = torch.clamp(q, lo, hi)
    out = qc * scale
    keep = draws(x.numel(), key, x.device).view(x.shape) < thr if thr < KEEP_ALL else None
    if keep is not None:
        out = torch.where(keep, out, x)
    if not train:
        return out, None
    clamped_code = torch.where(qc >= 0, qc + CODE_OFFSET, qc - CODE_OFFSET)
    inside = (q > lo) & (q < hi) if stop_at_bounds else q == qc
    code = torch.where(inside, q - u, clamped_code)
    if keep is not None:
        code = code.masked_fill(~keep, 0.0)
    return out, code


def _reference_backward(code, g, need_scale_grad):
    clamped = code.abs() > 0.5 * CODE_OFFSET
    gx = g.masked_fill(clamped, 0.0)
    gs = None
    if need_scale_grad:
        ds = torch.where(clamped, code - torch.where(code > 0, CODE_OFFSET, -CODE_OFFSET), code)
        gs = (ds.double() * g.double()).sum()
    return gx, gs


def _forward(x, scale, lo, hi, key, thr, train, stop_at_bounds=False, impl=None):
    """(out, code) of the training forward (code None when not `train`). `impl` None: the C kernel where it
    applies, else torch ops."""
    if impl is None:
        impl = "c" if _native(x) else "torch"
    if impl == "c" and _native(x):
        out = torch.empty_like(x)
        code = torch.empty_like(x) if train else None
        library().ptq_fq_forward(x.data_ptr(), out.data_ptr(), code.data_ptr() if train else None, x.numel(),
                                 hostsync.host_float(scale), float(lo), float(hi), 0 if key is None else _key_int(key),
                                 thr, int(stop_at_bounds), torch.get_num_threads())
        return out, code
    scale = scale.detach()
    if impl == "compiled" and x.numel() > 1:
        key_t = _key_on(_key_tensor(key, x.device), x.device) if thr < KEEP_ALL else None
        if train:
            res = _run_compiled("train", _flat(x), scale, lo, hi, key_t, thr, bool(stop_at_bounds))
            if res is not None:
                return res[0].view(x.shape), res[1].view(x.shape)
        else:
            res = _run_compiled("infer", _flat(x), scale, lo, hi, key_t, thr)
            if res is not None:
                return res.view(x.shape), None
    return _reference_forward(x, scale, lo, hi, key, thr, train, stop_at_bounds)


class _ActFakeQuant(torch.autograd.Function):
    """keep ? clamp(round(x / s), qmin - z, qmax - z) · s : x, with the LSQ step gradient (fakequant.c)."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi, key, thr, stop_at_bounds, impl):
        out, code = _forward(x, scale, lo, hi, key, thr, train=True, stop_at_bounds=stop_at_bounds, impl=impl)
        ctx.save_for_backward(code)
        ctx.scale_shape, ctx.scale_dtype, ctx.impl = scale.shape, scale.dtype, impl
        return out

    @staticmethod
    def backward(ctx, g):
        (code,) = ctx.saved_tensors
        need_scale_grad = ctx.needs_input_grad[1]
        g = g.contiguous()
        if ctx.impl == "c" and _native(code, g):
            gx = torch.empty_like(g)
            gs = library().ptq_fq_backward(code.data_ptr(), g.data_ptr(), gx.data_ptr(), g.numel(),
                                           int(need_scale_grad), torch.get_num_threads())
            gs = torch.full(ctx.scale_shape, gs, dtype=ctx.scale_dtype, device=g.device) if need_scale_grad else None
            return gx, gs, None, None, None, None, None, None
        res = None
        if ctx.impl == "compiled" and g.numel() > 1:
            res = _run_compiled("backward", _flat(code), _flat(g), bool(need_scale_grad))
        gx, gs = (res[0].view(g.shape), res[1]) if res is not None else _reference_backward(code, g, need_scale_grad)
        # the step gradient stays on the device (a double sum, rounded once to the step's dtype)
        gs = gs.to(ctx.scale_dtype).reshape(ctx.scale_shape) if need_scale_grad else None
        return gx, gs, None, None, None, None, None, None


def act_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                   keep_prob: float = 1.0, stop_at_bounds: bool = False) -> torch.Tensor:
    """Per-tensor fake quantization of `x` with step `scale` (one element), each element kept quantized with
    probability `keep_prob` (QDrop) and passed through otherwise; differentiable in `x` and `scale`.
    `stop_at_bounds`: an element rounded onto the lowest or highest level is treated as clipped in the backward
    (fakequant.c's header)."""
    thr = threshold(keep_prob)
    key = new_key() if thr < KEEP_ALL else None
    impl = implementation(x.device)
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.is_contiguous():
        x = x.contiguous()
    if impl == "c" and _native(x):
        zp = hostsync.host_float(zero_point)      # the C kernel takes its scalars on the host (a CPU tensor)
        lo, hi = float(quant_min) - zp, float(quant_max) - zp
    else:
        impl = "compiled" if impl == "compiled" else "torch"
        zp = zero_point.to(x.dtype)               # integers: exact in float, and no read of the device
        lo, hi = quant_min - zp, quant_max - zp
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _ActFakeQuant.apply(x, scale, lo, hi, key, thr, bool(stop_at_bounds), impl)
    return _forward(x, scale.detach(), lo, hi, key, thr, train=False, impl=impl)[0]


# ---------------------------------------------------------------------------------------- torch.compile
_compile_failed: set[str] = set()     # graphs torch.compile could not build here: torch ops from then on


def _flat(t: torch.Tensor) -> torch.Tensor:
    """`t`'s elements as a 1-d tensor on the same memory that is not a view: torch.compile guards on a view's
    base, whose shape changes from unit to unit (a recompile each), not on a plain tensor's."""
    t = t.contiguous()
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def _key_tensor(key, device) -> torch.Tensor | None:
    """A key as a 0-dim int64 tensor (an int key, as tests give, becomes one)."""
    if key is None or isinstance(key, torch.Tensor):
        return key
    return torch.tensor(_signed(int(key) & _MASK64), dtype=torch.int64)


def _fq_train_flat(x, scale, lo, hi, key, thr: int, stop_at_bounds: bool):
    return _reference_forward(x, scale, lo, hi, key, thr, True, stop_at_bounds)


def _fq_infer_flat(x, scale, lo, hi, key, thr: int):
    return _reference_forward(x, scale, lo, hi, key, thr, False)[0]


def _mask_flat(n: int, key, thr: int):
    return draws(n, key, key.device) < thr


_COMPILABLE = {"train": _fq_train_flat, "infer": _fq_infer_flat, "backward": _reference_backward, "mix": _mix,
               "mask": _mask_flat, "soft": lambda *args: _reference_soft(*args)}


@lru_cache(maxsize=None)
def _compiled(name: str):
    # One graph per function and flag combination: the tensors are flat, their one dimension marked dynamic
    # (_run_compiled), so units of other batch or feature-map sizes reuse it.
    return torch.compile(_COMPILABLE[name], fullgraph=True, dynamic=None)


def _run_compiled(name: str, *args):
    """The compiled kernel's result, or None once torch.compile has failed here (torch ops from then on)."""
    if name in _compile_failed:
        return None
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 1 and a.numel() > 1:
            torch._dynamo.mark_dynamic(a, 0)
    try:
        with torch.no_grad():   # kernels, not autograd: their gradients are _ActFakeQuant's (grad mode is a guard)
            return _compiled(name)(*args)
    except Exception as exc:  # a missing compiler or Triton, an inductor bug: the torch ops compute the same
        _compile_failed.add(name)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("torch.compile of the %s kernel failed (%s: %s); using torch ops", name, type(exc).__name__,
                    reason[:300])
        return None


def warm_up(device) -> dict:
    """Compile (on CUDA also autotune) the graphs the loops use, on small tensors, so that no loop compiles: the
    tensors' length being dynamic, the graphs serve every size after. Nothing happens unless `device` takes the
    compiled kernels. Returns `compile_stats()`; `compile_failed()` says whether torch.compile worked here."""
    device = torch.device(device)
    if implementation(device) != "compiled":
        return compile_stats()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 17, 19, generator=gen) * 4).to(device)
    scale = torch.tensor([0.5], device=device)
    zero_point = torch.zeros(1, dtype=torch.int, device=device)
    for keep_prob in (1.0, 0.5):
        for stop in (False, True):
            for learn_step in (True, False):
                xr, s = x.clone().requires_grad_(), scale.clone().requires_grad_(learn_step)
                act_fake_quant(xr, s, zero_point, 0, 15, keep_prob, stop).sum().backward()
        with torch.no_grad():
            act_fake_quant(x, scale, zero_point, 0, 15, keep_prob)
    mix_rows(x, x + 1, torch.tensor([1, 0]), 0.5, device)
    keep_mask(x.shape, 0.5, device)
    w = x.reshape(-1)
    for beta in (None, 20.0):
        alpha = torch.randn(w.shape, generator=gen).to(device).requires_grad_()
        out, penalty = soft_rounding(alpha, torch.floor(w), torch.ones_like(w), torch.zeros_like(w),
                                     torch.full_like(w, -4.0), torch.full_like(w, 3.0), beta)
        (out.sum() + penalty).backward()
    return compile_stats()


def compile_failed() -> list[str]:
    """The graphs torch.compile failed to build in this process (they run as torch ops)."""
    return sorted(_compile_failed)


def compile_stats() -> dict:
    """Graphs torch.compile has made in this process, and the kernels inductor generated for them: read before and
    after a unit, the difference says whether the unit compiled anything (it should not after the first)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    metrics = sys.modules.get("torch._inductor.metrics")
    return {"graphs": int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0,
            "kernels": int(metrics.generated_kernel_count) if metrics is not None else 0}


# ------------------------------------------------------------------------------------------ learned rounding
ZETA, GAMMA = 1.1, -0.1   # AdaRound's rectified sigmoid: h = clamp(σ(V)(ζ - γ) + γ, 0, 1)


def rectified_sigmoid(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h(V) and dh/dV (0 where the clamp holds)."""
    sig = torch.sigmoid(alpha)
    raw = sig * (ZETA - GAMMA) + GAMMA
    h = raw.clamp(0, 1)
    dh = ((sig - sig * sig) * (ZETA - GAMMA)).masked_fill_(h != raw, 0.0)
    return h, dh


def _reference_soft(alpha, base, scale, zero, lo, hi, beta):
    h, dh = rectified_sigmoid(alpha)
    t = base + h + zero
    tc = torch.clamp(t, lo, hi)
    out = (tc - zero) * scale
    coef_w = (dh * scale).masked_fill_(tc != t, 0.0)
    if beta is None:
        return out, coef_w, None, None
    d = 2 * h - 1
    a = d.abs()
    ab1 = a.pow(beta - 1)
    penalty = (1 - ab1 * a).double().sum()
    return out, coef_w, ab1 * torch.sign(d) * dh * (-2.0 * beta), penalty


class _SoftRounding(torch.autograd.Function):
    """(w_q, Σ (1 − |2h − 1|^β)) of flat V: fakequant.c's ptq_round_soft, or the same in torch ops."""

    @staticmethod
    def forward(ctx, alpha, base, scale, zero, lo, hi, beta):
        if _native(alpha, base, scale, zero, lo, hi):
            out, coef_w = torch.empty_like(alpha), torch.empty_like(alpha)
            coef_p = torch.empty_like(alpha) if beta is not None else None
            penalty = library().ptq_round_soft(
                alpha.data_ptr(), base.data_ptr(), scale.data_ptr(), zero.data_ptr(), lo.data_ptr(), hi.data_ptr(),
                alpha.numel(), 0.0 if beta is None else float(beta), out.data_ptr(), coef_w.data_ptr(),
                None if coef_p is None else coef_p.data_ptr(), torch.get_num_threads())
            ctx.save_for_backward(coef_w, coef_p)
            return out, torch.tensor(0.0 if beta is None else penalty, device=alpha.device)
        res = None
        if implementation(alpha.device) == "compiled" and alpha.dim() == 1 and alpha.numel() > 1:
            # β as a tensor made on the device (a fill, no copy): as a number it would be a constant of the graph,
            # and it changes every iteration
            beta_t = None if beta is None else torch.full((), float(beta), dtype=alpha.dtype, device=alpha.device)
            res = _run_compiled("soft", *(_flat(t) for t in (alpha, base, scale, zero, lo, hi)), beta_t)
        out, coef_w, coef_p, penalty = res if res is not None else _reference_soft(alpha, base, scale, zero, lo, hi,
                                                                                   beta)
        ctx.save_for_backward(coef_w, coef_p)
        # the regulariser stays on the device: a double sum, rounded once to float32
        return out, penalty.to(torch.float32) if penalty is not None else alpha.new_zeros(())

    @staticmethod
    def backward(ctx, g_out, g_penalty):
        coef_w, coef_p = ctx.saved_tensors
        grad = g_out * coef_w
        if coef_p is not None:
            grad = grad.addcmul_(coef_p, g_penalty)
        return grad, None, None, None, None, None, None


def soft_rounding(alpha, base, scale, zero, lo, hi, beta: float | None = None):
    """AdaRound's soft-rounded weights s · (clamp(base + h(V) + z, lo, hi) − z) of flat tensors, differentiable in
    V, and with `beta` the regulariser Σ (1 − |2 h(V) − 1|^β) (else a zero); one pass for both."""
    return _SoftRounding.apply(alpha, base, scale, zero, lo, hi, beta)


# ---------------------------------------------------------------------------------------------------- Adam
# Which Adam learns the rounding variables, step sizes and PD-Quant's corrected inputs on the CPU: "torch"
# (torch.optim.Adam, fused: one kernel over all parameters, on the CPU since torch 2.4) or "c" (fakequant.c's
# ptq_adam, one OpenMP pass per parameter, less Python per step). CUDA always gets torch's fused Adam.
# benchmarks/optimiser_speed.py times both on the units' parameter sizes; torch's belongs here unless ptq_adam is
# at least 10 % faster on every case. It is not on PD-Quant's corrected inputs (within 2 %), so "torch"; where it
# is faster (a unit's rounding variables, about 45 microseconds a step) the saving is under 1 % of an iteration.
# "c" reproduces bit for bit the CPU figures made before this choice (benchmarks/results say which commit).
CPU_ADAM = "torch"


def adam(groups: list[dict], betas=(0.9, 0.999), eps: float = 1e-8):
    """Adam (no weight decay) over parameter groups, each group's `lr` changeable between steps (a float, or a
    0-dim tensor on the parameters' device that a `Plateau` lowers without the host reading it)."""
    params = [p for g in groups for p in g["params"]]
    if CPU_ADAM == "c" and params and all(_native(p.detach()) for p in params):
        return Adam(groups, betas=betas, eps=eps)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.Adam(groups, betas=betas, eps=eps, fused=fused)


class Adam:
    """Adam over parameter groups (no weight decay), one fused pass per parameter: fakequant.c's `ptq_adam` on
    contiguous float32 CPU parameters, else torch's fused Adam (CUDA) or its default. Each group's `lr` may be
    changed between steps. Same update as torch.optim.Adam up to float rounding."""

    def __init__(self, groups: list[dict], betas=(0.9, 0.999), eps: float = 1e-8):
        self.param_groups = groups
        self.betas, self.eps = betas, eps
        params = [p for g in groups for p in g["params"]]
        self.native = bool(params) and all(_native(p.detach()) for p in params)
        self.state = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in params} if self.native else None
        self.steps = 0
        self._torch = None
        if not self.native:
            fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
            self._torch = torch.optim.Adam([{"params": g["params"], "lr": g["lr"]} for g in groups], betas=betas,
                                           eps=eps, fused=fused)

    def zero_grad(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if not self.native:
            for ours, theirs in zip(self.param_groups, self._torch.param_groups):
                theirs["lr"] = ours["lr"]
            self._torch.step()
            return
        self.steps += 1
        beta1, beta2 = self.betas
        bc1 = 1 - beta1 ** self.steps
        bc2_sqrt = (1 - beta2 ** self.steps) ** 0.5
        lib, threads = library(), torch.get_num_threads()
        for group in self.param_groups:
            lr = group["lr"]
            lr = hostsync.host_float(lr) if isinstance(lr, torch.Tensor) else lr   # CPU parameters: a CPU tensor
            for p in group["params"]:
                if p.grad is None:
                    continue
                m, v = self.state[p]
                grad = p.grad.contiguous()
                lib.ptq_adam(p.data_ptr(), grad.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), lr,
                             beta1, beta2, self.eps, bc1, bc2_sqrt, threads)


class Plateau:
    """torch's ReduceLROnPlateau (mode min, relative threshold, no cooldown) kept on the device: the best loss, the
    count of steps without improvement and each group's learning rate are tensors there, so a step reads nothing
    back to the host (the optimiser takes the learning rate as a tensor). The lr of every group times `factor`
    once the loss has not improved by `threshold` (relative) for more than `patience` steps, never below
    `min_lr`."""

    def __init__(self, optimiser, patience: int = 10, factor: float = 0.1, min_lr: float = 0.0,
                 threshold: float = 1e-4, eps: float = 1e-8):
        self.patience, self.factor, self.min_lr, self.threshold, self.eps = patience, factor, min_lr, threshold, eps
        # (float64 schedule, the optimiser's tensor): the schedule in double as ReduceLROnPlateau's Python floats,
        # the optimiser's copy in the parameters' dtype
        self.lrs = []
        for group in optimiser.param_groups:
            p = group["params"][0]
            lr = group["lr"]
            start = lr.double() if isinstance(lr, torch.Tensor) else torch.full((), float(lr), dtype=torch.float64,
                                                                                 device=p.device)
            group["lr"] = start.to(p.dtype)
            self.lrs.append((start, group["lr"]))
        device = self.lrs[0][0].device
        self.best = torch.full((), float("inf"), dtype=torch.float64, device=device)
        self.bad = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def step(self, loss: torch.Tensor) -> None:
        loss = loss.detach().to(self.best.device, torch.float64)
        better = loss < self.best * (1 - self.threshold)
        self.best = torch.where(better, loss, self.best)
        self.bad = torch.where(better, 0, self.bad + 1)
        reduce = self.bad > self.patience
        for schedule, lr in self.lrs:
            new = torch.clamp(schedule * self.factor, min=self.min_lr)
            schedule.copy_(torch.where(reduce & (schedule - new > self.eps), new, schedule))
            lr.copy_(schedule)
        self.bad = torch.where(reduce, 0, self.bad)

    @property
    def lr(self) -> list[torch.Tensor]:
        """Each group's learning rate as the schedule holds it (float64, on the device)."""
        return [schedule for schedule, _ in self.lrs]


# ----------------------------------------------------------------------- PD-Quant's distribution correction
class _RowStats(torch.autograd.Function):
    """Per-row mean and unbiased variance of (N, C, L) over L, with a closed-form backward: fakequant.c's
    ptq_row_stats (one pass each way), or the same in torch ops (two passes forward; torch.var is a one-thread
    Welford loop on CPU that costs as much as a unit's convolutions)."""

    @staticmethod
    def forward(ctx, flat):
        rows, length = flat.shape[0] * flat.shape[1], flat.shape[2]
        if _native(flat):
            mean = torch.empty(flat.shape[:2])
            var = torch.empty(flat.shape[:2])
            library().ptq_row_stats(flat.data_ptr(), rows, length, mean.data_ptr(), var.data_ptr(),
                                    torch.get_num_threads())
        else:
            mean = flat.mean(2)
            centred = flat - mean.unsqueeze(2)
            var = (centred * centred).sum(2) / (length - 1)
        ctx.save_for_backward(flat, mean)
        return mean, var

    @staticmethod
    def backward(ctx, g_mean, g_var):
        flat, mean = ctx.saved_tensors
        rows, length = flat.shape[0] * flat.shape[1], flat.shape[2]
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean.contiguous()
        g_var = torch.zeros_like(mean) if g_var is None else g_var.contiguous()
        if _native(flat, g_mean, g_var):
            gx = torch.empty_like(flat)
            library().ptq_row_stats_backward(flat.data_ptr(), mean.data_ptr(), g_mean.data_ptr(), g_var.data_ptr(),
                                             rows, length, gx.data_ptr(), torch.get_num_threads())
            return gx
        return torch.addcmul((g_mean / length).unsqueeze(2), flat - mean.unsqueeze(2),
                             (g_var * (2.0 / (length - 1))).unsqueeze(2))


def row_stats(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over the last dimension of (N, C, L), differentiable."""
    return _RowStats.apply(flat.contiguous())


def sqdist_grad_(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor, coef: float) -> torch.Tensor:
    """grad += coef (a - b), in place; returns Σ (a - b)² (a 0-dim float64 tensor, on the device): a
    squared-distance term and its gradient in one pass."""
    if _native(a, b, grad):
        return torch.tensor(library().ptq_sqdist_grad(a.data_ptr(), b.data_ptr(), grad.data_ptr(), a.numel(), coef,
                                                      torch.get_num_threads()), dtype=torch.float64)
    d = a - b
    grad.add_(d, alpha=coef)
    return (d.double() * d.double()).sum()


class _BNDistance(torch.autograd.Function):
    """Σ_{n,c} (m_nc − μ_c)² + (sqrt(v_nc + eps) − σ_c)², over N: fakequant.c's ptq_bn_distance (one pass forward,
    one backward), or the same through autograd in torch ops."""

    @staticmethod
    def forward(ctx, flat, mu, sigma, eps):
        n, c, length = flat.shape
        mean, d_mean, d_var = (torch.empty(n, c) for _ in range(3))
        loss = library().ptq_bn_distance(flat.data_ptr(), n, c, length, mu.data_ptr(), sigma.data_ptr(), eps,
                                         mean.data_ptr(), d_mean.data_ptr(), d_var.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(flat, mean, d_mean, d_var)
        return torch.tensor(loss, dtype=flat.dtype)

    @staticmethod
    def backward(ctx, g):
        flat, mean, d_mean, d_var = ctx.saved_tensors
        gx = torch.empty_like(flat)
        # named, not temporaries: a tensor made inside the call's arguments is freed before C reads it
        g_mean, g_var = d_mean * float(g), d_var * float(g)
        library().ptq_row_stats_backward(flat.data_ptr(), mean.data_ptr(), g_mean.data_ptr(), g_var.data_ptr(),
                                         flat.shape[0] * flat.shape[1], flat.shape[2], gx.data_ptr(),
                                         torch.get_num_threads())
        return gx, None, None, None


def bn_distance(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample distance of the channel statistics of x (N, C, ...) to a BN layer's running statistics:
    Σ_{n,c} (mean_nc − μ_c)² + (std_nc − σ_c)², over N, std = sqrt(unbiased var + eps), σ = sqrt(running var + eps)."""
    flat = x.flatten(2).contiguous()
    sigma = (running_var + eps).sqrt()
    if _native(flat, running_mean.detach().contiguous(), sigma.detach().contiguous()):
        return _BNDistance.apply(flat, running_mean.detach().contiguous(), sigma.detach().contiguous(), eps)
    mean, var = row_stats(flat)
    std = (var + eps).sqrt()
    return ((mean - running_mean).pow(2).sum() + (std - sigma).pow(2).sum()) / len(flat)
