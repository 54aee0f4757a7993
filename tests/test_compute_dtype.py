"""runtime.compute_dtype on the real ResNet-20 (the assets' checkpoint, real CIFAR-10 images): the key is validated
in one line; bfloat16 is refused in one line, before any work, where the device has none; in bfloat16 the loop's
convolutions compute in bfloat16 while the fake quantizers, the soft rounding, the losses, what learns and its
optimiser state stay float32; PD-Quant's correction steps too; a short QDrop run in bfloat16 learns what the
float32 run learns and predicts as it does; the saved model and the evaluation are float32.

Autocast's bfloat16 runs on any CPU (emulated where the CPU has no bfloat16 instructions), so these tests run
everywhere: where a test goes through the pipeline, which refuses bfloat16 on such a CPU, the detection is
replaced (`bf16_anywhere`). They check what computes in which dtype, never speed.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import yaml

from conftest import base_tree
from ptqkit import data, pipeline, precision
from ptqkit.algorithms import engine
from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.engine import Engine, EngineSettings
from ptqkit.algorithms.graph import prefix_module, unit_module
from ptqkit.algorithms.pdquant import correct_inputs
from ptqkit.algorithms.registry import get_algorithm
from ptqkit.config import validate
from ptqkit.errors import ConfigError
from ptqkit.quant import hostsync, kernels
from ptqkit.quant.quantizers import fp_mode, keep_probability, quant_state
from ptqkit.saving import load_quantized

pytestmark = pytest.mark.cifar10

CPU = torch.device("cpu")
BF16, F32 = torch.bfloat16, torch.float32


@pytest.fixture
def bf16_anywhere(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)


def _calibrated(resnet20, images, name="qdrop", observer="minmax", **algo):
    # W2A4; MinMax ranges where only dtypes are checked (the range search dominates calibration time)
    cfg = validate(base_tree(quant={"w": {"bits": 2, "observer": observer}, "a": {"bits": 4, "observer": observer}},
                             algorithm={"name": name, "act_init_images": 32, **algo}))
    ctx = RunContext(cfg, resnet20, images, torch.zeros(len(images)), CPU, show_progress=False)
    method = get_algorithm(name)(cfg.algorithm)
    phases = method.phases()
    return method, ctx, method.calibrated_model(ctx, phases), phases


def _cli(tmp_path, capsys, *sets) -> tuple[int, str]:
    import ptq_main
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_tree(runtime={"output_dir": str(tmp_path / "run")})))
    status = ptq_main.main(["--config", str(path), "--quiet", "--set", *sets])
    return status, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- the key
def test_compute_dtype_is_float32_unless_set_and_a_bad_value_is_one_line_and_exit_2(tmp_path, capsys):
    assert validate(base_tree()).runtime.compute_dtype == "float32"
    assert validate(base_tree(runtime={"compute_dtype": "bfloat16"})).runtime.compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"^config key 'runtime\.compute_dtype': expected one of float32, "
                                          r"bfloat16, got 'float16'$"):
        validate(base_tree(runtime={"compute_dtype": "float16"}))
    status, err = _cli(tmp_path, capsys, "runtime.compute_dtype=fp16")
    assert status == 2
    assert err == "error: config key 'runtime.compute_dtype': expected one of float32, bfloat16, got 'fp16'\n"


def test_bfloat16_where_the_device_has_none_is_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    built = []
    monkeypatch.setattr(pipeline, "build_fp_model", lambda *a: built.append(a))
    status, err = _cli(tmp_path, capsys, "runtime.compute_dtype=bfloat16")
    last = err.strip().splitlines()[-1]                   # after the log's "run folder ..." line
    assert status == 2 and "Traceback" not in err
    assert last.startswith("error: config key 'runtime.compute_dtype': expected float32 on this cpu (")
    assert last.endswith(", got 'bfloat16'")
    assert not built and not os.path.exists(tmp_path / "run")     # no model built, no run folder left
    precision.check("float32", CPU)                                 # float32 runs anywhere


def test_the_detection_reads_the_cpus_bfloat16_instructions():
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    if not flags:
        pytest.skip("no CPU flags to compare with (not Linux)")
    native = {"avx512_bf16", "amx_bf16", "bf16", "svebf16"} & set(flags.split(":", 1)[1].split())
    assert precision.bf16_supported("cpu") == bool(native)


# ------------------------------------------------------------------------------------------- the loop's dtypes
def test_the_loop_convolves_in_bfloat16_while_quantizers_losses_and_what_learns_stay_float32(
        resnet20, cifar_calib, monkeypatch):
    images = cifar_calib[:32]
    method, ctx, qmodel, phases = _calibrated(resnet20, images, iters=6)
    unit = method.units(qmodel, ctx)[1]                    # layer1.0: two convs, weights and steps learn
    seen = {"conv": [], "fake_quant": [], "soft": [], "loss": []}
    convs = [m for m in unit.modules.values() if isinstance(m, torch.nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda m, i, o: seen["conv"].append((hostsync.in_loop(), o.dtype)))
             for c in convs]
    act_fake_quant, soft_rounding, loss_fn = kernels.act_fake_quant, kernels.soft_rounding, engine.reconstruction_loss

    def spy_fake_quant(x, *args, **kwargs):
        seen["fake_quant"].append((hostsync.in_loop(), x.dtype, torch.is_autocast_enabled("cpu")))
        return act_fake_quant(x, *args, **kwargs)

    def spy_soft(alpha, *args, **kwargs):
        seen["soft"].append((alpha.dtype, torch.is_autocast_enabled("cpu")))
        return soft_rounding(alpha, *args, **kwargs)

    def spy_loss(out, target, p):
        loss = loss_fn(out, target, p)
        seen["loss"].append((hostsync.in_loop(), loss.dtype))
        return loss

    learners = []
    start = engine.Learner.start
    monkeypatch.setattr(kernels, "act_fake_quant", spy_fake_quant)
    monkeypatch.setattr(kernels, "soft_rounding", spy_soft)
    monkeypatch.setattr(engine, "reconstruction_loss", spy_loss)
    monkeypatch.setattr(engine.Learner, "start", classmethod(lambda cls, *a: learners.append(start(*a)) or learners[-1]))
    torch.manual_seed(0)
    try:
        history = Engine(qmodel, [unit], images, CPU, EngineSettings(show_progress=False, log_every=1,
                                                                     compute_dtype=BF16)).run(phases)
    finally:
        for h in hooks:
            h.remove()
    assert not torch.is_autocast_enabled("cpu")            # restored

    in_loop = [dtype for loop, dtype in seen["conv"] if loop]
    assert len(in_loop) == 6 * len(convs) and set(in_loop) == {BF16}
    assert {dtype for loop, dtype in seen["conv"] if not loop} == {F32}   # caching, range init, unit errors
    # every fake quantizer's kernel gets float32 with autocast off, in the loop as outside it
    assert seen["fake_quant"] and {(dtype, on) for _, dtype, on in seen["fake_quant"]} == {(F32, False)}
    assert sum(loop for loop, _, _ in seen["fake_quant"]) >= 6
    assert seen["soft"] == [(F32, False)] * 6              # the soft rounding and its regulariser, before autocast
    assert {dtype for _, dtype in seen["loss"]} == {F32} and sum(loop for loop, _ in seen["loss"]) == 6

    (learner,) = learners
    learned = learner.params
    assert learner.rounding is not None and learner.a_params and all(p.dtype == F32 for p in learned)
    assert learner.rounding.alpha.grad is not None and learner.rounding.alpha.grad.dtype == F32
    opt = learner.optimiser
    state = opt.state if getattr(opt, "native", False) else getattr(opt, "_torch", opt).state
    tensors = [t for s in state.values() for t in (s.values() if isinstance(s, dict) else s)
               if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert tensors and all(t.dtype == F32 for t in tensors)
    assert all(t.dtype == F32 for t in qmodel.state_dict().values() if t.is_floating_point())
    hist = history[0]["history"]
    assert all(math.isfinite(v) for v in hist["total"]) and hist["round"][-1] > 0.0


def test_fake_quantizers_take_float32_and_give_float32_under_autocast(resnet20, cifar_calib, monkeypatch):
    images = cifar_calib[:32]
    method, ctx, qmodel, _ = _calibrated(resnet20, images)
    unit = method.units(qmodel, ctx)[1]
    q = unit.act_quantizers[-1]
    with torch.no_grad(), fp_mode(qmodel):
        (x,) = prefix_module(qmodel, [unit.input])(images[:8])
    xb = x.to(BF16)                                       # what a bfloat16 convolution hands on
    calls = []
    act_fake_quant = kernels.act_fake_quant
    monkeypatch.setattr(kernels, "act_fake_quant",
                        lambda t, *a, **k: calls.append((t.dtype, torch.is_autocast_enabled("cpu"), kernels._native(t)))
                        or act_fake_quant(t, *a, **k))
    with quant_state(qmodel, observe=False, quantize=True), keep_probability([q], 1.0):
        expected = q(xb.float())                          # the same values in a float32 run
        with torch.autocast("cpu", dtype=BF16):
            out = q(xb)
            layer, wq = unit.weight_quantizers[0]
            w = wq(layer.weight)
        assert out.dtype == F32 and torch.equal(out, expected)
        assert calls[-1][:2] == (F32, False)
        if kernels.implementation("cpu") == "c":
            assert calls[-1][2]                            # the fused C kernel served it
        assert w.dtype == F32 and torch.equal(w, wq(layer.weight))
        # the step's gradient in float32; the input's in the dtype it came in
        xg = xb.clone().requires_grad_(True)
        q.scale.requires_grad_(True)
        with torch.autocast("cpu", dtype=BF16):
            y = q(xg)
        y.sum().backward()
        assert q.scale.grad.dtype == F32 and xg.grad.dtype == BF16
    with quant_state(qmodel, observe=False, quantize=False), torch.autocast("cpu", dtype=BF16):
        assert q(xb) is xb                                 # a quantizer switched off passes its input as it is


def test_distribution_correction_in_bfloat16_keeps_its_input_and_target_float32(resnet20, cifar_calib):
    images = cifar_calib[:32]
    method, ctx, qmodel, _ = _calibrated(resnet20, images, name="pdquant", dc_steps=50, dc_batch=32)
    unit = method.units(qmodel, ctx)[1]                    # layer1.0: two BNs
    module = unit_module(qmodel, unit)
    bns = [m for m in unit.modules.values() if isinstance(m, torch.nn.BatchNorm2d)]
    conv = next(m for m in unit.modules.values() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad(), fp_mode(qmodel):
        (fp_in,) = prefix_module(qmodel, [unit.input])(images)
    dtypes = []
    hook = conv.register_forward_hook(lambda m, i, o: dtypes.append((torch.is_grad_enabled(), o.dtype)))
    try:
        x_hat, fp_out, before, after = correct_inputs(module, bns, fp_in, method.params, CPU, CPU, F32, BF16)
    finally:
        hook.remove()
    assert {dtype for grad, dtype in dtypes if grad} == {BF16}        # the 50 steps' probe
    assert {dtype for grad, dtype in dtypes if not grad} == {F32}     # the distances before and after, the target
    assert x_hat.dtype == F32 and fp_out.dtype == F32
    with torch.no_grad(), fp_mode(qmodel):
        assert torch.equal(module(x_hat), fp_out)         # the target is FP_unit(x̂), in float32
    assert after < 0.85 * before, (before, after)          # as the float32 correction does (test_pdquant)


def test_fdda_steps_in_bfloat16_keep_the_student_the_generator_and_the_losses_float32(resnet20, monkeypatch):
    from ptqkit.algorithms import fdda
    cfg = validate(base_tree(quant={"w": {"bits": 4, "per_channel": True, "observer": "minmax"},
                                    "a": {"bits": 4, "observer": "ema_minmax"}},
                             data={"calibration": {"per_class": 1}},
                             algorithm={"name": "fdda", "epochs": 2, "iters_per_epoch": 2, "warmup_epochs": 1,
                                        "act_freeze_epoch": 2, "g_width": 16, "batch_size": 4, "real_batch_size": 4},
                             runtime={"compute_dtype": "bfloat16"}))
    images, labels = data.draw_calibration(data.make_splits(cfg.data), cfg.data.calibration)
    ctx = RunContext(cfg=cfg, fp_model=resnet20, calib_images=images, calib_labels=labels, device=CPU,
                     show_progress=False)
    convs, losses, states = [], [], []
    for name in ("kd_loss", "bns_distance"):
        original = getattr(fdda, name)
        monkeypatch.setattr(fdda, name, lambda *a, f=original, **k: losses.append(f(*a, **k)) or losses[-1])
    generator_state = fdda.FDDA._generator_state
    monkeypatch.setattr(fdda.FDDA, "_generator_state",
                        lambda self, *a: states.append(generator_state(self, *a)) or states[-1])
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: convs.append((hostsync.in_loop() and torch.is_grad_enabled(), o.dtype))
        if isinstance(m, torch.nn.Conv2d) else None)
    torch.manual_seed(0)
    try:
        qmodel = fdda.FDDA(cfg.algorithm).run(ctx)
    finally:
        hook.remove()
    # the steps' forwards that learn (generator with teacher, student) in bfloat16; nothing else
    assert {dtype for stepping, dtype in convs if stepping} == {BF16}
    assert sum(stepping for stepping, _ in convs) > 0 and F32 in {dtype for stepping, dtype in convs if not stepping}
    assert losses and all(t.dtype == F32 for t in losses)
    generator, optimizer = states[0]["generator"], states[0]["optimizer"]
    learned = list(qmodel.state_dict().values()) + list(generator.state_dict().values()) + \
        [t for s in optimizer.state.values() for t in s.values()]
    assert all(t.dtype == F32 for t in learned if t.is_floating_point())
    assert all(math.isfinite(v) for epoch in ctx.results["fdda"]["epochs"] for k, v in epoch.items() if k != "epoch")


# ----------------------------------------------------------------------------------------- what it learns
@pytest.fixture(scope="module")
def short_runs(resnet20, cifar_calib):
    """The same short QDrop run (layer1.0 and layer1.1, 30 iterations each, 64 images, seed 0) in float32 and in
    bfloat16, from one calibrated W2A4 model; with 500 test images."""
    images = cifar_calib[:64]
    method, ctx, calibrated, phases = _calibrated(resnet20, images, observer="hist_mse", iters=30)
    runs = {}
    for dtype in (F32, BF16):
        qmodel = copy.deepcopy(calibrated)
        torch.manual_seed(0)
        settings = EngineSettings(show_progress=False, compute_dtype=dtype)
        runs[dtype] = (qmodel, Engine(qmodel, method.units(qmodel, ctx)[1:3], images, CPU, settings).run(phases))
    cfg = validate(base_tree(data={"evaluation": {"limit": 500}}))
    xs, ys = zip(*data.evaluation_loader(data.make_splits(cfg.data), cfg.data.evaluation))
    return runs, torch.cat(xs), torch.cat(ys)


def test_a_short_qdrop_run_in_bfloat16_learns_what_float32_learns(short_runs):
    """Each unit's error after learning (measured in float32 on its calibration inputs): bfloat16 gains at least 80 %
    of what float32 gains over nearest rounding and ends within 2 % of it. Learned parameters that lost float32's
    precision would gain little (in bfloat16 an Adam step of 1e-3 is lost on any rounding variable of magnitude 0.5
    or more)."""
    runs, _, _ = short_runs
    assert runs[F32][1][0]["initial_rec_loss"] == runs[BF16][1][0]["initial_rec_loss"]   # one start, in float32
    for f, b in zip(runs[F32][1], runs[BF16][1]):
        gain_f, gain_b = f["initial_rec_loss"] - f["final_rec_loss"], b["initial_rec_loss"] - b["final_rec_loss"]
        assert gain_f > 0.01 * f["initial_rec_loss"], f            # the run is long enough to learn something
        assert gain_b >= 0.8 * gain_f, (f["name"], f["final_rec_loss"], b["final_rec_loss"])
        assert b["final_rec_loss"] == pytest.approx(f["final_rec_loss"], rel=0.02)


def test_a_short_qdrop_run_in_bfloat16_predicts_as_float32_does(short_runs):
    """On the same 500 test images, the bfloat16 and float32 models disagree on D of them. If bfloat16 only adds
    rounding noise, each disagreement is as likely to favour either model, and the difference in correct
    predictions is within two standard deviations (2 sqrt(D)) plus two images; if bfloat16 were systematically
    worse, nearly every disagreement would go against it."""
    runs, images, labels = short_runs
    with torch.no_grad():
        pred = {dtype: runs[dtype][0](images).argmax(1) for dtype in (F32, BF16)}
    disagree = int((pred[F32] != pred[BF16]).sum())
    delta = int((pred[BF16] == labels).sum()) - int((pred[F32] == labels).sum())
    assert disagree < 0.2 * len(labels), disagree
    assert abs(delta) <= 2 * math.sqrt(disagree) + 2, (delta, disagree)


# --------------------------------------------------------------------------------------- the run's outputs
def test_a_bfloat16_run_saves_and_evaluates_float32(tmp_path, monkeypatch, bf16_anywhere):
    tree = base_tree(quant={"w": {"bits": 2, "observer": "minmax"}, "a": {"bits": 4, "observer": "minmax"}},
                     algorithm={"name": "qdrop", "iters": 3, "act_init_images": 32},
                     runtime={"compute_dtype": "bfloat16", "reuse_fp32": False, "output_dir": str(tmp_path)})
    tree["data"]["calibration"]["num_images"] = 64
    tree["data"]["evaluation"]["limit"] = 100
    cfg = validate(tree)
    entered, evaluated = [], []
    autocast, evaluate = precision.autocast, pipeline.evaluate
    monkeypatch.setattr(precision, "autocast", lambda device, dtype=F32: entered.append(dtype) or autocast(device, dtype))
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: evaluated.append(torch.is_autocast_enabled("cpu"))
                        or evaluate(*a, **k))
    results = pipeline.run(cfg, str(tmp_path), show_progress=False)
    assert entered.count(BF16) == 3 * len(results["algorithm_results"]["units"])   # every iteration of every unit
    assert evaluated == [False, False]                     # FP32 and quantized evaluations, outside autocast
    assert results["config"]["runtime"]["compute_dtype"] == "bfloat16"
    qmodel, saved_cfg = load_quantized(os.path.join(tmp_path, "quantized_model.pt"))
    assert saved_cfg.runtime.compute_dtype == "bfloat16"
    floats = [t for t in qmodel.state_dict().values() if t.is_floating_point()]
    assert floats and all(t.dtype == F32 for t in floats)
    with torch.no_grad():
        assert qmodel(torch.zeros(2, 3, 32, 32)).dtype == F32
