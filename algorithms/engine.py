"""The one reconstruction engine. It knows no method by name: methods hand it phases, units and loss hooks.

For each phase, units are reconstructed in order. Unit k sees inputs from the model whose units 0..k-1 are
already quantized (weights hard-rounded, activations at their learned steps) and full-precision targets. Its
rounding variables V and/or activation step sizes s minimise, over T iterations on random batches of the cached
calibration inputs,

    L = || f_q(x_mix) - f_fp(x_fp) ||_p^p  (summed over channels, averaged over batch and positions)
        + λ · Σ_i (1 - |2 h(V_i) - 1|^β)      (off for the first `warmup` · T iterations)
        + Σ method terms                       (e.g. PD-Quant's prediction difference)

with h the rectified sigmoid, β falling linearly from `beta_start` to `beta_end` after warm-up, and the unit input
x_mix = where(u < input_prob, x_q, x_fp) element-wise; inside the unit each activation quantizer keeps
quantization per element with probability `keep_prob` (the phase's `DropRule`: QDrop's, or none). V learns with
Adam (`w_lr`), s with Adam (`a_lr`) under a cosine decay to 0 (not the steps of the network input's own
quantizers, which keep their calibration as in MQBench: a unit learns what it produces, and the first unit does
not produce its images). At the end of a unit the rounding is made hard and written into the weights.

A method may replace the first term (`Hooks.reconstruction`, e.g. PTMQ's loss over several bit-widths) and add
the others (`Hooks.extra_loss`); the rounding regulariser and the schedules stay the engine's.

Memory: only the current unit's cached inputs and targets are held (on `cache_device`, in `cache_dtype`); for a
chain of units the next unit's inputs are produced from the current unit's cache, so no unit re-runs the network.
Each unit's record holds the process's resident memory (and its own CUDA peak) at its end, so growth from unit to
unit shows; `cuda_run_peak_mb` is the peak over the whole run. A cache held on the CPU for a CUDA model is read
through pinned memory (`kernels.gather_rows`).

Host and device: the iterations read nothing back from the device but at every `log_every`-th (and the last):
the loss history and the non-finite check happen there (`hostsync.log_point`); tests/test_host_sync.py and
`python -m ptqkit.tools.gpu_check` hold every method to it.

Precision: with `compute_dtype` bfloat16 (runtime.compute_dtype) each iteration's unit forward and the method's
loss terms run under autocast (`ptqkit.precision.autocast`), and the backward in the dtypes they ran in; the
soft rounding and its regulariser are computed before autocast is entered, the fake quantizers compute in float32,
the losses reduce in float32, and V, the steps and Adam's state never leave float32. Caching, range
initialisation and the unit errors run outside the loop, in float32.

Resume: `run(..., after=(phase, unit), on_unit_done=...)` skips every unit up to and including `after` and calls
`on_unit_done(phase, unit)` when a unit is finished (the caller saves what it needs there). A unit whose
predecessor was skipped gets its inputs from the network, not from the chain: the same operations on the same
values, so a resumed fp32-cached run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from tqdm import tqdm

from ptqkit import distributed, precision
from ptqkit.algorithms import heap
from ptqkit.algorithms.graph import prefix_module, unit_module
from ptqkit.algorithms.units import Unit
from ptqkit.errors import NumericalError, UserError
from ptqkit.quant import hostsync, kernels
from ptqkit.quant.state import fp_biases
from ptqkit.quant.quantizers import (ActQuantizer, LearnedRounding, act_quantizers, keep_probability, quant_state,
                                     reset_observer)

log = logging.getLogger(__name__)


def gather(cached: torch.Tensor, idx: torch.Tensor, device) -> torch.Tensor:
    """Rows `idx` of a cached tensor, as float32 on `device` (through pinned memory from a CPU cache to a GPU)."""
    return kernels.gather_rows(cached, idx, device)


# The CUDA peak over a whole run. The engine resets torch's peak counter at every unit, so that each unit's record
# holds its own peak; what the counter held before each reset is folded in here first.
_cuda_peak = {"mb": 0.0}


def reset_cuda_run_peak(device=None) -> None:
    """Start a run's peak afresh (the pipeline, at the start of every run in the process)."""
    _cuda_peak["mb"] = 0.0
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak_now_mb(device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)


def _reset_cuda_peak(device) -> None:
    """torch's peak counter back to the current allocation, after folding the peak so far into the run's."""
    _cuda_peak["mb"] = max(_cuda_peak["mb"], _cuda_peak_now_mb(device))
    torch.cuda.reset_peak_memory_stats(device)


def cuda_run_peak_mb(device) -> float:
    """Largest CUDA allocation since `reset_cuda_run_peak`, across the engine's per-unit resets."""
    return max(_cuda_peak["mb"], _cuda_peak_now_mb(device))


@dataclass(frozen=True)
class DropRule:
    """What a unit sees of quantization while it learns (QDrop, Wei et al. 2022): each activation quantizer inside
    the unit keeps an element quantized with probability `keep_prob` (else passes it in full precision), and each
    element of the unit's input comes from the partly quantized network with probability `input_prob` (else from
    the FP network). The default is no drop: AdaRound's and BRECQ's phases. A method picks one per phase."""
    keep_prob: float = 1.0
    input_prob: float = 1.0

    def unit_input(self, quantized: torch.Tensor, fp: torch.Tensor, idx: torch.Tensor, device) -> torch.Tensor:
        """One batch (`idx`) of the unit's input from the two cached inputs, mixed element-wise."""
        if self.input_prob >= 1.0 or quantized is fp:
            return gather(quantized, idx, device)
        return kernels.mix_rows(quantized, fp, idx, self.input_prob, device)

    def inside(self, quantizers: list[ActQuantizer]):
        """Inside: the unit's activation quantizers keep elements quantized with `keep_prob` (restored after)."""
        return keep_probability(quantizers, self.keep_prob)


NO_DROP = DropRule()


@dataclass
class Phase:
    """One pass of reconstruction over all units."""
    name: str
    iters: int
    learn_rounding: bool = True
    learn_act_scale: bool = True
    quant_acts: bool = True           # activation quantizers on, upstream and inside the unit
    drop: DropRule = NO_DROP
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    round_weight: float = 0.01        # λ
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    rec_p: float = 2.0
    act_init_images: int = 0          # re-initialise the unit's activation steps on this many cached inputs


@dataclass
class EngineSettings:
    batch_size: int = 32
    batch_draw: str = "random"        # random | fixed (ReconstructionConfig.batch_draw)
    cache_device: str = "auto"        # auto (= compute device) | cpu
    cache_dtype: torch.dtype = torch.float32
    log_every: int = 100
    show_progress: bool = True
    retain_cpu_heap: bool = True      # algorithms/heap.py: reuse freed CPU memory instead of page-faulting it back
    compute_dtype: torch.dtype = torch.float32   # the loop's forward and backward (runtime.compute_dtype)

    @property
    def eval_batch(self) -> int:
        """Images per forward pass where nothing learns (caching, range init, unit errors)."""
        return max(self.batch_size, 64)


@dataclass
class UnitCache:
    q_in: torch.Tensor                # input from the partly quantized model
    fp_in: torch.Tensor               # input from the full-precision model
    fp_out: torch.Tensor              # full-precision target


class Batch:
    """One iteration's images: `idx` into the unit's cache, the FP `target`, and the unit input as the phase's drop
    rule mixes it (`q_in`), made only when a method asks for it (PTMQ mixes its own, one per bit-width)."""

    def __init__(self, cache: UnitCache, idx: torch.Tensor, phase: "Phase", device):
        self.cache, self.idx, self.device, self.phase = cache, idx, device, phase
        self.target = gather(cache.fp_out, idx, device)
        self._q_in: Optional[torch.Tensor] = None

    @property
    def q_in(self) -> torch.Tensor:
        if self._q_in is None:
            self._q_in = self.phase.drop.unit_input(self.cache.q_in, self.cache.fp_in, self.idx, self.device)
        return self._q_in

    @property
    def fp_in(self) -> torch.Tensor:
        return gather(self.cache.fp_in, self.idx, self.device)

    @property
    def quantized_in(self) -> torch.Tensor:
        """The partly quantized network's input, unmixed."""
        return gather(self.cache.q_in, self.idx, self.device)


class Hooks:
    """What a method may add to the engine's loop. The default adds nothing."""

    def unit_start(self, unit: Unit, module: fx.GraphModule, cache: UnitCache, phase: Phase) -> UnitCache:
        return cache

    def reconstruction(self, unit: Unit, module: fx.GraphModule, batch: Batch, it: int,
                       phase: Phase) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The unit's output on one batch and its reconstruction term. A method replaces it when its term needs
        more than one run of the unit (PTMQ: one per bit-width). The dict holds parts of the term, logged but not
        added again."""
        out = module(batch.q_in)
        return out, reconstruction_loss(out, batch.target, phase.rec_p), {}

    def extra_loss(self, unit: Unit, out_q: torch.Tensor, batch: Batch, it: int,
                   phase: Phase) -> dict[str, torch.Tensor]:
        """Terms added to the loss (each logged under its name)."""
        return {}

    def unit_end(self, unit: Unit) -> None:
        pass

    def results(self) -> dict:
        """What the method adds to results.json's algorithm_results once every unit is done."""
        return {}


class CompositeHooks(Hooks):
    """Several parts' hooks on one loop, in order: each `unit_start` gets the cache the previous one returned,
    the extra loss terms are merged (their names must differ), at most one part computes the reconstruction term,
    and the results are merged."""

    def __init__(self, parts: list[Hooks]):
        self.parts = list(parts)
        own = [h for h in self.parts if type(h).reconstruction is not Hooks.reconstruction]
        if len(own) > 1:
            raise ValueError("two parts compute the reconstruction term: " + ", ".join(type(h).__name__ for h in own))
        self._reconstruction = own[0] if own else None

    def unit_start(self, unit, module, cache, phase):
        for h in self.parts:
            cache = h.unit_start(unit, module, cache, phase)
        return cache

    def reconstruction(self, unit, module, batch, it, phase):
        if self._reconstruction is not None:
            return self._reconstruction.reconstruction(unit, module, batch, it, phase)
        return super().reconstruction(unit, module, batch, it, phase)

    def extra_loss(self, unit, out_q, batch, it, phase):
        terms: dict[str, torch.Tensor] = {}
        for h in self.parts:
            for name, value in h.extra_loss(unit, out_q, batch, it, phase).items():
                if name in terms:
                    raise ValueError(f"two parts add a loss term named {name!r}")
                terms[name] = value
        return terms

    def unit_end(self, unit):
        for h in self.parts:
            h.unit_end(unit)

    def results(self):
        out: dict = {}
        for h in self.parts:
            out.update(h.results())
        return out


def regularised(it: int, phase: Phase) -> bool:
    """Whether iteration `it` (from 0) carries the rounding regulariser. The reference code (AdaRound's
    LossFunction in BRECQ, QDrop and MQBench) counts iterations from 1 and starts it at count warmup · iters, so
    at iteration warmup · iters − 1 here; one iteration matters to the drop-in matching MQBench's loop exactly."""
    return it + 1 >= phase.warmup * phase.iters


def beta_at(it: int, phase: Phase) -> float:
    """β at iteration `it` (from 0): the reference's LinearTempDecay at count it + 1, so the last iteration has
    beta_end."""
    t, start = it + 1, phase.warmup * phase.iters
    if t < start:
        return phase.beta_start
    rel = (t - start) / max(phase.iters - start, 1)
    return phase.beta_end + (phase.beta_start - phase.beta_end) * max(0.0, 1.0 - rel)


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    # reduced in float32 whatever the unit computed in (runtime.compute_dtype)
    diff = precision.float32(out) - precision.float32(target)
    # p = 2 without abs: the same values and gradients bit for bit, three fewer passes over the tensor backward
    err = diff.square() if p == 2.0 else diff.abs().pow(p)
    return err.sum(1).mean()


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """Only what the engine asks for learns; the network's own weights never get gradients."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def phase_state(gm: fx.GraphModule, phase: Phase):
    """Weights quantized; activations quantized or not as the phase says; observers off. Restored after."""
    acts = act_quantizers(gm)
    with quant_state(gm, observe=False, quantize=True), quant_state(gm, only=acts, quantize=phase.quant_acts):
        yield


@torch.no_grad()
def init_act_steps(module: fx.GraphModule, unit: Unit, cache: UnitCache, n_images: int, batch: int, device):
    """Re-observe the unit's activation ranges on its own cached (quantized-model) inputs."""
    quantizers = unit.act_quantizers
    if not quantizers or n_images <= 0:
        return
    for q in quantizers:
        reset_observer(q)
    # Observe everything first (fake quant off), then compute the step: MQBench fake quantizers update their
    # scale from the observer at every observed forward.
    # Several processes: every one observes the same images (its share of the first n, gathered), so all start
    # the unit from the same steps.
    world = distributed.world_size()
    inputs = distributed.gather(cache.q_in[:math.ceil(n_images / world)].to(device)) if world > 1 else cache.q_in
    with quant_state(module, only=quantizers, observe=True, quantize=False):
        for start in range(0, min(n_images, len(inputs)), batch):
            module(inputs[start:start + batch].to(device, torch.float32))


def resident_memory_mb() -> float:
    """Current (not peak) resident set size of this process: what a growing cache would show."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):  # not Linux
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextlib.contextmanager
def oom_hint(unit: Unit, n_images: int, settings: "EngineSettings"):
    """CUDA running out of memory while caching is a setting to change, not a bug: say which one."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"CUDA out of memory while caching the inputs and targets of unit {unit.name} ({n_images} images, "
            f"cache on {settings.cache_device}, {str(settings.cache_dtype).replace('torch.', '')}): set "
            "algorithm.cache_device=cpu and/or algorithm.cache_dtype=float16, or use fewer calibration "
            "images") from None


@torch.no_grad()
def run_batched(module: nn.Module, inputs: torch.Tensor, batch: int, device, store_device, dtype):
    outs = []
    for start in range(0, len(inputs), batch):
        out = module(inputs[start:start + batch].to(device, torch.float32))
        outs.append(out.to(store_device, dtype))
    return torch.cat(outs)


@torch.no_grad()
def prefix_values(gm, nodes, images, batch, device, store_device, dtype) -> list[torch.Tensor]:
    prefix = prefix_module(gm, nodes)
    outs: list[list[torch.Tensor]] = [[] for _ in nodes]
    for start in range(0, len(images), batch):
        values = prefix(images[start:start + batch].to(device))
        for lst, v in zip(outs, values):
            lst.append(v.to(store_device, dtype))
    return [torch.cat(lst) for lst in outs]


@dataclass
class Learner:
    """What learns in one unit and how: the rounding of its weights (`LearnedRounding`, Adam `w_lr`) and its
    activation step sizes (Adam `a_lr`, cosine decay to 0), in one optimiser with a group each."""
    rounding: Optional[LearnedRounding]
    a_params: list[torch.Tensor]
    optimiser: Optional[torch.optim.Optimizer]       # kernels.adam: torch's fused Adam, or fakequant.c's on CPU

    @classmethod
    def start(cls, unit: Unit, phase: Phase) -> "Learner":
        rounding = LearnedRounding(unit.weight_quantizers) if phase.learn_rounding else None
        if rounding is not None and not len(rounding):
            rounding = None
        a_params = []
        if phase.learn_act_scale and phase.quant_acts:
            frozen = unit.input_quantizers
            for q in unit.act_quantizers:
                if any(q is f for f in frozen):
                    continue
                for step in q.step_parameters():
                    step.requires_grad_(True)
                    a_params.append(step)
        groups = [{"params": [rounding.alpha], "lr": phase.w_lr}] if rounding is not None else []
        groups += [{"params": a_params, "lr": phase.a_lr, "cosine": phase.a_lr}] if a_params else []
        return cls(rounding, a_params, kernels.adam(groups) if groups else None)

    @property
    def params(self) -> list[torch.Tensor]:
        return ([self.rounding.alpha] if self.rounding is not None else []) + self.a_params

    @contextlib.contextmanager
    def applied(self, phase: Phase, it: int):
        """Inside: the unit computes with this iteration's soft-rounded weights. Yields the weighted rounding
        regulariser λ Σ (1 − |2 h(V) − 1|^β), or None (nothing to round, or still warming up)."""
        if self.rounding is None:
            yield None
            return
        beta = beta_at(it, phase) if regularised(it, phase) else None
        with self.rounding.installed(beta) as penalty:
            yield None if penalty is None else phase.round_weight * penalty

    def step(self, loss: torch.Tensor, it: int, phase: Phase) -> None:
        opt = self.optimiser
        opt.zero_grad()
        loss.backward()
        distributed.average_gradients(self.params)
        for group in opt.param_groups:
            if "cosine" in group:   # CosineAnnealingLR(T_max=iters, eta_min=0), in closed form
                group["lr"] = group["cosine"] * (1 + math.cos(math.pi * it / phase.iters)) / 2
        opt.step()

    def finish(self) -> None:
        """Steps stop learning; learned rounding is made hard and written into the weights."""
        for p in self.a_params:
            p.requires_grad_(False)
        if self.rounding is not None:
            self.rounding.harden()


class Engine:
    def __init__(self, gm: fx.GraphModule, units: list[Unit], images: torch.Tensor, device: torch.device,
                 settings: EngineSettings, hooks: Optional[Hooks] = None):
        self.gm, self.units, self.images, self.device = gm, units, images, device
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.store = device if settings.cache_device == "auto" else torch.device(settings.cache_device)
        self.history: list[dict] = []
        # Hardening writes rounded weights into the layers, so "quantizers off" alone is no longer the FP network
        # once a unit is done: FP inputs of a unit not fed by the chain, and FP targets of a later phase, are
        # computed with these original weights swapped in (build the engine before loading resumed state).
        self._fp_weights = {layer: layer.weight.detach().clone() for u in units for layer, _ in u.weight_quantizers}

    @contextlib.contextmanager
    def full_precision(self):
        """Every quantizer off and the original weights in place; the hard-rounded ones come back after."""
        current = [(layer, layer.weight.data) for layer in self._fp_weights]
        try:
            for layer, weight in self._fp_weights.items():
                layer.weight.data = weight
            with quant_state(self.gm, observe=False, quantize=False), fp_biases(self.gm):
                yield
        finally:
            for layer, weight in current:
                layer.weight.data = weight

    # ------------------------------------------------------------------------------------------ caching
    def _cache_for(self, k: int, phase: Phase, carried: Optional[UnitCache], module: fx.GraphModule) -> UnitCache:
        unit, s = self.units[k], self.settings
        with oom_hint(unit, len(self.images), s):
            return self._cache(unit, carried, module, phase)

    def _cache(self, unit: Unit, carried: Optional[UnitCache], module: fx.GraphModule, phase: Phase) -> UnitCache:
        s = self.settings
        bs = s.eval_batch
        if carried is None and unit.input.op == "placeholder":
            # The network input: quantized and FP inputs are the same images, held once.
            q_in = fp_in = self.images.to(self.store, s.cache_dtype)
        elif carried is None:
            # No chain to follow (first unit, or layer units inside a block): run the network up to the input.
            with phase_state(self.gm, phase):
                (q_in,) = prefix_values(self.gm, [unit.input], self.images, bs, self.device, self.store,
                                         s.cache_dtype)
            with self.full_precision():
                (fp_in,) = prefix_values(self.gm, [unit.input], self.images, bs, self.device, self.store,
                                          s.cache_dtype)
        else:
            q_in, fp_in = carried.q_in, carried.fp_in
        with self.full_precision():
            fp_out = run_batched(module, fp_in, bs, self.device, self.store, s.cache_dtype)
        return UnitCache(q_in, fp_in, fp_out)

    def _carry(self, k: int, cache: UnitCache, module: fx.GraphModule, phase: Phase) -> Optional[UnitCache]:
        """Inputs of unit k+1 from unit k's cache, when unit k+1 starts where unit k ends."""
        if k + 1 >= len(self.units) or self.units[k + 1].input is not self.units[k].output:
            return None
        bs = self.settings.eval_batch
        with oom_hint(self.units[k + 1], len(cache.q_in), self.settings), phase_state(self.gm, phase):
            q_next = run_batched(module, cache.q_in, bs, self.device, self.store, self.settings.cache_dtype)
        return UnitCache(q_next, cache.fp_out, None)

    # ----------------------------------------------------------------------------------- optimisation
    def run(self, phases: list[Phase], after: tuple[int, int] = (-1, -1),
            on_unit_done: Optional[Callable[[int, int], None]] = None) -> list[dict]:
        retain = self.settings.retain_cpu_heap and self.device.type == "cpu"
        with frozen_parameters(self.gm), heap.retained_heap(retain):
            for p, phase in enumerate(phases):
                carried = None
                for k, unit in enumerate(self.units):
                    if (p, k) <= after:
                        continue
                    module = unit_module(self.gm, unit)
                    if self.device.type == "cuda":   # each unit's record holds its own peak
                        _reset_cuda_peak(self.device)
                    compiled = kernels.compile_stats()
                    cache = self._cache_for(k, phase, carried, module)
                    carried = None
                    record = self._optimise(unit, module, cache, phase)
                    record.update(phase=phase.name, index=k)
                    self.history.append(record)
                    carried = self._carry(k, cache, module, phase)
                    del cache
                    heap.trim()
                    record["rss_mb"] = resident_memory_mb()
                    if self.device.type == "cuda":
                        record["cuda_peak_mb"] = _cuda_peak_now_mb(self.device)
                    if kernels.implementation(self.device) == "compiled":
                        # graphs and kernels torch.compile made during this unit: none after the first unit, the
                        # tensors' sizes being dynamic
                        now = kernels.compile_stats()
                        record["compiled"] = {key: now[key] - compiled[key] for key in now}
                    if on_unit_done is not None:
                        on_unit_done(p, k)
        return self.history

    def _optimise(self, unit: Unit, module: fx.GraphModule, cache: UnitCache, phase: Phase) -> dict:
        start_time = time.perf_counter()
        if unit.iters_scale != 1:   # a merged group may learn for as many iterations as its members together
            phase = dataclasses.replace(phase, iters=phase.iters * unit.iters_scale)
        network_cache, cache = cache, self.hooks.unit_start(unit, module, cache, phase)
        if phase.quant_acts and phase.act_init_images > 0:
            init_act_steps(module, unit, cache, phase.act_init_images, self.settings.eval_batch, self.device)
        # The unit's error before it learns (nearest rounding, the steps it starts from), on the same images and
        # without drop, so that before and after compare: the loop's own first and last losses are on different
        # random batches, with soft rounding, and cannot say what reconstruction gained.
        before = self.unit_error(module, network_cache, phase)
        learner = Learner.start(unit, phase)
        loop_start = time.perf_counter()
        hist = self._loop(unit, module, cache, phase, learner)
        loop_seconds = time.perf_counter() - loop_start
        learner.finish()
        # Against the FP network's own output, whatever target the method trained on (PD-Quant's DC replaces it),
        # so that the figure compares across methods; the method's own target gets its figure beside it.
        final = self.unit_error(module, network_cache, phase)
        own = None if cache is network_cache else self.unit_error(module, cache, phase)
        self.hooks.unit_end(unit)
        seconds = time.perf_counter() - start_time
        log.info("%s %-24s error %.5g -> %.5g on its %d calibration inputs (%d it, %.1f s, %.2f ms/it in the loop)",
                 phase.name, unit.name, before, final, len(network_cache.q_in), phase.iters, seconds,
                 1000 * loop_seconds / max(phase.iters, 1))
        # loop_seconds: the iterations alone, without the method's set-up (DC), range init and the final error
        record = {"name": unit.name, "iterations": phase.iters, "initial_rec_loss": before, "final_rec_loss": final,
                  "seconds": round(seconds, 3),
                  "loop_seconds": round(loop_seconds, 3), "history": hist}
        if own is not None:
            record["final_rec_loss_method_target"] = own
        return record

    def _loop(self, unit: Unit, module: fx.GraphModule, cache: UnitCache, phase: Phase, learner: "Learner") -> dict:
        """The iterations. No host sync but every `log_every` iterations: a non-finite loss is remembered on the
        device and reported there, naming its first iteration."""
        s, device = self.settings, self.device
        hist = {"iter": [], "rec": [], "round": [], "total": []}
        if not learner.optimiser:
            return hist
        n = len(cache.q_in)
        # Several processes: each draws its share of the batch from its own images; gradients are averaged.
        world = distributed.world_size()
        batch_size = min(max(1, s.batch_size // world), n)
        losses = torch.empty(phase.iters, device=device)   # checked for non-finite values at each log point
        checked = 0
        bar = tqdm(range(phase.iters), desc=f"{phase.name} {unit.name}", leave=False, disable=not s.show_progress,
                   mininterval=1.0)
        quantizers = unit.act_quantizers if phase.quant_acts else []
        with phase_state(self.gm, phase), phase.drop.inside(quantizers), hostsync.loop():
            for it in bar:
                batch = Batch(cache, self._draw(n, batch_size), phase, device)
                with learner.applied(phase, it) as rnd, precision.autocast(device, s.compute_dtype):
                    out, rec, parts = self.hooks.reconstruction(unit, module, batch, it, phase)
                    extra = self.hooks.extra_loss(unit, out, batch, it, phase)
                loss = rec + sum(extra.values()) if extra else rec
                if rnd is not None:
                    loss = loss + rnd
                losses[it] = loss.detach()
                learner.step(loss, it, phase)
                if it % s.log_every == 0 or it == phase.iters - 1:
                    with hostsync.log_point():
                        self._check_finite(losses[checked:it + 1], checked, it, unit, phase)
                        checked = it + 1
                        values = {"rec": rec, "round": rnd, "total": loss, **parts, **extra}
                        names = [k for k, v in values.items() if v is not None]
                        last = {"round": 0.0, **dict(zip(names, self._read([values[k] for k in names])))}
                        last = {k: last[k] for k in values}      # the history's order: rec, round, total, terms
                        hist["iter"].append(it)
                        for key, value in last.items():
                            hist.setdefault(key, []).append(value)
                        bar.set_postfix(rec=f"{last['rec']:.4g}", round=f"{last['round']:.4g}")
        return hist

    @staticmethod
    def _read(values: list[torch.Tensor]) -> list[float]:
        """The logged scalars in one copy to the host (each as its own dtype's value, as .item() gives it)."""
        return [float(v) for v in torch.stack([v.detach().reshape(()).double() for v in values]).cpu().tolist()]

    def _draw(self, n: int, batch_size: int) -> torch.Tensor:
        if self.settings.batch_draw == "fixed":
            # numpy's global generator, as MQBench's loop (np.random.randint): on one numpy seed, both see the
            # same batches in the same order
            k = int(np.random.randint(0, max(n // batch_size, 1)))
            return torch.arange(k * batch_size, min((k + 1) * batch_size, n))
        return torch.randint(0, n, (batch_size,))

    @staticmethod
    def _check_finite(losses: torch.Tensor, first: int, it: int, unit: Unit, phase: Phase) -> None:
        """Every process stops together, naming the first iteration (over all of them) whose loss was not finite."""
        bad = (~torch.isfinite(losses)).nonzero()
        first_bad = torch.tensor(first + int(bad[0]) if len(bad) else phase.iters, device=losses.device)
        if distributed.world_size() > 1:
            distributed.all_reduce(first_bad, distributed.ReduceOp.MIN)
        k = int(first_bad)
        if k < phase.iters:
            value = f"{losses[k - first].item()}" if first <= k < first + len(losses) else "not finite"
            raise NumericalError(f"unit {unit.name} ({phase.name}) iteration {k}: loss is {value} (found at the "
                                 f"check after iteration {it})")

    @torch.no_grad()
    def unit_error(self, module, cache: UnitCache, phase: Phase) -> float:
        """Mean reconstruction error of the (hardened) unit over all cached inputs, without drop or mixing."""
        total, count = 0.0, 0
        bs = self.settings.eval_batch
        with phase_state(self.gm, phase):
            for start in range(0, len(cache.q_in), bs):
                q_in = cache.q_in[start:start + bs].to(self.device, torch.float32)
                target = cache.fp_out[start:start + bs].to(self.device, torch.float32)
                total += reconstruction_loss(module(q_in), target, 2.0).item() * len(q_in)
                count += len(q_in)
        total, count = distributed.all_reduce(torch.tensor([total, float(count)], dtype=torch.float64)).tolist()
        return total / max(count, 1)
