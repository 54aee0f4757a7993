"""The reconstruction engine on a real ResNet-20 block (the assets' checkpoint, real CIFAR-10 calibration images)."""
import io
import os
import re
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.engine import Engine, EngineSettings, Phase, beta_at
from ptqkit.algorithms.graph import prefix_module, unit_module
from ptqkit.quant.quantizers import LearnedRounding, act_quantizers, fake_quantizers
from ptqkit.algorithms.registry import get_algorithm
from conftest import REPO, base_tree
from ptqkit.config import validate

pytestmark = pytest.mark.cifar10

CPU = torch.device("cpu")


def _setup(resnet20, cifar_calib, name="qdrop", observer="hist_mse", **algo):
    cfg = validate(base_tree(quant={"w": {"bits": 2}, "a": {"bits": 4, "observer": observer}},
                             algorithm={"name": name, **algo}))
    ctx = RunContext(cfg, resnet20, cifar_calib, torch.zeros(len(cifar_calib)), CPU, show_progress=False)
    method = get_algorithm(name)(cfg.algorithm)
    phases = method.phases()
    qmodel = method.calibrated_model(ctx, phases)
    return method, qmodel, method.units(qmodel, ctx), phases


def _state(qmodel):
    return ([(n, int(q.observer_enabled[0]), int(q.fake_quant_enabled[0])) for n, q in fake_quantizers(qmodel)],
            [q.keep_prob for q in act_quantizers(qmodel)],
            [(n, p.requires_grad) for n, p in qmodel.named_parameters()])


def test_reconstruction_beats_round_to_nearest_and_restores_state(resnet20, cifar_calib):
    torch.manual_seed(0)
    _, qmodel, units, phases = _setup(resnet20, cifar_calib, iters=150, act_init_images=64)
    block = units[1]                                   # layer1.0, a real BasicBlock
    assert block.name == "layer1.0"
    engine = Engine(qmodel, [block], cifar_calib, CPU, EngineSettings(show_progress=False, log_every=10))
    module = unit_module(qmodel, block)
    cache = engine._cache_for(0, phases[0], None, module)
    rtn_error = engine.unit_error(module, cache, phases[0])
    before = _state(qmodel)
    history = engine.run(phases)
    after_error = engine.unit_error(module, cache, phases[0])
    assert after_error < 0.8 * rtn_error, (rtn_error, after_error)
    assert history[0]["final_rec_loss"] == pytest.approx(after_error, rel=1e-5)
    assert _state(qmodel) == before                    # switches, keep probabilities, requires_grad


def test_hard_rounding_written_back_reproduces_the_fake_quant_output(resnet20, cifar_calib):
    torch.manual_seed(0)
    _, qmodel, units, phases = _setup(resnet20, cifar_calib, iters=30)
    block = units[2]
    layers = block.weight_quantizers
    originals = [layer.weight.detach().clone() for layer, _ in layers]
    rounding = LearnedRounding(layers)
    with torch.no_grad():
        rounding.alpha.add_(torch.randn_like(rounding.alpha))   # move V away from its nearest-rounding start
        module = unit_module(qmodel, block)
        (inp,) = prefix_module(qmodel, [block.input])(cifar_calib[:8])
        for (layer, _), hard in zip(layers, rounding.hard_weights()):
            layer.weight.copy_(hard)
        expected = module(inp)                         # the unit with the hard rounding in its weights
        for (layer, _), original in zip(layers, originals):
            layer.weight.copy_(original)
        rounding.harden()
        for layer, wq in layers:
            assert torch.equal(wq(layer.weight), layer.weight)   # on the grid: nearest rounding changes nothing
        assert torch.equal(module(inp), expected)
        assert not all(torch.equal(layer.weight, o) for (layer, _), o in zip(layers, originals))


def test_beta_and_regulariser_follow_the_schedule(resnet20, cifar_calib):
    phase = Phase("p", iters=100, warmup=0.2, beta_start=20.0, beta_end=2.0)
    # the reference's count is the iteration + 1: decay from count 20, half-way at count 60, beta_end at the last
    assert [beta_at(i, phase) for i in (0, 18, 19)] == [20.0, 20.0, 20.0]
    assert beta_at(59, phase) == pytest.approx(11.0) and beta_at(99, phase) == pytest.approx(2.0)
    torch.manual_seed(0)
    _, qmodel, units, phases = _setup(resnet20, cifar_calib, iters=50, log_every=1, act_init_images=0)
    engine = Engine(qmodel, units[1:2], cifar_calib, CPU, EngineSettings(show_progress=False, log_every=1))
    hist = engine.run(phases)[0]["history"]
    rounds = dict(zip(hist["iter"], hist["round"]))
    assert all(rounds[i] == 0.0 for i in range(9))           # warm-up: counts 1..9 of 50 (20 % is count 10)
    assert all(rounds[i] > 0.0 for i in range(9, 50))


def test_the_first_unit_keeps_the_network_inputs_step_as_calibrated(resnet20, cifar_calib):
    """A unit learns the steps of what it produces; the images' own quantizer keeps its calibration (MQBench's
    loop never learns it either), while the first unit's ReLU step learns."""
    torch.manual_seed(0)
    _, qmodel, units, phases = _setup(resnet20, cifar_calib, iters=30, act_init_images=0)
    first = units[0]
    (images_q,) = first.input_quantizers
    others = [q for q in first.act_quantizers if q is not images_q]
    assert len(others) == 1 and not units[1].input_quantizers
    before, others_before = float(images_q.scale.detach()), [float(q.scale.detach()) for q in others]
    Engine(qmodel, [first], cifar_calib, CPU, EngineSettings(show_progress=False)).run(phases)
    assert float(images_q.scale) == before
    assert [float(q.scale) for q in others] != others_before


def _dry_run(config, *sets):
    import ptq_main
    out = io.StringIO()
    args = ["--config", os.path.join(REPO, config), "--dry-run"]
    for s in sets:
        args += ["--set", s]
    with redirect_stdout(out):
        assert ptq_main.main(args) == 0
    return out.getvalue()


def test_dry_run_lists_resnet20_units():
    text = _dry_run("configs/cifar10/resnet20_w4a4_qdrop.yaml", "data.calibration.num_images=32")
    assert "11 reconstruction units (block):" in text
    rows = [m.group(1) for m in re.finditer(r"^[ \t]+\d+[ \t]+(\S+)", text, re.M)]
    assert rows == ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["linear"]


@pytest.mark.imagenet_sample
def test_dry_run_lists_mobilenet_v2_units():
    text = _dry_run("configs/imagenet/mobilenet_v2_sample_w4a4_qdrop.yaml", "data.calibration.num_images=8")
    assert "20 reconstruction units (block):" in text
    rows = [m.group(1) for m in re.finditer(r"^[ \t]+\d+[ \t]+(\S+)", text, re.M)]
    assert rows == ["features.0"] + [f"features.{i}" for i in range(1, 19)] + ["classifier.1"]


def test_fp_inputs_and_targets_stay_full_precision_after_units_are_hardened(resnet20, cifar_calib):
    """Hardening writes rounded weights into the layers: the FP side of a later unit (fed from the network, not the
    chain) and the FP target of a second phase must still come from the original weights."""
    from ptqkit.algorithms.engine import prefix_values
    from ptqkit.quant.quantizers import fp_mode
    torch.manual_seed(0)
    images = cifar_calib[:64]
    setup = dict(name="adaround", observer="hist_mse", iters=5, act_init_images=0)
    _, qmodel, units, phases = _setup(resnet20, images, **setup)
    _, fresh, fresh_units, _ = _setup(resnet20, images, **setup)
    k = next(i for i in range(1, len(units)) if units[i].input is not units[i - 1].output)   # not chained
    engine = Engine(qmodel, units, images, CPU, EngineSettings(show_progress=False))
    Engine(qmodel, units[:k], images, CPU, EngineSettings(show_progress=False)).run(phases)
    hardened = units[0].weight_quantizers[0][0].weight
    assert not torch.equal(hardened, fresh_units[0].weight_quantizers[0][0].weight)   # rounding was written back
    module = unit_module(qmodel, units[k])
    cache = engine._cache_for(k, phases[0], None, module)
    with fp_mode(fresh):
        (expected_in,) = prefix_values(fresh, [fresh_units[k].input], images, 64, CPU, CPU, torch.float32)
        expected_out = unit_module(fresh, fresh_units[k])(expected_in)
    assert torch.equal(cache.fp_in, expected_in)
    assert torch.equal(cache.fp_out, expected_out)
    assert torch.equal(units[0].weight_quantizers[0][0].weight, hardened)   # the hardened weights are back


def test_cuda_out_of_memory_while_caching_names_the_cache_settings(resnet20, cifar_calib, monkeypatch):
    import ptqkit.algorithms.engine as engine_module
    from ptqkit.errors import UserError
    _, qmodel, units, phases = _setup(resnet20, cifar_calib, iters=5)

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(engine_module, "run_batched", no_memory)
    engine = Engine(qmodel, units, cifar_calib, CPU, EngineSettings(show_progress=False))
    with pytest.raises(UserError) as err:
        engine.run(phases)
    assert str(err.value) == ("CUDA out of memory while caching the inputs and targets of unit conv1 (256 images, "
                              "cache on auto, float32): set algorithm.cache_device=cpu and/or "
                              "algorithm.cache_dtype=float16, or use fewer calibration images")


def test_non_finite_loss_stops_with_the_unit_and_iteration(resnet20, cifar_calib):
    from ptqkit.algorithms.engine import Hooks
    from ptqkit.errors import NumericalError

    class NanAtThree(Hooks):
        def extra_loss(self, unit, out_q, batch, it, phase):
            return {"bad": torch.tensor(float("nan") if it == 3 else 0.0)}
    _, qmodel, units, phases = _setup(resnet20, cifar_calib[:64], observer="hist_mse", iters=10, act_init_images=0)
    engine = Engine(qmodel, units[1:2], cifar_calib[:64], CPU, EngineSettings(show_progress=False), NanAtThree())
    with pytest.raises(NumericalError) as err:
        engine.run(phases)
    # found at the next check (the last iteration here), named by the first bad iteration
    assert str(err.value) == "unit layer1.0 (qdrop) iteration 3: loss is nan (found at the check after iteration 9)"


def test_fixed_batch_draw_takes_one_consecutive_calibration_batch():
    """batch_draw fixed (MQBench's loop): every iteration's images are one of the n // batch_size consecutive
    batches, and all of them come up; random: batch_size images drawn anew."""
    fixed = Engine.__new__(Engine)
    fixed.settings = EngineSettings(batch_size=32, batch_draw="fixed")
    np.random.seed(0)
    starts = []
    for _ in range(200):
        idx = fixed._draw(256, 32)
        assert idx.tolist() == list(range(int(idx[0]), int(idx[0]) + 32)) and int(idx[0]) % 32 == 0
        starts.append(int(idx[0]))
    assert set(starts) == set(range(0, 256, 32))
    np.random.seed(0)   # MQBench's draw, np.random.randint over the batches, on the same seed: the same sequence
    assert starts == [32 * int(np.random.randint(0, 8)) for _ in range(200)]
    random_ = Engine.__new__(Engine)
    random_.settings = EngineSettings(batch_size=32)
    idx = random_._draw(256, 32)
    assert len(idx) == 32 and idx.tolist() != list(range(int(idx[0]), int(idx[0]) + 32))
