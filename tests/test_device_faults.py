"""What a CUDA run needs of the code, checked where it can fail without a GPU: buffers a pre-pass creates take the
model's device and dtype, keep masks depend on their key only (not on the device or the code path that draws
them), the CUDA peak is the run's and not the last unit's, torchrun refuses `device: cuda` without a GPU and sets
each process's GPU before the NCCL group, `gather` keeps the data on the backend's device, a CPU cache feeds a CUDA
model through pinned memory, and `runtime.tf32` / `runtime.deterministic` set torch's switches and restore them.
The same properties on a real GPU: python -m ptqkit.tools.gpu_check (docs/GPU.md)."""
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import IMAGENET, REPO, base_tree, free_port
from ptqkit.quant import kernels


# ------------------------------------------------------------------------------------------------ pre-passes
@pytest.mark.imagenet_sample
def test_cle_buffers_take_the_models_device_and_dtype():
    """CLE swaps MobileNetV2's ReLU6 for per-channel clipped ReLUs whose bounds are new buffers: on a CUDA model
    they must be on the GPU (on the CPU they met the CUDA scales and crashed). A float64 model shows it here: every
    parameter and buffer of the equalized model is in the model's dtype, on its device."""
    from ptqkit.algorithms.prepass import ChannelClippedReLU, equalized
    from ptqkit.models import build_model, load_checkpoint
    model = build_model("mobilenet_v2")
    load_checkpoint(model, os.path.join(IMAGENET, "mobilenet_v2_coral.pth"))
    model = model.double().eval()
    eq, report = equalized(model)
    assert report["relu6_clipped_per_channel"] > 30
    tensors = dict(eq.named_parameters()) | dict(eq.named_buffers())
    wrong = {n: (t.device.type, t.dtype) for n, t in tensors.items()
             if t.is_floating_point() and (t.dtype != torch.float64 or t.device.type != "cpu")}
    assert not wrong, f"not in the model's dtype / device: {dict(list(wrong.items())[:3])}"
    assert any(isinstance(m, ChannelClippedReLU) for m in eq.modules())
    # (that the equalized network computes the same function: tests/algorithms/test_prepass.py; a first float64
    # forward on the CPU takes minutes)


# ------------------------------------------------------------------------------------------------ keep masks
def test_a_keep_mask_depends_on_its_key_only():
    """The C kernel and the torch ops (what CUDA computes) give the same mask for the same key, for any shape and
    layout; so do the input mix and the per-tensor fake quantizer, element for element."""
    for key in (0, 1, 12345, 2 ** 63 + 7, torch.tensor(-5)):
        for shape in ((7,), (3, 5, 11), (64, 16, 8, 8)):
            with kernels.using("c"):
                c = kernels.keep_mask(shape, 0.3, "cpu", key=key)
            with kernels.using("torch"):
                t = kernels.keep_mask(shape, 0.3, "cpu", key=key)
            assert torch.equal(c, t), (key, shape)
    a, b = torch.randn(40, 3, 4, 4), torch.randn(40, 3, 4, 4)
    rows = torch.tensor([5, 0, 39, 5])
    mixed = {}
    for impl in ("c", "torch"):
        with kernels.using(impl):
            mixed[impl] = kernels.mix_rows(a, b, rows, 0.5, "cpu", key=99)
    assert torch.equal(mixed["c"], mixed["torch"])
    x = torch.randn(32, 16, 8, 8)
    outs = {}
    for impl in ("c", "torch"):
        torch.manual_seed(3)
        with kernels.using(impl):
            outs[impl] = kernels.act_fake_quant(x, torch.tensor([0.05]), torch.tensor([0]), -8, 7, 0.5)
    assert torch.equal(outs["c"], outs["torch"])


@pytest.mark.parametrize("impl", ["c", "torch"])
def test_per_channel_activation_drop_uses_the_keyed_mask(impl):
    """A per-channel activation quantizer drops the elements the kernels' keyed mask drops, so its masks agree
    between CPU and CUDA too (it once drew torch.rand_like, which the two devices draw differently)."""
    from mqbench.observer import MinMaxObserver
    from ptqkit.quant.quantizers import ActQuantizer
    x = torch.randn(8, 4, 6, 6) * 3
    q = ActQuantizer(MinMaxObserver, quant_min=0, quant_max=15, ch_axis=1, qscheme=torch.per_channel_affine)
    q.scale = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    q.zero_point = torch.zeros(4, dtype=torch.int)
    q.disable_observer()
    q.enable_fake_quant()
    q.prob = 0.5
    torch.manual_seed(11)
    with kernels.using(impl), torch.no_grad():
        out = q(x)
    torch.manual_seed(11)
    keep = kernels.keep_mask(x.shape, 0.5, "cpu", key=kernels.new_key())
    assert torch.equal(out[~keep], x[~keep])
    quantized = torch.clamp(torch.round(x / q.scale.view(1, -1, 1, 1)), 0, 15) * q.scale.view(1, -1, 1, 1)
    assert torch.equal(out[keep], quantized.detach()[keep])


# ------------------------------------------------------------------------------------------------ CUDA peak
def test_the_cuda_peak_is_the_runs_not_the_last_units(monkeypatch):
    """The engine resets torch's peak counter at every unit (each unit's record holds its own peak); the run's
    figure must still be the largest over all units. torch's counter is simulated."""
    from ptqkit import pipeline
    from ptqkit.algorithms import engine
    counter = {"now": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counter["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: counter.update(peak=counter["now"]))
    cuda = torch.device("cuda")
    engine.reset_cuda_run_peak(cuda)
    for unit_peak, after_unit in ((300, 20), (120, 40), (80, 10)):   # MiB
        engine._reset_cuda_peak(cuda)                                 # what the engine does before each unit
        counter["peak"] = unit_peak * 2 ** 20
        counter["now"] = after_unit * 2 ** 20
    assert pipeline.peak_memory_mb(cuda)["cuda_peak_allocated_mb"] == 300.0
    engine.reset_cuda_run_peak(cuda)                                  # the next run in the same process
    assert pipeline.peak_memory_mb(cuda)["cuda_peak_allocated_mb"] == 10.0


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.mark.cifar10
def test_torchrun_with_device_cuda_and_no_gpu_is_refused_in_one_line(tmp_path):
    """As one process refuses it: exit 2, one line, before joining the group (it used to fall back to gloo on the
    CPU; rank 0 alone then waits for the others, so a hang fails the test too)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_tree(runtime={"device": "cuda", "output_dir": str(tmp_path / "run")})))
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "ptq_main.py", "--quiet", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert lines == ["error: config key 'runtime.device': expected cpu or auto (no CUDA device is visible), "
                     "got 'cuda'"], proc.stderr[-2000:]


def test_each_process_sets_its_gpu_before_the_nccl_group(monkeypatch):
    """The NCCL communicator is built on the current device: set after the group, every process would build it on
    GPU 0 first."""
    import torch.distributed as dist
    from ptqkit import distributed
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(torch.device(d)))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("group", backend, str(kw.get("device_id")))))
    assert distributed.init("cuda") == torch.device("cuda", 1)
    assert calls == [("set_device", "cuda:1"), ("group", "nccl", "cuda:1")]


def test_gather_keeps_the_data_on_the_backend_and_reads_the_sizes_once(monkeypatch):
    """Only the per-process sizes come to the host (one copy, no `.item()` per process); the data goes to the
    backend's device as it is, never through a CPU copy. Collectives are simulated (two processes, equal data)."""
    import torch.distributed as dist
    from ptqkit import distributed
    host_copies, reads = [], []
    real_cpu = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):
        host_copies.append(self.numel())
        return real_cpu(self, *args, **kwargs)

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) == "aten._local_scalar_dense":
                reads.append(func)
            return func(*args, **(kwargs or {}))

    def all_gather(outputs, tensor, *args, **kwargs):
        for out in outputs:
            out.copy_(tensor)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_gather", all_gather)
    t = torch.arange(30.0).reshape(10, 3)
    with Reads():
        out = distributed.gather(t)
    assert torch.equal(out, torch.cat([t, t]))
    assert not reads, f"{len(reads)} scalar reads"
    assert host_copies == [2], f"copies to the host of {host_copies} elements (only the two sizes may come back)"


# ------------------------------------------------------------------------------------------------ pinned memory
def test_a_cpu_cache_feeds_a_cuda_model_through_pinned_memory(monkeypatch):
    """Rows gathered from a cache on the CPU for a CUDA model are staged in pinned memory and copied without the
    host waiting; the engine's batches and PD-Quant's reads go through it. Pinning needs a GPU: simulated."""
    assert kernels.pinned_staging("cpu", "cuda") and kernels.pinned_staging("cpu", "cuda:1")
    assert not kernels.pinned_staging("cpu", "cpu") and not kernels.pinned_staging("cuda", "cuda")
    staged = []
    monkeypatch.setattr(kernels, "pinned_staging", lambda store, compute: True)
    monkeypatch.setattr(kernels, "_pinned_empty",
                        lambda shape, dtype: staged.append(shape) or torch.empty(shape, dtype=dtype))
    cache = torch.randn(50, 3, 4, 4).half()
    idx = torch.tensor([3, 49, 0, 3])
    rows = kernels.gather_rows(cache, idx, "cpu")
    assert rows.dtype == torch.float32 and torch.equal(rows, cache[idx].float())
    assert staged == [(4, 3, 4, 4)]
    from ptqkit.algorithms import engine
    assert torch.equal(engine.gather(cache, idx, "cpu"), rows) and len(staged) == 2


# ------------------------------------------------------------------------------------------------ numerics
@pytest.mark.cifar10     # base_tree names the ResNet-20 checkpoint, which validation checks exists
def test_tf32_and_determinism_are_set_and_restored(monkeypatch):
    from ptqkit import pipeline
    from ptqkit.config import validate
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    cudnn.allow_tf32 = True          # torch's own default for cuDNN: "FP32" convolutions in TF32
    try:
        cfg = validate(base_tree(runtime={"tf32": False, "deterministic": True}))
        with pipeline.numerics(cfg.runtime.tf32, cfg.runtime.deterministic):
            assert not matmul.allow_tf32 and not cudnn.allow_tf32
            assert cudnn.deterministic and not cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert cudnn.allow_tf32 and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        assert torch.are_deterministic_algorithms_enabled() == before[4]
        with pipeline.numerics(tf32=True):
            assert matmul.allow_tf32 and cudnn.allow_tf32 and not torch.are_deterministic_algorithms_enabled()
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = before[:4]
    assert validate(base_tree()).runtime.tf32 is False and validate(base_tree()).runtime.deterministic is False


# ------------------------------------------------------------------------------------------------ switches
def test_quantizer_switches_follow_a_loaded_state():
    """The forward reads Python switches (a buffer read waits for the GPU); a loaded state's buffers set them."""
    from mqbench.observer import MinMaxObserver
    from ptqkit.quant.quantizers import ActQuantizer, quant_state, switches
    q = ActQuantizer(MinMaxObserver, quant_min=0, quant_max=15)
    assert switches(q) == (True, True)
    state = q.state_dict()
    state["observer_enabled"] = torch.tensor([0], dtype=torch.uint8)
    state["fake_quant_enabled"] = torch.tensor([0], dtype=torch.uint8)
    q.load_state_dict(state)
    assert switches(q) == (False, False)
    with quant_state(q, observe=True, quantize=True):
        assert switches(q) == (True, True) and int(q.observer_enabled[0]) == 1
    assert switches(q) == (False, False) and int(q.fake_quant_enabled[0]) == 0
