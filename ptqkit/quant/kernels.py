"""Fused elementwise kernels of the quantizer backend: activation fake quantization with QDrop's keep mask (forward
and backward in one pass each), the unit-input mix, and the keep mask itself.

Why: on CPU, reconstruction is bound by memory passes over activation-sized tensors, not by the convolutions'
arithmetic alone. In torch ops a dropped LSQ fake quantizer takes about a dozen passes forward and three backward;
`fakequant.c` takes one each (benchmarks/results/reconstruction_speed.md has the breakdown).

Two implementations with the same values:
- `fakequant.c`, compiled at first use with the system C compiler into the per-user cache (`ptqkit.cache`:
  `PTQKIT_CACHE`, default `~/.cache/ptqkit`), for contiguous float32 CPU tensors;
- the same arithmetic in torch ops, for everything else (CUDA, other dtypes) and where no compiler is found
  (`PTQKIT_KERNELS=0` forces it).
The keep mask is a counter-based hash of (key, element index) — SplitMix64, see fakequant.c — so both give the
same mask for the same key, whatever the device or thread count. A key is drawn from torch's default generator for
every call, so `torch.manual_seed` fixes the masks and a saved random state replays them.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache

import torch

from ptqkit.cache import cache_dir

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakequant.c")
KEEP_ALL = 1 << 16            # threshold that keeps every element
_GAMMA = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared")
_LIBS = ("-lm",)     # with glibc, also libmvec: the vector expf/powf of the rounding kernel


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


@lru_cache(maxsize=1)
def library():
    """The compiled kernels (ctypes), or None where they cannot be had; the reason is logged once."""
    if os.environ.get("PTQKIT_KERNELS", "1") == "0":
        return None
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


def _native(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors) and \
        library() is not None


# ---------------------------------------------------------------------------------------------- the mask
def threshold(keep_prob: float) -> int:
    """keep_i = draw_i < threshold, draws uniform on 0..65535: keep_prob realised to 1/65536."""
    return max(0, min(KEEP_ALL, int(round(keep_prob * KEEP_ALL))))


def new_key() -> int:
    """A 64-bit mask key from torch's default generator."""
    return int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64)) & (2 ** 64 - 1)


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)   # logical shift of an int64 bit pattern


def draws(n: int, key: int, device) -> torch.Tensor:
    """The 16-bit draws of elements 0..n-1 (int32), in torch ops: fakequant.c's `draws`."""
    words = (n + 3) // 4
    z = _signed(key) + torch.arange(words, dtype=torch.int64, device=device) * _signed(_GAMMA)
    z = (z ^ _lsr(z, 30)) * _signed(_M1)
    z = (z ^ _lsr(z, 27)) * _signed(_M2)
    z = z ^ _lsr(z, 31)
    parts = torch.stack([_lsr(z, 16 * k) & 0xFFFF for k in range(4)], dim=1)
    return parts.reshape(-1)[:n].to(torch.int32)


def keep_mask(shape, keep_prob: float, device, key: int | None = None) -> torch.Tensor:
    """Bool mask, each element True with probability `keep_prob` (to 1/65536)."""
    key = new_key() if key is None else key
    n = 1
    for s in shape:
        n *= int(s)
    thr = threshold(keep_prob)
    device = torch.device(device)
    lib = library() if device.type == "cpu" else None
    if lib is not None:
        out = torch.empty(shape, dtype=torch.uint8)
        lib.ptq_keep_mask(out.data_ptr(), n, key, thr, torch.get_num_threads())
        return out.view(torch.bool)
    return (draws(n, key, device) < thr).reshape(shape)


def mix_rows(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, keep_prob: float, device,
             key: int | None = None) -> torch.Tensor:
    """where(keep_mask, a[rows], b[rows]) in float32 on `device`: QDrop's unit-input mix, drawn straight from
    the two caches (no gathered copies of either)."""
    key = new_key() if key is None else key
    thr = threshold(keep_prob)
    device = torch.device(device)
    if device.type == "cpu" and _native(a, b):
        rows = rows.to(torch.int64).contiguous()
        out = torch.empty((len(rows),) + tuple(a.shape[1:]), dtype=torch.float32)
        width = out[0].numel() if len(rows) else 0
        library().ptq_mix_rows(a.data_ptr(), b.data_ptr(), rows.data_ptr(), len(rows), width, out.data_ptr(),
                               key, thr, torch.get_num_threads())
        return out
    qa = a[rows].to(device, torch.float32, non_blocking=True)
    qb = b[rows].to(device, torch.float32, non_blocking=True)
    return torch.where(keep_mask(qa.shape, keep_prob, device, key), qa, qb)


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


def _forward(x, scale, lo, hi, key, thr, train, stop_at_bounds=False):
    if _native(x):
        out = torch.empty_like(x)
        code = torch.empty_like(x) if train else None
        library().ptq_fq_forward(x.data_ptr(), out.data_ptr(), code.data_ptr() if train else None, x.numel(),
                                 float(scale), lo, hi, key, thr, int(stop_at_bounds), torch.get_num_threads())
        return out, code
    return _reference_forward(x, scale.detach(), lo, hi, key, thr, train, stop_at_bounds)


class _ActFakeQuant(torch.autograd.Function):
    """keep ? clamp(round(x / s), qmin - z, qmax - z) · s : x, with the LSQ step gradient (fakequant.c)."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi, key, thr, stop_at_bounds):
        out, code = _forward(x, scale, lo, hi, key, thr, train=True, stop_at_bounds=stop_at_bounds)
        ctx.save_for_backward(code)
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        (code,) = ctx.saved_tensors
        need_scale_grad = ctx.needs_input_grad[1]
        g = g.contiguous()
        if _native(code, g):
            gx = torch.empty_like(g)
            gs = library().ptq_fq_backward(code.data_ptr(), g.data_ptr(), gx.data_ptr(), g.numel(),
                                           int(need_scale_grad), torch.get_num_threads())
        else:
            gx, gs = _reference_backward(code, g, need_scale_grad)
        gs = torch.full(ctx.scale_shape, float(gs), dtype=ctx.scale_dtype, device=g.device) \
            if need_scale_grad else None
        return gx, gs, None, None, None, None, None


def act_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                   keep_prob: float = 1.0, stop_at_bounds: bool = False) -> torch.Tensor:
    """Per-tensor fake quantization of `x` with step `scale` (one element), each element kept quantized with
    probability `keep_prob` (QDrop) and passed through otherwise; differentiable in `x` and `scale`.
    `stop_at_bounds`: an element rounded onto the lowest or highest level is treated as clipped in the backward
    (fakequant.c's header)."""
    zp = float(zero_point)
    lo, hi = float(quant_min) - zp, float(quant_max) - zp
    thr = threshold(keep_prob)
    key = new_key() if thr < KEEP_ALL else 0
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.is_contiguous():
        x = x.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _ActFakeQuant.apply(x, scale, lo, hi, key, thr, bool(stop_at_bounds))
    return _forward(x, scale.detach(), lo, hi, key, thr, train=False)[0]


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
        else:
            out, coef_w, coef_p, penalty = _reference_soft(alpha, base, scale, zero, lo, hi, beta)
        ctx.save_for_backward(coef_w, coef_p)
        return out, torch.tensor(0.0 if penalty is None else float(penalty), device=alpha.device)

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
            for p in group["params"]:
                if p.grad is None:
                    continue
                m, v = self.state[p]
                grad = p.grad.contiguous()
                lib.ptq_adam(p.data_ptr(), grad.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), group["lr"],
                             beta1, beta2, self.eps, bc1, bc2_sqrt, threads)


class Plateau:
    """torch's ReduceLROnPlateau (mode min, relative threshold, no cooldown) over a `kernels.Adam`: the lr of every
    group times `factor` once the loss has not improved by `threshold` (relative) for more than `patience` steps,
    never below `min_lr`."""

    def __init__(self, optimiser: Adam, patience: int = 10, factor: float = 0.1, min_lr: float = 0.0,
                 threshold: float = 1e-4, eps: float = 1e-8):
        self.optimiser, self.patience, self.factor, self.min_lr = optimiser, patience, factor, min_lr
        self.threshold, self.eps = threshold, eps
        self.best, self.bad = float("inf"), 0

    def step(self, loss: float) -> None:
        if loss < self.best * (1 - self.threshold):
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
        if self.bad > self.patience:
            for group in self.optimiser.param_groups:
                new = max(group["lr"] * self.factor, self.min_lr)
                if group["lr"] - new > self.eps:
                    group["lr"] = new
            self.bad = 0


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


def sqdist_grad_(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor, coef: float) -> float:
    """grad += coef (a - b), in place; returns Σ (a - b)²: a squared-distance term and its gradient in one pass."""
    if _native(a, b, grad):
        return library().ptq_sqdist_grad(a.data_ptr(), b.data_ptr(), grad.data_ptr(), a.numel(), coef,
                                          torch.get_num_threads())
    d = a - b
    grad.add_(d, alpha=coef)
    return float((d.double() * d.double()).sum())


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
