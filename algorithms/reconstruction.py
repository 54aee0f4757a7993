"""What the reconstruction methods share: their config, and the run — prepare, calibrate, partition, reconstruct.

A method is its phases (`phases()`: which variables learn, with which drop rule, for how long) and a list of
parts (`parts()`): the pieces the published methods add to plain block reconstruction — PD-Quant's prediction
difference and distribution correction, MRECG's unit grouping, PTMQ's multi-bit activations, a user's own loss
term. A part may change the prepared model, calibrate it, cut it into units, add engine hooks and evaluations;
the run below asks each one. `compose` (algorithms/compose.py) takes the parts from YAML, and the named methods
are fixed choices of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional

import torch
from tqdm import tqdm

from ptqkit import distributed, precision
from ptqkit.algorithms import progress
from ptqkit.algorithms.base import Algorithm, AlgorithmConfig, RunContext
from ptqkit.algorithms.engine import NO_DROP, CompositeHooks, DropRule, Engine, EngineSettings, Hooks, Phase
from ptqkit.algorithms.units import GRANULARITIES, Unit, describe_units, partition
from ptqkit.quant import prepare as pq
from ptqkit.schema import spec

DEFAULT_ROUND_WEIGHT = 0.01   # λ of the ResNet/RegNet references; other architectures set theirs in configs/_base_/models


@dataclass
class ReconstructionConfig(AlgorithmConfig):
    iters: int = spec(20000, lo=1, doc="iterations per unit")
    batch_size: int = spec(32, lo=1, doc="images per iteration, drawn at random from the calibration images")
    batch_draw: str = spec("random", choices=("random", "fixed"),
                           doc="random = batch_size images drawn anew each iteration (the BRECQ / QDrop code); "
                               "fixed = one of the consecutive batches of batch_size images, drawn each iteration "
                               "by numpy's global generator (MQBench's loop, which learns on its calibration "
                               "batches as they are: on one numpy seed both draw the same batches)")
    weight: Optional[float] = spec(None, lo=0.0, doc="rounding regulariser λ; null = the model's "
                                                     "algorithm_defaults, else 0.01 (MobileNetV2 0.1 and MNasNet "
                                                     "0.2 in configs/_base_/models)")
    w_lr: float = spec(1e-3, lo=0.0, doc="Adam learning rate of the rounding variables V")
    a_lr: float = spec(4e-5, lo=0.0, doc="Adam learning rate of the activation step sizes (cosine to 0)")
    warmup: float = spec(0.2, lo=0.0, hi=1.0, doc="share of iterations without the rounding regulariser")
    beta_start: float = spec(20.0, lo=0.0)
    beta_end: float = spec(2.0, lo=0.0)
    rec_p: float = spec(2.0, lo=1.0, hi=4.0, doc="norm of the reconstruction loss")
    granularity: str = spec("block", choices=GRANULARITIES)
    act_init_images: int = spec(256, lo=0, doc="re-observe each unit's activation ranges on this many of its "
                                               "cached inputs before learning (0 = keep the global calibration)")
    cache_device: str = spec("auto", choices=("auto", "cpu"), doc="where cached unit inputs/targets live")
    cache_dtype: str = spec("float32", choices=("float32", "float16"))
    log_every: int = spec(100, lo=1, doc="loss history resolution (iterations)")

    def finalize(self, cfg) -> None:
        if self.weight is None:
            self.weight = DEFAULT_ROUND_WEIGHT


@dataclass
class Partition:
    """A method's reconstruction units, with what it wants recorded about how they were chosen."""
    units: list[Unit]
    record: dict = field(default_factory=dict)        # merged into results.json's algorithm_results
    members: Optional[list[list[int]]] = None         # per unit, the indices of the block units it groups
    notes: str = ""                                   # printed by a dry run above the unit table


class Part:
    """One combinable piece of a reconstruction method. Every method here has a default that does nothing."""
    name = "part"
    multi_process = True          # runs under torchrun (shown by a test)

    def phase(self, phase: Phase) -> Phase:
        """The phase as this part needs it (PTMQ initialises activation steps itself)."""
        return phase

    def prepare(self, qmodel, layout: pq.QuantLayout, ctx: RunContext) -> None:
        """Change the prepared model before calibration (e.g. multi-bit activation quantizers)."""

    def calibrate(self, qmodel, ctx: RunContext, batch: int) -> bool:
        """Calibrate the model itself; False leaves it to the method."""
        return False

    def partition(self, method: "Reconstruction", qmodel, ctx: RunContext) -> Optional[Partition]:
        """The units, when this part groups them (None: the method's granularity)."""
        return None

    def needs_calibrated_plan(self) -> bool:
        """Whether `partition` needs calibrated ranges (a dry run then calibrates)."""
        return False

    def unit_kind(self, method: "Reconstruction") -> Optional[str]:
        return None

    def hooks(self, qmodel, units: list[Unit], ctx: RunContext, method: "Reconstruction") -> Optional[Hooks]:
        return None

    def extra_evaluations(self, ctx: RunContext, qmodel, evaluate: Callable) -> Optional[dict]:
        return None

    def notes(self, qmodel) -> str:
        return ""


# --------------------------------------------------------------------------------- what learns when
# The learning schedules the published methods are made of, each written once: the named methods pick one
# (QDrop joint or weights_first, BRECQ two_stage, AdaRound rounding, MQBench's BRECQ joint without drop) and
# `compose` picks any by its `learn` key, so a change to a schedule reaches every method that uses it.
def joint(method: "Reconstruction", name: str, drop: DropRule) -> list[Phase]:
    """Rounding and activation steps learn together, activations quantized (QDrop, MQBench's BRECQ, PD-Quant)."""
    return [method.base_phase(name, learn_rounding=True, learn_act_scale=True, quant_acts=True, drop=drop)]


def weights_first(method: "Reconstruction", name: str, drop: DropRule) -> list[Phase]:
    """Rounding with the steps fixed, then the steps with the rounding fixed (same iterations each)."""
    return [method.base_phase(f"{name}-weights", learn_rounding=True, learn_act_scale=False, drop=drop),
            method.base_phase(f"{name}-acts", learn_rounding=False, learn_act_scale=True, act_init_images=0,
                              drop=drop)]


def two_stage(method: "Reconstruction", name: str, drop: DropRule) -> list[Phase]:
    """BRECQ as published: rounding with activations in FP, then the steps (`act_iters`, `act_lr`, `act_p`)."""
    p = method.params
    stages = [method.base_phase(f"{name}-weights", learn_rounding=True, learn_act_scale=False, quant_acts=False,
                                act_init_images=0, drop=drop)]
    if p.act_iters > 0:
        stages.append(method.base_phase(f"{name}-acts", iters=p.act_iters, learn_rounding=False,
                                        learn_act_scale=True, quant_acts=True, a_lr=p.act_lr, rec_p=p.act_p,
                                        drop=drop))
    return stages


def rounding(method: "Reconstruction", name: str, drop: DropRule) -> list[Phase]:
    """AdaRound: rounding only, activations in FP while it learns."""
    return [method.base_phase(name, learn_rounding=True, learn_act_scale=False, quant_acts=False,
                              act_init_images=0, drop=drop)]


def rounding_fixed_acts(method: "Reconstruction", name: str, drop: DropRule) -> list[Phase]:
    """Rounding only, activations quantized at their calibrated steps (MQBench's AdaRound)."""
    return [method.base_phase(name, learn_rounding=True, learn_act_scale=False, quant_acts=True,
                              act_init_images=0, drop=drop)]


LEARN_MODES: dict[str, Callable[["Reconstruction", str, DropRule], list[Phase]]] = {
    "joint": joint, "weights_first": weights_first, "two_stage": two_stage, "rounding": rounding,
    "rounding_fixed_acts": rounding_fixed_acts}


class Reconstruction(Algorithm):
    Config = ReconstructionConfig
    multi_process = True

    # ----------------------------------------------------------------------- what a method may override
    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def make_parts(self) -> list[Part]:
        """The parts this method adds to block reconstruction (from its config alone)."""
        return []

    @classmethod
    def inherited_defaults(cls) -> dict:
        """Settings the method runs with that are not keys of its own config (a method built on another, as
        MRECG on QDrop, runs with its base's): what `compose` presets take besides the method's own keys."""
        return {}

    # ------------------------------------------------------------------------------------- shared parts
    @cached_property
    def parts(self) -> list[Part]:
        return self.make_parts()

    def runs_multi_process(self) -> bool:
        return type(self).multi_process and all(part.multi_process for part in self.parts)

    def run_phases(self) -> list[Phase]:
        """`phases()` as the parts need them."""
        phases = self.phases()
        for part in self.parts:
            phases = [part.phase(ph) for ph in phases]
        return phases

    def prepare(self, ctx: RunContext):
        qmodel, layout = super().prepare(ctx)
        for part in self.parts:
            part.prepare(qmodel, layout, ctx)
        return qmodel, layout

    def partition(self, qmodel, ctx: RunContext) -> Partition:
        """The units: a grouping part's, else the configured granularity's."""
        for part in self.parts:
            plan = part.partition(self, qmodel, ctx)
            if plan is not None:
                return plan
        return Partition(self.block_units(qmodel, ctx))

    def hooks(self, qmodel, units: list[Unit], ctx: RunContext) -> Hooks:
        hooks = [h for part in self.parts if (h := part.hooks(qmodel, units, ctx, self)) is not None]
        return hooks[0] if len(hooks) == 1 else CompositeHooks(hooks)

    def notes(self, qmodel) -> str:
        """What a dry run prints after the unit table."""
        return "\n".join(n for part in self.parts if (n := part.notes(qmodel)))

    def unit_kind(self) -> str:
        """How a dry run names the units in its table's heading."""
        kinds = [k for part in self.parts if (k := part.unit_kind(self))]
        return kinds[0] if kinds else self.params.granularity

    def extra_evaluations(self, ctx: RunContext, qmodel, evaluate) -> Optional[dict]:
        out = {}
        for part in self.parts:
            out.update(part.extra_evaluations(ctx, qmodel, evaluate) or {})
        return out or None

    def units(self, qmodel, ctx: RunContext) -> list[Unit]:
        """The units this method reconstructs (its partition's)."""
        return self.partition(qmodel, ctx).units

    def block_units(self, qmodel, ctx: RunContext) -> list[Unit]:
        """The units at the configured granularity, before any grouping."""
        return partition(qmodel, ctx.fp_model, self.params.granularity, ctx.calib_images[:1].to(ctx.device))

    def base_phase(self, name: Optional[str] = None, **overrides) -> Phase:
        """A phase with the method's shared settings; named after the method unless told otherwise."""
        p = self.params
        values = dict(name=name or self.name, iters=p.iters, w_lr=p.w_lr, a_lr=p.a_lr, round_weight=p.weight,
                      warmup=p.warmup, beta_start=p.beta_start, beta_end=p.beta_end, rec_p=p.rec_p,
                      act_init_images=p.act_init_images)
        values.update(overrides)
        return Phase(**values)

    def calibrated_model(self, ctx: RunContext, phases: list[Phase]):
        qmodel, _ = self.prepare(ctx)
        batch = ctx.cfg.data.calibration.batch_size
        images = None                     # what the activation ranges were observed on, if observed here
        if ctx.prepared is not None:      # calibrated already (MQBench's flow): only a part's own calibration
            any(part.calibrate(qmodel, ctx, batch) for part in self.parts)
        elif not any(part.calibrate(qmodel, ctx, batch) for part in self.parts):
            images = ctx.calib_images
            act_phases = [ph for ph in phases if ph.quant_acts]
            if act_phases and act_phases[0].act_init_images > 0:
                # Every activation quantizer belongs to a unit and is re-observed on that unit's own inputs before
                # activations are first quantized: observing them on all images here would be thrown away.
                images = images[:batch]
            with tqdm(total=len(images), desc="calibrate", unit="img", disable=not ctx.show_progress) as bar:
                pq.calibrate(qmodel, images, batch, ctx.device, bar)
        self.after_calibration(qmodel, ctx, images)
        return qmodel

    def model_for_plan(self, ctx: RunContext):
        """The model a dry run partitions (a part whose partition needs calibrated ranges gets it calibrated)."""
        if any(part.needs_calibrated_plan() for part in self.parts):
            return self.calibrated_model(ctx, self.run_phases())
        return self.prepare(ctx)[0]

    def describe(self, ctx: RunContext) -> str:
        qmodel = self.model_for_plan(ctx)
        plan = self.partition(qmodel, ctx)
        text = (plan.notes + "\n" if plan.notes else "") + \
            f"{len(plan.units)} reconstruction units ({self.unit_kind()}):\n" + describe_units(plan.units)
        notes = self.notes(qmodel)
        return text + ("\n" + notes if notes else "")

    def engine_settings(self, ctx: RunContext) -> EngineSettings:
        p = self.params
        return EngineSettings(batch_size=p.batch_size, batch_draw=p.batch_draw, cache_device=p.cache_device,
                              cache_dtype=getattr(torch, p.cache_dtype), log_every=p.log_every,
                              show_progress=ctx.show_progress, retain_cpu_heap=ctx.cfg.runtime.retain_cpu_heap,
                              compute_dtype=precision.dtype_of(ctx.cfg.runtime.compute_dtype))

    def run(self, ctx: RunContext):
        phases = self.run_phases()
        qmodel = self.calibrated_model(ctx, phases)
        plan = self.partition(qmodel, ctx)
        units = plan.units
        hooks = self.hooks(qmodel, units, ctx)
        # several processes: each caches and draws from its own calibration batches only
        images = distributed.shard_batches(ctx.calib_images, ctx.cfg.data.calibration.batch_size)
        engine = Engine(qmodel, units, images, ctx.device, self.engine_settings(ctx), hooks)
        phase_names, unit_names = [ph.name for ph in phases], [u.name for u in units]
        after = (-1, -1)
        if ctx.resume is not None:
            after = progress.restore_progress(ctx.resume, qmodel, phase_names, unit_names)
            engine.history = list(ctx.resume["history"])
            ctx.log.info("resuming after unit %s of phase %s (%d of %d units done)", unit_names[after[1]],
                         phase_names[after[0]], len(engine.history), len(units) * len(phases))
        on_unit_done = None
        if ctx.run_dir is not None and distributed.is_main():
            path = progress.progress_path(ctx.run_dir)

            def on_unit_done(p: int, k: int) -> None:
                progress.save_progress(path, qmodel, p, k, phase_names, unit_names, engine.history)
        history = engine.run(phases, after, on_unit_done)
        if plan.members is not None:
            for record in history:
                record["members"] = plan.members[record["index"]]
        ctx.results["units"] = history
        ctx.results["unit_names"] = unit_names
        ctx.results.update(plan.record)
        ctx.results.update(hooks.results())
        return qmodel
