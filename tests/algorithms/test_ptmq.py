"""PTMQ on the real ResNet-20 (the assets' checkpoint, real CIFAR-10 images): run-time switching of the activation
bit-width, a reconstruction loss for every unit (first and last included), the bit-set checks, saving."""
import copy
import io
import os
from contextlib import redirect_stderr

import pytest
import torch

from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.engine import Engine, EngineSettings
from ptqkit.quant.quantizers import (MultiBitActQuantizer, act_quantizers, activation_bits, multibit_quantizers,
                                   reselect_bits, set_activation_bits)
from ptqkit.algorithms.registry import get_algorithm
from conftest import CIFAR, REPO, base_tree
from ptqkit.config import validate
from ptqkit.errors import ConfigError

pytestmark = pytest.mark.cifar10

CPU = torch.device("cpu")
ITERS = 4


def _config(**algo):
    # MinMax ranges keep the fixture fast; the MSE search is not what is tested here.
    return validate(base_tree(quant={"fold_bn": True, "w": {"observer": "minmax"}, "a": {"observer": "minmax"}},
                              algorithm={"name": "ptmq", "act_bits": [4, 6, 8], "iters": ITERS, "log_every": 1,
                                         "act_init_images": 64, **algo}))


@pytest.fixture(scope="module")
def eval_images():
    from ptqkit import data
    ds = data.image_folder(CIFAR, "test", "cifar10")
    picks = range(0, len(ds), len(ds) // 100)
    return torch.stack([ds[i][0] for i in picks]), torch.tensor([ds[i][1] for i in picks])


@pytest.fixture(scope="module")
def quantized(resnet20, cifar_calib):
    """A PTMQ-quantized ResNet-20 (a few iterations per unit), with V recorded at each unit's first and last
    iteration."""
    torch.manual_seed(0)
    cfg = _config()
    images = cifar_calib[:64]
    ctx = RunContext(cfg, resnet20, images, torch.zeros(len(images)), CPU, show_progress=False)
    method = get_algorithm("ptmq")(cfg.algorithm)
    phases = method.phases()
    qmodel = method.calibrated_model(ctx, phases)
    units = method.units(qmodel, ctx)
    hooks = method.hooks(qmodel, units, ctx)
    alphas: dict[str, list] = {}
    steps: dict[str, list] = {}
    reconstruction = hooks.reconstruction

    def recording(unit, *args):
        # the soft weights of this iteration: they move exactly when V does
        alphas.setdefault(unit.name, []).append([wq.soft_weight.detach().clone() for _, wq in unit.weight_quantizers])
        steps.setdefault(unit.name, []).append(
            [s.item() for q in unit.act_quantizers if isinstance(q, MultiBitActQuantizer) for s in q.step_parameters()])
        return reconstruction(unit, *args)

    hooks.reconstruction = recording
    engine = Engine(qmodel, units, images, CPU, EngineSettings(batch_size=32, show_progress=False, log_every=1),
                    hooks)
    history = engine.run(phases)
    return method, ctx, qmodel, units, history, alphas, steps


@torch.no_grad()
def test_switching_bits_changes_the_output_and_switching_back_restores_it_bit_exactly(quantized, eval_images):
    _, _, qmodel, _, _, _, _ = quantized
    x = eval_images[0][:32]
    reference = qmodel(x)                                   # returned at quant.a.bits = 4
    outputs = {}
    for bits in (4, 6, 8):
        with activation_bits(qmodel, bits):
            outputs[bits] = qmodel(x)
            for q in multibit_quantizers(qmodel):
                assert (q.bitwidth, q.quant_min, q.quant_max) == (bits, 0, 2 ** bits - 1)
                assert q.activation_post_process.quant_max == 2 ** bits - 1
                assert q.scale is getattr(q, f"scale_b{bits}") and q.zero_point is getattr(q, f"zero_point_b{bits}")
            fixed = [q for q in act_quantizers(qmodel) if not isinstance(q, MultiBitActQuantizer)]
            assert len(fixed) == 2 and all(q.bitwidth == 8 for q in fixed)   # network input, last layer input
    assert torch.equal(outputs[4], reference)
    assert not torch.equal(outputs[4], outputs[6]) and not torch.equal(outputs[6], outputs[8])
    assert torch.equal(qmodel(x), reference)                # the context restored 4 bits
    previous = set_activation_bits(qmodel, 8)
    assert set(previous) == {4}
    set_activation_bits(qmodel, 6)
    set_activation_bits(qmodel, 4)
    assert torch.equal(qmodel(x), reference)
    qmodel.double().float()                                 # a conversion keeps `scale` the selected step
    q = multibit_quantizers(qmodel)[0]
    assert q.scale is q.scale_b4 and torch.equal(qmodel(x), reference)
    with pytest.raises(ValueError, match=r"^5-bit activations are not available in this model \(bit set: 4, 6, 8\)$"):
        set_activation_bits(qmodel, 5)
    assert torch.equal(qmodel(x), reference)


def test_after_a_move_reselect_bits_makes_the_zero_point_the_selected_one_again(quantized, eval_images):
    _, _, qmodel, _, _, _, _ = quantized
    moved = copy.deepcopy(qmodel)
    moved._apply(torch.clone)        # what a move to another device does: each tensor converted to a new one
    q = multibit_quantizers(moved)[0]
    assert q.scale is q.scale_b4     # Parameters are converted in place
    assert q.zero_point is not q.zero_point_b4 and torch.equal(q.zero_point, q.zero_point_b4)   # buffers are not
    reselect_bits(moved)
    assert all(q.scale is getattr(q, f"scale_b{q.active_bits}") and
               q.zero_point is getattr(q, f"zero_point_b{q.active_bits}") for q in multibit_quantizers(moved))
    x = eval_images[0][:16]
    with torch.no_grad():
        for bits in (4, 6, 8):
            with activation_bits(qmodel, bits), activation_bits(moved, bits):
                assert torch.equal(qmodel(x), moved(x))


def test_first_and_last_units_receive_a_reconstruction_loss(quantized):
    _, _, _, units, history, alphas, steps = quantized
    assert [units[0].name, units[-1].name] == ["conv1", "linear"]
    for record in (history[0], history[-1]):
        hist = record["history"]
        assert len(hist["rec"]) == ITERS
        assert all(v > 0 for v in hist["rec"]), (record["name"], hist["rec"])
        assert all(v > 0 for key in ("gd_fp_mix", "gd_high_mid", "gd_high_low") for v in hist[key])
        # The first step falls in the warm-up (no rounding regulariser): only the reconstruction loss moves V.
        start, after_first_step = alphas[record["name"]][0], alphas[record["name"]][1]
        assert len(start) == 1 and not torch.equal(start[0], after_first_step[0])
    # Step sizes: initialised per bit-width (coarser steps for fewer bits), and every one of them learns.
    for q in units[1].act_quantizers:
        per_bits = [getattr(q, f"scale_b{b}").item() for b in (4, 6, 8)]
        assert per_bits[0] > per_bits[1] > per_bits[2] > 0
    first, last = steps["layer1.0"][0], steps["layer1.0"][-1]
    assert len(first) == 2 * 3 and all(a != b for a, b in zip(first, last))


def test_extra_evaluations_give_a_row_per_bit_width_with_fp32_beside(quantized, eval_images):
    from ptqkit.pipeline import evaluate
    method, ctx, qmodel, _, _, _, _ = quantized
    loader = [(eval_images[0], eval_images[1])]
    rows = method.extra_evaluations(ctx, qmodel, lambda m, desc: evaluate(m, loader, CPU, desc, False))
    rows = rows["activation_bits"]
    assert list(rows) == ["W4A4", "W4A6", "W4A8"]
    fp32 = evaluate(ctx.fp_model, loader, CPU, "fp32", False)["top1"]
    assert all(r["fp32_top1"] == fp32 and r["images"] == len(eval_images[1]) for r in rows.values())
    assert rows["W4A8"]["top1"] >= rows["W4A4"]["top1"] - 5.0
    assert {q.active_bits for q in multibit_quantizers(qmodel)} == {4}


def test_saved_model_reloads_with_every_bit_width(quantized, eval_images, tmp_path):
    from ptqkit.saving import load_quantized, save_quantized
    _, ctx, qmodel, _, _, _, _ = quantized
    path = os.path.join(tmp_path, "ptmq.pt")
    save_quantized(qmodel, ctx.cfg, path)
    reloaded, _ = load_quantized(path)
    x = eval_images[0][:16]
    with torch.no_grad():
        for bits in (4, 6, 8):
            with activation_bits(qmodel, bits), activation_bits(reloaded, bits):
                assert torch.equal(qmodel(x), reloaded(x))


@pytest.mark.parametrize("bits, expected", [
    ([4, 6], "three bit groups low < mid < high"),
    ([8, 6, 4], "three bit groups low < mid < high"),
    ([4, 6, 9], "three bit groups low < mid < high"),
    ([[4, 6], 6, 8], "three bit groups low < mid < high"),
    ([6, 7, 8], "a set holding quant.a.bits = 4"),
])
def test_a_bad_bit_set_is_a_one_line_config_error(bits, expected):
    with pytest.raises(ConfigError, match=r"^config key 'algorithm.act_bits': expected " + expected) as info:
        validate(base_tree(algorithm={"name": "ptmq", "act_bits": bits}))
    assert "\n" not in str(info.value)


def test_without_a_bit_set_the_papers_set_is_used_or_a_one_line_error():
    cfg = validate(base_tree(quant={"w": {"bits": 3}, "a": {"bits": 3}}, algorithm={"name": "ptmq"}))
    assert cfg.algorithm.act_bits == [3, 6, 8]
    with pytest.raises(ConfigError, match=r"the paper has none for W2"):
        validate(base_tree(quant={"w": {"bits": 2}}, algorithm={"name": "ptmq"}))


def test_ptq_main_reports_a_bad_bit_set_in_one_line():
    import ptq_main
    err = io.StringIO()
    with redirect_stderr(err):
        code = ptq_main.main(["--config", os.path.join(REPO, "configs/cifar10/resnet20_w4_ptmq.yaml"),
                              "--set", "algorithm.act_bits=[4, 6]", "--dry-run"])
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config key 'algorithm.act_bits'")
