"""No method's reconstruction loop reads the device from the host between its log points.

On CUDA such a read (`.item()`, `float(t)`, `bool(t)`, a copy to the CPU, an op whose output size depends on the
data) waits for every queued kernel, every iteration. There is no GPU here, so the loops run on the CPU through the
torch-ops kernels (`PTQKIT_KERNELS=torch`: the arithmetic CUDA runs, without the C kernels' host-side calls) under a
TorchDispatchMode that records, inside the loops (`ptqkit.quant.hostsync.loop`) and outside their log points, every
dispatched op that would read the device: aten._local_scalar_dense, equal, nonzero, masked_select, unique, and
copies to the CPU from another device. There must be none; the log points must do their reads (the mode sees
them), and the loops must really run under the mode (it counts their ops).

What a dispatch mode cannot see: `.tolist()` and `.numpy()` bypass dispatch (numpy refuses device tensors, so it
cannot hide a GPU read; `.tolist()` could): `python -m ptqkit.tools.gpu_check` runs the same loops on a GPU under
`torch.cuda.set_sync_debug_mode("error")`, which sees everything.
"""
import dataclasses
import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, base_tree
from ptqkit import precision
from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.engine import Engine, EngineSettings
from ptqkit.algorithms.registry import get_algorithm
from ptqkit.config import validate
from ptqkit.quant import hostsync

pytestmark = pytest.mark.cifar10

CPU = torch.device("cpu")
ITERS = 6                     # log points at iterations 0 and ITERS - 1 (log_every is larger): 4 counted between
SETTINGS = EngineSettings(batch_size=16, show_progress=False, log_every=1000)
SYNCING = {"aten._local_scalar_dense", "aten.equal", "aten.nonzero", "aten.masked_select", "aten._unique2",
           "aten.unique_dim", "aten.unique_consecutive", "aten.bincount"}


class HostReads(TorchDispatchMode):
    """Records the ops that would make the host wait for the device, inside loops (`reads`, with where the first
    of each came from) and at their log points (`at_log_points`), and counts every op inside loops."""

    def __init__(self):
        super().__init__()
        self.reads, self.at_log_points, self.where, self.sites = Counter(), Counter(), {}, Counter()
        self.loop_ops = 0
        self.paused = 0

    @staticmethod
    def _reading(func, args, kwargs) -> str | None:
        name = str(func.overloadpacket)
        if name in SYNCING:
            return name
        if name in ("aten._to_copy", "aten.copy_"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst_device = args[0].device if name == "aten.copy_" else kwargs.get("device", src.device)
            if torch.device(dst_device).type == "cpu" and src.device.type != "cpu":
                return f"{name} to the CPU"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if hostsync._state["loop"] > 0 and not self.paused:
            reading = self._reading(func, args, kwargs)
            if hostsync.in_loop():
                self.loop_ops += 1
                if reading:
                    self.reads[reading] += 1
                    ours = [f"{f.filename.replace(REPO, '')}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                            if REPO in f.filename and "/tests/" not in f.filename and ".venv" not in f.filename]
                    self.where.setdefault(reading, ours[-4:])
                    self.sites[ours[-1] if ours else "?"] += 1
            elif reading:
                self.at_log_points[reading] += 1
        return func(*args, **kwargs)

    def check(self, iterations: int) -> None:
        assert not self.reads, (f"host reads inside the loop: {dict(self.reads)}; first at {self.where}; "
                                f"by place: {dict(self.sites.most_common(8))}")
        assert sum(self.at_log_points.values()) > 0, "the log points read nothing: is the mode seeing the loop?"
        assert self.loop_ops > 20 * iterations, f"only {self.loop_ops} ops seen inside the loop"


@pytest.fixture(autouse=True)
def torch_ops_kernels(monkeypatch):
    monkeypatch.setenv("PTQKIT_KERNELS", "torch")


def _method(resnet20, images, name, quant=None, compute_dtype="float32", **algo):
    quant = quant or {"w": {"bits": 2, "observer": "minmax"}, "a": {"bits": 4, "observer": "minmax"}}
    cfg = validate(base_tree(quant=quant, algorithm={"name": name, "act_init_images": 32, **algo},
                             runtime={"compute_dtype": compute_dtype}))
    ctx = RunContext(cfg, resnet20, images, torch.zeros(len(images)), CPU, show_progress=False)
    method = get_algorithm(name)(cfg.algorithm)
    phases = method.run_phases()
    qmodel = method.calibrated_model(ctx, phases)
    return method, ctx, qmodel, phases


def _engine_loops(resnet20, images, name, pick, compute_dtype="float32", **algo) -> HostReads:
    """`ITERS` iterations of every phase of the method on the unit `pick(units)`, under the mode."""
    torch.manual_seed(0)
    method, ctx, qmodel, phases = _method(resnet20, images, name, iters=ITERS, compute_dtype=compute_dtype, **algo)
    units = method.units(qmodel, ctx)
    hooks = method.hooks(qmodel, units, ctx)
    settings = dataclasses.replace(SETTINGS, compute_dtype=precision.dtype_of(compute_dtype))
    engine = Engine(qmodel, [pick(units)], images, CPU, settings, hooks)
    with HostReads() as mode:
        history = engine.run(phases)
    assert [r["iterations"] for r in history] == [ITERS] * len(phases)
    return mode


@pytest.mark.parametrize("name,algo", [
    ("qdrop", {}),
    ("brecq", {"act_iters": ITERS}),      # two phases: rounding alone, then activation steps
    ("brecq_joint", {}),
    ("adaround", {}),         # layer units, activations as calibrated
    ("ptmq", {"act_bits": [[2, 4], 6, 8]}),   # bit-widths drawn per iteration
])
def test_the_engine_loop_reads_nothing_between_log_points(resnet20, cifar_calib, name, algo):
    mode = _engine_loops(resnet20, cifar_calib[:64], name, lambda units: units[1], **algo)
    mode.check(ITERS)


def test_pdquant_loop_and_its_distribution_correction_read_nothing_between_log_points(resnet20, cifar_calib):
    """The prediction difference every iteration (the rest of the network with its quantizers switched off) and
    the distribution correction's steps with their plateau schedule: its log point is the end of the correction."""
    mode = _engine_loops(resnet20, cifar_calib[:64], "pdquant", lambda units: units[1], dc_steps=ITERS, dc_batch=32)
    mode.check(ITERS)


@pytest.mark.parametrize("name,algo", [
    ("qdrop", {}),
    ("pdquant", {"dc_steps": ITERS, "dc_batch": 32}),   # the rest of the network and the correction steps
])
def test_bfloat16_loops_read_nothing_between_log_points(resnet20, cifar_calib, name, algo):
    """runtime.compute_dtype bfloat16: autocast's casts and the fake quantizers' float32 boundary add no read."""
    mode = _engine_loops(resnet20, cifar_calib[:64], name, lambda units: units[1], compute_dtype="bfloat16", **algo)
    mode.check(ITERS)


def test_mrecg_group_loop_reads_nothing_between_log_points(resnet20, cifar_calib):
    def merged(units):
        assert len(units[1].weight_quantizers) == 4     # layer1.0 and layer1.1, reconstructed together
        return units[1]
    mode = _engine_loops(resnet20, cifar_calib[:64], "mrecg", merged, scheme=[0, [1, 2], 3, 4, 5, 6, 7, 8, 9, 10])
    mode.check(ITERS)


def test_fdda_generator_and_student_steps_read_nothing_between_epoch_ends(resnet20, monkeypatch):
    """Both epochs observe activation ranges (EMA) and weight ranges at every student step, inside the loop; the
    second trains the student. The real images are augmented on the host by design (CPU tensors in every run):
    that part is left out of the count."""
    from ptqkit import data
    from ptqkit.algorithms import fdda
    cfg = validate(base_tree(quant={"w": {"bits": 4, "per_channel": True, "observer": "minmax"},
                                    "a": {"bits": 4, "observer": "ema_minmax"}},
                             data={"calibration": {"per_class": 1}},
                             algorithm={"name": "fdda", "epochs": 2, "iters_per_epoch": ITERS, "warmup_epochs": 1,
                                        "act_freeze_epoch": 2, "g_width": 16, "batch_size": 4,
                                        "real_batch_size": 4}))
    images, labels = data.draw_calibration(data.make_splits(cfg.data), cfg.data.calibration)
    ctx = RunContext(cfg=cfg, fp_model=resnet20, calib_images=images, calib_labels=labels, device=CPU,
                     show_progress=False)
    mode = HostReads()
    real_next = fdda.RealBatches.next

    def on_the_host(self):
        mode.paused += 1
        try:
            return real_next(self)
        finally:
            mode.paused -= 1
    monkeypatch.setattr(fdda.RealBatches, "next", on_the_host)
    torch.manual_seed(0)
    with mode:
        fdda.FDDA(cfg.algorithm).run(ctx)
    assert ctx.results["fdda"]["student_steps"] == ITERS
    assert not mode.reads, (f"host reads inside the loop: {dict(mode.reads)}; first at {mode.where}; "
                            f"by place: {dict(mode.sites.most_common(8))}")
    assert mode.loop_ops > 100 * ITERS


def test_the_mode_sees_a_read_where_one_is(resnet20, cifar_calib, monkeypatch):
    """The check itself: one `.item()` put back into the activation quantizer's forward is found."""
    from ptqkit.quant.quantizers import ActQuantizer
    forward = ActQuantizer.forward

    def reading(self, X):
        self.observer_enabled.item()
        return forward(self, X)
    monkeypatch.setattr(ActQuantizer, "forward", reading)
    mode = _engine_loops(resnet20, cifar_calib[:64], "qdrop", lambda units: units[1])
    assert mode.reads["aten._local_scalar_dense"] >= ITERS - 2
