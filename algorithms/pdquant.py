"""PD-Quant (Liu et al., CVPR 2023, arXiv 2212.07048): QDrop plus two switchable parts.

Prediction difference (`pd`): the unit's quantized output goes through the rest of the network with every
quantizer there off, to logits z_q; with z_fp the full-precision logits of the same calibration images (computed
once per run), the loss adds

    (1 / lamb_r) · KL(softmax(z_fp / T) || softmax(z_q / T))      (batch mean, no T² factor)

Distribution correction (`dc`): before a unit learns, its full-precision input x̂ (started at the cached FP input
x) is optimised, `dc_batch` images at a time, for `dc_steps` Adam steps (lr `bn_lr`, reduce-on-plateau: patience
100, min lr 1e-5) on

    Σ_BN ( ||μ_BN − μ_n(x̂)||² + ||σ_BN − σ_n(x̂)||² ) / n  +  ||x̂ − x||² / lamb_c

μ_n, σ_n being each sample's per-channel mean and std at the input of a BatchNorm2d inside the unit (n samples),
μ_BN, σ_BN its running statistics, and ||x̂ − x||² summed over channels, averaged over samples and positions. The
target becomes FP_unit(x̂), and x̂ the FP branch of QDrop's input mix. The next unit's inputs come from the
uncorrected cache: the reference re-runs its FP model on the images for every unit.

Cost: the reference's DC is 500 steps per 32 images (16,000 unit forward/backward passes for 1,024 images), and PD
adds a second unit forward and the network's remainder to every iteration (PD-Quant issue #4: several times
QDrop). Adam moves each element of x̂ on its own, so a larger `dc_batch` changes little but the plateau schedule:
fewer, larger steps, which pays where a large batch runs more efficiently (a GPU), not on one CPU thread.

Precision (runtime.compute_dtype): the pass through the rest of the network runs inside the engine's loop, under
its autocast; the correction steps run the probe under the same helper (`ptqkit.precision.autocast`). The KL term,
the BN distances, x̂ and its Adam state are float32, and the corrected target FP_unit(x̂) is computed in float32.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

from ptqkit.algorithms.engine import Hooks, UnitCache
from ptqkit.algorithms.graph import prefix_module, suffix_module
from ptqkit.algorithms.qdrop import QDrop
from ptqkit.algorithms.reconstruction import Part
from ptqkit.quant.quantizers import fake_quantizers, fp_mode, keep_probability, quant_state
from ptqkit.algorithms.registry import register
from ptqkit import precision
from ptqkit.errors import ConfigError
from ptqkit.quant import hostsync, kernels
from ptqkit.schema import spec

log = logging.getLogger(__name__)

# The reference's run_script.py values for ResNets; other architectures set theirs in configs/_base_/models
# (model.algorithm_defaults: MobileNetV2 T 1.0, lamb_c 0.005; MNasNet 1.0, 0.001; RegNetX 4.0, 0.01).
DEFAULT_T, DEFAULT_LAMB_C = 4.0, 0.02
BN_EPS = 1e-6                     # the reference's, not the BN layer's own eps
DC_PATIENCE, DC_MIN_LR = 100, 1e-5


def prediction_difference(z_q: torch.Tensor, z_fp: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_fp / T) || softmax(z_q / T)), summed over classes, averaged over the batch, in float32."""
    z_q, z_fp = precision.float32(z_q), precision.float32(z_fp)
    # Both sides as log-probabilities: equal logits give exactly 0.
    return F.kl_div(F.log_softmax(z_q / temperature, 1), F.log_softmax(z_fp / temperature, 1),
                    reduction="batchmean", log_target=True)


@contextlib.contextmanager
def bn_inputs(bns: list[nn.BatchNorm2d]):
    """{BN layer: its input at the latest forward}; the hooks go when the block ends."""
    seen: dict[nn.Module, torch.Tensor] = {}
    handles = [bn.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, args[0])) for bn in bns]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def sample_stats(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and unbiased variance of (N, C, L) over L (one fused pass each way on CPU)."""
    return kernels.row_stats(flat)


def bn_distance(inputs: list[torch.Tensor], bns: list[nn.BatchNorm2d]) -> torch.Tensor:
    """Σ over `bns` of the per-sample BN-statistics distance of their `inputs` (in float32, whatever the unit
    computed them in), over the sample count."""
    return sum(kernels.bn_distance(precision.float32(x), bn.running_mean, bn.running_var, BN_EPS)
               for x, bn in zip(inputs, bns))


def bn_probe(module: fx.GraphModule, bns: list[nn.BatchNorm2d]):
    """A function x -> [input of each BN in `bns`] that computes only what those inputs need (not the last BN,
    the residual add or what follows); by forward hooks on the whole unit where a BN is not a node of its graph."""
    nodes = {n.target: n for n in module.graph.nodes if n.op == "call_module"}
    names = {m: name for name, m in module.named_modules()}
    if all(names.get(bn) in nodes for bn in bns):
        probe = prefix_module(module, [nodes[names[bn]].args[0] for bn in bns])
        return lambda x: list(probe(x))

    def hooked(x):
        with bn_inputs(bns) as seen:
            module(x)
        return [seen[bn] for bn in bns]
    return hooked


def correct_inputs(module: fx.GraphModule, bns: list[nn.BatchNorm2d], fp_in: torch.Tensor, params, device,
                   store_device, dtype, compute_dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """x̂ and FP_unit(x̂) over all of `fp_in`, and the BN distance (mean over chunks) before and after.
    `compute_dtype` (runtime.compute_dtype): the probe's forward and backward in the steps; x̂, Adam's state, the
    distance and the target FP_unit(x̂) stay float32.

    Per step the BN term goes through autograd (the probe and the per-sample statistics); the constraint
    ||x̂ − x||² / lamb_c and its gradient are one fused pass added to x̂'s gradient, and Adam is one pass too: on CPU
    each elementwise pass over x̂ costs a tenth of the probe. The plateau schedule runs on the device and the
    distances are summed there: the steps read nothing back, the two means are read once at the end."""
    corrected, outputs, before, after = [], [], [], []
    probe = bn_probe(module, bns)
    with fp_mode(module):
        for start in range(0, len(fp_in), params.dc_batch):
            x = fp_in[start:start + params.dc_batch].to(device, torch.float32).contiguous()
            x_hat = x.clone().requires_grad_(True)
            opt = kernels.adam([{"params": [x_hat], "lr": params.bn_lr}])
            plateau = kernels.Plateau(opt, patience=DC_PATIENCE, min_lr=DC_MIN_LR)
            # reconstruction_loss(x̂, x, 2): summed over channels, averaged over samples and positions
            positions = x.numel() // x.shape[1]
            with torch.no_grad():
                before.append(bn_distance(probe(x), bns).detach())
            with torch.enable_grad(), hostsync.loop():
                for _ in range(params.dc_steps):
                    with precision.autocast(device, compute_dtype):
                        inputs = probe(x_hat)
                    bn_loss = bn_distance(inputs, bns)
                    opt.zero_grad()
                    bn_loss.backward(inputs=[x_hat])          # the unit's own weights need no gradient
                    constraint = kernels.sqdist_grad_(x_hat.detach(), x, x_hat.grad,
                                                      2.0 / (params.lamb_c * positions))
                    opt.step()
                    plateau.step(bn_loss.detach().double() + constraint.to(bn_loss.device) /
                                 (params.lamb_c * positions))
            with torch.no_grad():
                outputs.append(module(x_hat).to(store_device, dtype))
                after.append(bn_distance(probe(x_hat), bns).detach())
            corrected.append(x_hat.detach().to(store_device, dtype))
    chunks = len(corrected)
    # float32 distances summed in double, in order, as Python floats would be
    before, after = torch.stack(before).double().cpu().tolist(), torch.stack(after).double().cpu().tolist()
    return torch.cat(corrected), torch.cat(outputs), sum(before) / chunks, sum(after) / chunks


class PredictionDifferenceHooks(Hooks):
    """PD-Quant's loss term: the unit's quantized output through the rest of the network (quantizers there off)
    against the FP logits of the same images."""

    def __init__(self, gm, params: "PredictionDifference", fp_logits: torch.Tensor):
        self.gm, self.params, self.fp_logits = gm, params, fp_logits
        self.module = self.cache = self.suffix = None
        self.suffix_quantizers: list = []

    def unit_start(self, unit, module, cache, phase):
        self.module, self.cache = module, cache
        try:
            self.suffix = suffix_module(self.gm, unit.output)
        except ValueError:
            raise ConfigError("algorithm.granularity", "units that end where the rest of the network needs "
                              f"nothing else (algorithm.pd: unit {unit.name} does not)",
                              self.params.granularity) from None
        self.suffix_quantizers = [q for _, q in fake_quantizers(self.suffix)]
        return cache

    def extra_loss(self, unit, out_q, batch, it, phase):
        p = self.params
        idx = batch.idx
        if p.output == "shared":
            out = out_q
        else:
            # The reference runs the unit on [mixed input; quantized input] in one batch and feeds the second half
            # on: the quantized input, activation drop still on. `rerun_nodrop` keeps every quantizer.
            q_in = kernels.gather_rows(self.cache.q_in, idx, out_q.device)
            drop = keep_probability(unit.act_quantizers, 1.0) if p.output == "rerun_nodrop" else \
                contextlib.nullcontext()
            with drop:
                out = self.module(q_in)
        with quant_state(self.suffix, only=self.suffix_quantizers, quantize=False):
            z_q = self.suffix(out)
        z_fp = kernels.gather_rows(self.fp_logits, idx, z_q.device)
        return {"pd": prediction_difference(z_q, z_fp, p.T) / p.lamb_r}

    def unit_end(self, unit):
        self.module = self.cache = self.suffix = None
        self.suffix_quantizers = []


class DistributionCorrectionHooks(Hooks):
    """PD-Quant's target: each unit's FP input corrected towards its BN statistics before the unit learns."""

    def __init__(self, params: "DistributionCorrection", device: torch.device,
                 compute_dtype: torch.dtype = torch.float32):
        self.params, self.device, self.compute_dtype = params, device, compute_dtype

    def unit_start(self, unit, module, cache, phase):
        p = self.params
        bns = [m for m in unit.modules.values() if isinstance(m, nn.BatchNorm2d)]
        if not bns or p.dc_steps <= 0:
            return cache
        start = time.perf_counter()
        fp_in, fp_out, before, after = correct_inputs(module, bns, cache.fp_in, p, self.device, cache.fp_in.device,
                                                      cache.fp_in.dtype, self.compute_dtype)
        log.info("%s distribution correction: BN distance %.4g -> %.4g (%.1f s)", unit.name, before, after,
                 time.perf_counter() - start)
        return UnitCache(cache.q_in, fp_in, fp_out)   # the engine carries its own, uncorrected cache on


@dataclass
class PredictionDifference(Part):
    """The prediction-difference loss term (PD-Quant): (1 / lamb_r) KL(softmax(z_fp / T) || softmax(z_q / T))."""
    lamb_r: float
    T: float
    output: str                    # rerun | rerun_nodrop | shared
    granularity: str               # for the error message when a unit's output does not lead to the logits
    name = "pd"
    multi_process = False          # the FP logits are indexed by the whole calibration set

    def hooks(self, qmodel, units, ctx, method):
        # Fixed for the whole run: the FP network never changes, and the engine draws batches by image index.
        with torch.no_grad():
            fp_logits = torch.cat([ctx.fp_model(ctx.calib_images[i:i + 256].to(ctx.device)).cpu()
                                   for i in range(0, len(ctx.calib_images), 256)])
        return PredictionDifferenceHooks(qmodel, self, fp_logits)


@dataclass
class DistributionCorrection(Part):
    """Distribution correction (PD-Quant): the target is FP_unit(x̂), x̂ the FP input corrected towards the unit's
    BN running statistics (needs quant.fold_bn false)."""
    lamb_c: float
    bn_lr: float
    dc_steps: int
    dc_batch: int
    name = "dc"

    def hooks(self, qmodel, units, ctx, method):
        return DistributionCorrectionHooks(self, ctx.device, precision.dtype_of(ctx.cfg.runtime.compute_dtype))


@dataclass
class PDKeys:
    """PD-Quant's keys beside its two switches (`pd`, `dc`): the method's own, and `compose`'s."""
    lamb_r: float = spec(0.1, doc="prediction difference weight is 1 / lamb_r")
    T: Optional[float] = spec(None, doc="softmax temperature; null = the model's algorithm_defaults, else 4.0 "
                                        "(MobileNetV2, MNasNet 1.0 in configs/_base_/models)")
    pd_output: str = spec("rerun", choices=("rerun", "rerun_nodrop", "shared"),
                          doc="unit output fed to the rest of the network: rerun = the unit again on its "
                              "quantized input, activation drop on (reference code); rerun_nodrop = the same "
                              "fully quantized; shared = the reconstruction forward's own output (cheapest)")
    lamb_c: Optional[float] = spec(None, doc="DC constraint weight is 1 / lamb_c; null = the model's "
                                             "algorithm_defaults, else 0.02 (RegNetX 0.01, MobileNetV2 0.005, "
                                             "MNasNet 0.001 in configs/_base_/models)")
    bn_lr: float = spec(1e-3, doc="DC: Adam learning rate of the corrected input")
    dc_steps: int = spec(500, lo=0, doc="DC: Adam steps per chunk of dc_batch images")
    dc_batch: int = spec(32, lo=1, doc="DC: images corrected together (reference: 32)")

    def check(self, path):
        for key in ("lamb_r", "T", "lamb_c", "bn_lr"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{path}.{key}", "a value > 0", value)

    def finalize(self, cfg) -> None:
        super().finalize(cfg)
        self.T = DEFAULT_T if self.T is None else self.T
        self.lamb_c = DEFAULT_LAMB_C if self.lamb_c is None else self.lamb_c
        if self.dc and cfg.quant.fold_bn:
            raise ConfigError("quant.fold_bn", "false when algorithm.dc is true (distribution correction "
                              "needs the BN layers)", True)


@register("pdquant")
class PDQuant(QDrop):
    multi_process = False   # its cached FP logits are indexed by the whole calibration set
    @dataclass
    class Config(PDKeys, QDrop.Config):
        w_lr: float = spec(3e-3, lo=0.0, doc="Adam learning rate of the rounding variables V (PD-Quant: 3e-3)")
        pd: bool = spec(True, doc="prediction difference term")
        dc: bool = spec(True, doc="distribution correction of each unit's FP input (needs quant.fold_bn false)")

    def make_parts(self):
        p = self.params
        parts = []
        if p.pd:
            parts.append(PredictionDifference(p.lamb_r, p.T, p.pd_output, p.granularity))
        if p.dc:
            parts.append(DistributionCorrection(p.lamb_c, p.bn_lr, p.dc_steps, p.dc_batch))
        return parts
