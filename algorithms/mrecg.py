"""MRECG (Ma et al., CVPR 2023, arXiv 2303.11906): mixed reconstruction granularity on top of QDrop or MQBench's
joint BRECQ. Only the unit grouping differs from the base method: adjacent units whose capacities differ most are
merged and reconstructed together, which removes the loss oscillation across units.

Grouping (`scheme`):
- a list by unit index, e.g. `[0, 1, [2, 3], [4, 5], 6, 7, 8, 9]`: an entry is a unit or a list of consecutive
  units reconstructed together (the released code's hand-written schemes, translated to our unit indices);
- `auto`: the `top_k` adjacent pairs with the largest capacity difference are merged. Two selected pairs that share
  a unit make one group of three.

Module capacity of a unit (`capacity`):
- `params` (data-free, the paper's ModCap): over the unit's weight layers l,

      ModCap = Σ_l α^(s_l − 1) · params(W_l) · b_l

  with params the weight count, b_l its bit-width and s_l its stride (1 for linear layers); α = `stride_alpha`
  < 1 discounts a strided layer, which sees fewer output positions. The released code computes no capacity, so
  α = 0.5 is our choice.
- `loss` (data-dependent): ModCap = 1 / L, L the unit's reconstruction error under round-to-nearest (activation
  steps re-observed on the unit's own inputs, as the base method does before learning), measured by the engine
  itself (zero iterations) on the first `probe_images` calibration images. Inputs come from the partly quantized
  network, as in reconstruction; the quantizer state is restored afterwards.

Difference of adjacent capacities (`difference`): `log_ratio` |ln C_{k+1} − ln C_k| (default) or `absolute`
|C_{k+1} − C_k|. The paper speaks of "differentials" without settling this; absolute differences grow with the
layer width and always point at the last stage, while the log ratio is scale-free and, on ResNet-18, selects
exactly the pairs of the released hand-written scheme (layer1.1+layer2.0, layer2.1+layer3.0).
Differences equal to 12 significant digits are ties; ties go to the earlier pair.

Topological homogeneity (`homogeneous_only`): the paper compares capacities only between modules of the same
topology apart from kernel size and channels. Here: two units are comparable when both are blocks of the same
class (BasicBlock, Bottleneck, InvertedResidual, ...; stride and the projection shortcut a stride or width change
brings may differ — the stride is in the formula), or both are plain layer chains with the same sequence of
layer kinds (conv/depthwise conv/linear). Pairs that are not comparable (stem → first block, last block →
classifier) are never merged automatically.

Calibration batch: the paper enlarges it (16 cached batches × 256 images, one batch per step). Here the images per
step are `batch_size` and the pool is `data.calibration.num_images`: `algorithm.batch_size: 256` with
`data.calibration.num_images: 4096` is the paper's recipe (steps draw 256 random images from the 4,096).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn as nn

from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.brecq import BrecqJoint
from ptqkit.algorithms.engine import Engine, Phase
from ptqkit.algorithms.qdrop import QDrop
from ptqkit.algorithms.reconstruction import Part, Partition, Reconstruction, ReconstructionConfig
from ptqkit.algorithms.registry import register
from ptqkit.algorithms.units import BLOCK_TYPES, Unit, merge_units, partition
from ptqkit.errors import ConfigError
from ptqkit.schema import spec

log = logging.getLogger(__name__)

BASES: dict[str, type[Reconstruction]] = {"qdrop": QDrop, "brecq_joint": BrecqJoint}
_SCHEME_FORM = "'auto' or a list of unit indices and lists of consecutive unit indices, e.g. [0, 1, [2, 3], 4]"


@dataclass
class GroupingKeys:
    """MRECG's grouping keys: the method's own, and `compose`'s with `grouping: mrecg`."""
    scheme: Any = spec("auto", doc="unit groups by index, e.g. [0, 1, [2, 3], 4], or auto (top_k largest "
                                   "capacity differences)")
    top_k: int = spec(2, lo=0, doc="auto: number of adjacent unit pairs merged")
    capacity: str = spec("params", choices=("params", "loss"),
                         doc="auto: params = data-free sum of stride_alpha^(stride-1)·weights·bits per unit; "
                             "loss = 1 / round-to-nearest reconstruction error (a short probe)")
    difference: str = spec("log_ratio", choices=("log_ratio", "absolute"),
                           doc="auto: how adjacent capacities are compared")
    stride_alpha: float = spec(0.5, lo=0.01, doc="auto, params: factor per stride step above 1")
    homogeneous_only: bool = spec(True, doc="auto: merge only pairs of topologically homogeneous units")
    probe_images: int = spec(64, lo=1, doc="auto, loss: calibration images of the probe")
    scale_iters: bool = spec(False, doc="a group of n units learns for n times algorithm.iters (the optimiser "
                                        "steps its members would have had apart); false = as many as one unit")

    def check(self, path: str) -> None:
        if self.scheme == "auto":
            return
        entries = self.scheme if isinstance(self.scheme, list) and self.scheme else None
        for entry in entries or [None]:
            group = entry if isinstance(entry, list) else [entry]
            if not group or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in group):
                raise ConfigError(f"{path}.scheme", _SCHEME_FORM, self.scheme)


@dataclass
class MRECGConfig(GroupingKeys, ReconstructionConfig):
    base: str = spec("qdrop", choices=tuple(BASES),
                     doc="reconstruction it runs on, with that method's own keys at their defaults: qdrop (keep "
                         "prob 0.5, input prob 0.5) or brecq_joint (1.0, 1.0)")
    act_init_images: Optional[int] = spec(None, lo=0, doc="re-observe each unit's activation ranges on this many "
                                                          "of its cached inputs; null = the base's default (qdrop "
                                                          "256, brecq_joint 0: kept from calibration)")

    def finalize(self, cfg) -> None:
        super().finalize(cfg)
        if self.act_init_images is None:
            self.act_init_images = BASES[self.base].Config.act_init_images

    def default_bound_grad(self) -> str:
        """The base method's own (stop on brecq_joint). MRECGConfig.BOUND_GRAD, "pass", is its default base's
        (QDrop), which compose's mrecg preset runs on."""
        return BASES[self.base].Config.BOUND_GRAD


@dataclass
class Plan:
    """The grouping of one model's units, and how it was chosen."""
    base_units: list[str]
    groups: list[list[int]]
    source: str                                   # "scheme" or the capacity kind
    capacities: Optional[list[float]] = None
    probe_losses: Optional[list[float]] = None
    differences: Optional[list[Optional[float]]] = None  # pair (k, k+1); None = not comparable
    merged_pairs: list[int] = dataclasses.field(default_factory=list)

    def record(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ scheme
def scheme_groups(scheme: list, n_units: int) -> list[list[int]]:
    """The groups a scheme names, checked against the model's `n_units` units."""
    groups = [list(e) if isinstance(e, list) else [e] for e in scheme]
    flat = [i for g in groups for i in g]
    problem = None
    out_of_range = [i for i in flat if i >= n_units]
    broken = [g for g in groups if any(b != a + 1 for a, b in zip(g, g[1:]))]
    if out_of_range:
        problem = f"index {out_of_range[0]} is out of range"
    elif broken:
        problem = f"group {broken[0]} is not consecutive"
    elif len(set(flat)) != len(flat):
        problem = f"unit {next(i for i in flat if flat.count(i) > 1)} appears twice"
    elif len(flat) != n_units:
        problem = f"unit {min(set(range(n_units)) - set(flat))} is missing"
    elif flat != sorted(flat):
        problem = "the units are out of order"
    if problem:
        raise ConfigError("algorithm.scheme", f"each of the {n_units} reconstruction units (indices 0..{n_units - 1}) "
                                              f"exactly once, in order, consecutive inside a group ({problem})", scheme)
    return groups


def groups_from_pairs(n_units: int, pairs) -> list[list[int]]:
    """Groups of consecutive units where each selected pair (k, k+1) is joined."""
    groups = [[0]]
    for k in range(1, n_units):
        if k - 1 in pairs:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


# --------------------------------------------------------------------------------------------- capacity
def _stride(layer: nn.Module) -> int:
    stride = getattr(layer, "stride", 1)
    return max(stride) if isinstance(stride, (tuple, list)) else int(stride)


def data_free_capacity(unit: Unit, alpha: float) -> float:
    """ModCap = Σ_l α^(s_l − 1) · params(W_l) · b_l over the unit's weight layers."""
    return float(sum(alpha ** (_stride(m) - 1) * m.weight.numel() * m.weight_fake_quant.bitwidth
                     for m in unit.modules.values() if hasattr(m, "weight_fake_quant")))


def topology(unit: Unit, fp_modules: dict[str, nn.Module]) -> tuple:
    """What must match for two units' capacities to be compared (see the module docstring)."""
    block = fp_modules.get(unit.name)
    if isinstance(block, BLOCK_TYPES):
        return ("block", type(block).__name__)
    kinds = []
    for m in unit.modules.values():
        if hasattr(m, "weight_fake_quant"):
            groups = getattr(m, "groups", 1)
            kinds.append(("depthwise " if groups > 1 else "") + ("linear" if isinstance(m, nn.Linear) else "conv"))
    return ("layers", tuple(kinds))


def capacity_differences(capacities: list[float], comparable: list[bool], kind: str) -> list[Optional[float]]:
    out = []
    for k, ok in enumerate(comparable):
        if not ok:
            out.append(None)
            continue
        a, b = capacities[k], capacities[k + 1]
        diff = abs(math.log(b) - math.log(a)) if kind == "log_ratio" else abs(b - a)
        # Equal ratios computed from different layer sizes differ in the last bits; they are meant as ties.
        out.append(float(f"{diff:.12g}"))
    return out


def select_pairs(differences: list[Optional[float]], top_k: int) -> list[int]:
    """The `top_k` pairs with the largest difference; ties go to the earlier pair."""
    ranked = sorted((k for k, d in enumerate(differences) if d is not None), key=lambda k: (-differences[k], k))
    return sorted(ranked[:top_k])


# --------------------------------------------------------------------------------------------------- the part
@dataclass
class MRECGGrouping(Part):
    """MRECG's unit grouping as a part any reconstruction can use: `params` holds the MRECGConfig keys (scheme,
    top_k, capacity, difference, stride_alpha, homogeneous_only, probe_images, scale_iters, granularity,
    act_init_images); `label` names what it runs on in a dry run."""
    params: Any
    label: str
    name = "mrecg"
    multi_process = False   # its capacity probe under several processes is not tested yet

    def prepare(self, qmodel, layout, ctx: RunContext) -> None:
        # The grouping is checked against the model's units as soon as they exist: before any calibration.
        self._check_fits(self._block_units(qmodel, ctx), ctx)

    def _block_units(self, qmodel, ctx: RunContext) -> list[Unit]:
        return partition(qmodel, ctx.fp_model, self.params.granularity, ctx.calib_images[:1].to(ctx.device))

    def _check_fits(self, base: list[Unit], ctx: RunContext) -> None:
        p = self.params
        if p.scheme != "auto":
            scheme_groups(p.scheme, len(base))
            return
        comparable = self._comparable(base, ctx)
        if p.top_k > sum(comparable):
            what = "comparable (topologically homogeneous) adjacent pairs" if p.homogeneous_only else "adjacent pairs"
            raise ConfigError("algorithm.top_k", f"at most {sum(comparable)}, the {what} among this model's "
                                                 f"{len(base)} units", p.top_k)

    def _comparable(self, base: list[Unit], ctx: RunContext) -> list[bool]:
        if not self.params.homogeneous_only:
            return [True] * (len(base) - 1)
        fp_modules = dict(ctx.fp_model.named_modules())
        shapes = [topology(u, fp_modules) for u in base]
        return [a == b for a, b in zip(shapes, shapes[1:])]

    def make_plan(self, method: Reconstruction, qmodel, base: list[Unit], ctx: RunContext) -> Plan:
        p = self.params
        names = [u.name for u in base]
        if p.scheme != "auto":
            return Plan(names, scheme_groups(p.scheme, len(base)), "scheme")
        losses = None
        if p.capacity == "params":
            capacities = [data_free_capacity(u, p.stride_alpha) for u in base]
        else:
            losses = self.probe_losses(method, qmodel, base, ctx)
            capacities = [1.0 / max(loss, 1e-30) for loss in losses]
        differences = capacity_differences(capacities, self._comparable(base, ctx), p.difference)
        pairs = select_pairs(differences, p.top_k)
        return Plan(names, groups_from_pairs(len(base), pairs), p.capacity, capacities, losses, differences, pairs)

    def probe_losses(self, method: Reconstruction, qmodel, base: list[Unit], ctx: RunContext) -> list[float]:
        """Each unit's round-to-nearest reconstruction error: the engine with zero iterations on a few images."""
        p = self.params
        images = ctx.calib_images[: p.probe_images]
        phase = Phase("mrecg-probe", iters=0, learn_rounding=False, learn_act_scale=False, quant_acts=True,
                      act_init_images=min(p.act_init_images, len(images)))
        settings = dataclasses.replace(method.engine_settings(ctx), show_progress=False, log_every=100)
        saved = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
        try:
            history = Engine(qmodel, base, images, ctx.device, settings).run([phase])
        finally:
            # The probe re-observes activation steps; the reconstruction must start from the calibrated state.
            qmodel.load_state_dict(saved)
        return [record["final_rec_loss"] for record in history]

    def partition(self, method, qmodel, ctx: RunContext) -> Partition:
        base = self._block_units(qmodel, ctx)
        self._check_fits(base, ctx)
        plan = self.make_plan(method, qmodel, base, ctx)
        log.info("mrecg groups (%s): %s", plan.source,
                 ", ".join("+".join(plan.base_units[i] for i in g) for g in plan.groups))
        units = []
        for g in plan.groups:
            unit = merge_units(qmodel, [base[i] for i in g]) if len(g) > 1 else base[g[0]]
            if self.params.scale_iters:
                unit.iters_scale = len(g)
            units.append(unit)
        return Partition(units, record={"mrecg": plan.record()}, members=plan.groups,
                         notes=describe_plan(plan, self.params))

    def needs_calibrated_plan(self) -> bool:
        # The loss capacity needs a calibrated model: a dry run then calibrates and probes (seconds), nothing more.
        return self.params.scheme == "auto" and self.params.capacity == "loss"

    def unit_kind(self, method) -> str:
        return f"{self.params.granularity}, {self.label}"


# --------------------------------------------------------------------------------------------------- method
@register("mrecg")
class MRECG(Reconstruction):
    multi_process = False   # its capacity probe under several processes is not tested yet
    Config = MRECGConfig

    def base_method(self) -> Reconstruction:
        """The base plugin with our shared reconstruction settings (its own keys keep their defaults)."""
        cls = BASES[self.params.base]
        shared = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(cls.Config)
                  if f.init and hasattr(self.params, f.name)}
        return cls(cls.Config(**shared))

    def phases(self) -> list[Phase]:
        return self.base_method().phases()

    @classmethod
    def inherited_defaults(cls) -> dict:
        """Its phases are its default base's (QDrop's drop rule and step initialisation)."""
        base = BASES[cls.Config.base].Config
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(base) if f.init}

    def make_parts(self):
        return [MRECGGrouping(self.params, f"on {self.params.base}")]


def describe_plan(plan: Plan, p: MRECGConfig) -> str:
    n = len(plan.base_units)
    if plan.source == "scheme":
        head = f"MRECG scheme {p.scheme} over {n} base units:"
        rows = [f"{k:>3}  {name}" for k, name in enumerate(plan.base_units)]
    else:
        formula = (f"ModCap = sum of {p.stride_alpha:g}^(stride-1) * weights * bits" if plan.source == "params"
                   else f"ModCap = 1 / round-to-nearest reconstruction error on {p.probe_images} images")
        head = (f"MRECG auto: {formula}; pairs ranked by {p.difference} difference, top_k = {p.top_k} "
                f"(merged pairs: {', '.join(f'{k}+{k + 1}' for k in plan.merged_pairs) or 'none'}):")
        rows = [f"{'#':>3}  {'unit':<28} {'capacity':>12}" + (f" {'probe loss':>11}" if plan.probe_losses else "")
                + f"  {'diff to next':>12}"]
        for k, name in enumerate(plan.base_units):
            diff = plan.differences[k] if k < n - 1 else None
            shown = "" if k == n - 1 else ("not comparable" if diff is None else f"{diff:.4g}")
            mark = "  <- merged" if k in plan.merged_pairs else ""
            loss = f" {plan.probe_losses[k]:>11.4g}" if plan.probe_losses else ""
            rows.append(f"{k:>3}  {name:<28} {plan.capacities[k]:>12.4g}{loss}  {shown:>12}{mark}")
    groups = "groups: " + str([g if len(g) > 1 else g[0] for g in plan.groups])
    return "\n".join([head, *rows, groups])
