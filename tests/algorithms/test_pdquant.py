"""PD-Quant on the real ResNet-20 (the assets' checkpoint, real CIFAR-10 calibration images): the prediction-difference
term vanishes when quantized and FP logits coincide, distribution correction moves a block's BN statistics toward
the running ones while the engine carries the uncorrected cache on, both parts off = QDrop exactly, one-line
config errors and per-architecture defaults."""
import os

import pytest
import torch

from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.engine import (Batch, Engine, EngineSettings, Hooks, UnitCache, phase_state,
                                      reconstruction_loss)
from ptqkit.algorithms.graph import prefix_module, unit_module
from ptqkit.algorithms.pdquant import (bn_distance, bn_inputs, bn_probe, correct_inputs, prediction_difference,
                               sample_stats)
from ptqkit.quant.quantizers import fake_quantizers, fp_mode
from ptqkit.algorithms.registry import get_algorithm
from conftest import ASSETS, REPO, base_tree
from ptqkit.config import load_config, load_yaml_tree, validate
from ptqkit.errors import ConfigError

pytestmark = pytest.mark.cifar10

CPU = torch.device("cpu")


def _setup(resnet20, images, name="pdquant", **algo):
    # MinMax ranges: nothing tested here depends on the range search, which dominates calibration time.
    quant = {"w": {"bits": 2, "observer": "minmax"}, "a": {"bits": 4, "observer": "minmax"}}
    cfg = validate(base_tree(quant=quant, algorithm={"name": name, **algo}))
    ctx = RunContext(cfg, resnet20, images, torch.zeros(len(images)), CPU, show_progress=False)
    method = get_algorithm(name)(cfg.algorithm)
    phases = method.phases()
    qmodel = method.calibrated_model(ctx, phases)
    return method, ctx, qmodel, method.units(qmodel, ctx), phases[0]


def _flags(qmodel):
    return [(n, int(q.observer_enabled[0]), int(q.fake_quant_enabled[0])) for n, q in fake_quantizers(qmodel)]


def test_prediction_difference_is_the_batch_mean_kl_and_zero_for_equal_logits():
    torch.manual_seed(0)
    z_fp, z_q = torch.randn(8, 10), torch.randn(8, 10)
    assert prediction_difference(z_fp, z_fp, 4.0).item() == 0.0
    p_fp, p_q = torch.softmax(z_fp / 4.0, 1), torch.softmax(z_q / 4.0, 1)
    expected = (p_fp * (p_fp.log() - p_q.log())).sum(1).mean()
    assert prediction_difference(z_q, z_fp, 4.0).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("pd_output", ["rerun", "rerun_nodrop", "shared"])
def test_pd_term_vanishes_when_quantized_and_fp_logits_coincide(resnet20, cifar_calib, pd_output):
    images = cifar_calib[:32]
    method, ctx, qmodel, units, phase = _setup(resnet20, images, dc=False, pd_output=pd_output)
    unit = units[1]                                        # layer1.0: the rest of the network follows it
    module, hooks = unit_module(qmodel, unit), method.hooks(qmodel, units, ctx)
    with torch.no_grad(), fp_mode(qmodel):
        (fp_in,) = prefix_module(qmodel, [unit.input])(images)
    with torch.no_grad(), phase_state(qmodel, phase):
        (q_in,) = prefix_module(qmodel, [unit.input])(images)

    cache = hooks.unit_start(unit, module, UnitCache(fp_in, fp_in, fp_in), phase)
    batch = Batch(cache, torch.arange(32), phase, CPU)
    with torch.no_grad(), fp_mode(qmodel):                 # every quantizer off: z_q is the FP network's output
        before = _flags(qmodel)
        pd = hooks.extra_loss(unit, module(fp_in), batch, 0, phase)["pd"]
        assert _flags(qmodel) == before                    # the suffix's quantizers are restored
    assert pd.item() == pytest.approx(0.0, abs=1e-6)

    cache = hooks.unit_start(unit, module, UnitCache(q_in, fp_in, fp_in), phase)
    batch = Batch(cache, torch.arange(32), phase, CPU)
    with torch.no_grad(), phase_state(qmodel, phase):      # W2A4 inside the unit, FP after it
        before = _flags(qmodel)
        pd = hooks.extra_loss(unit, module(q_in), batch, 0, phase)["pd"]
        assert _flags(qmodel) == before
    assert pd.item() > 1e-3


def test_sample_statistics_match_torch_mean_var_and_their_gradients(cifar_calib):
    flat = cifar_calib[:4].double().flatten(2)                       # real images: (4, 3, 1024)
    mean, var = sample_stats(flat)
    assert torch.allclose(mean, flat.mean(2), rtol=1e-12) and torch.allclose(var, flat.var(2), rtol=1e-12)
    small = flat[:2, :, :50].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sample_stats(x), (small,))
    # The loss DC differentiates: both outputs used, with different weights.
    x1, x2 = small.detach().clone().requires_grad_(True), small.detach().clone().requires_grad_(True)
    m, v = sample_stats(x1)
    (3 * m.sum() + (v + 1e-6).sqrt().sum()).backward()
    (3 * x2.mean(2).sum() + (x2.var(2) + 1e-6).sqrt().sum()).backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


def test_distribution_correction_lowers_the_bn_statistics_distance(resnet20, cifar_calib):
    images = cifar_calib[:32]
    method, ctx, qmodel, units, phase = _setup(resnet20, images, dc_steps=50, dc_batch=32)
    unit = units[1]                                        # layer1.0: two BNs
    module = unit_module(qmodel, unit)
    bns = [m for m in unit.modules.values() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 2
    with torch.no_grad(), fp_mode(qmodel):
        (fp_in,) = prefix_module(qmodel, [unit.input])(images)
    x_hat, fp_out, before, after = correct_inputs(module, bns, fp_in, method.params, CPU, CPU, torch.float32)
    with torch.no_grad(), fp_mode(qmodel), bn_inputs(bns) as seen:
        module(fp_in)
        measured_before = bn_distance([seen[bn] for bn in bns], bns).item()
        assert torch.allclose(module(x_hat), fp_out)       # the new target is FP_unit(x̂)
        measured_after = bn_distance([seen[bn] for bn in bns], bns).item()
    assert measured_before == pytest.approx(before, rel=1e-5) and measured_after == pytest.approx(after, rel=1e-5)
    assert measured_after < 0.85 * measured_before, (measured_before, measured_after)
    # The constraint keeps x̂ near x: far less moved than the input's own energy.
    assert reconstruction_loss(x_hat, fp_in, 2.0) < 0.05 * fp_in.pow(2).sum(1).mean()


def test_the_bn_probe_gives_the_bn_inputs_without_running_the_rest_of_the_unit(resnet20, cifar_calib):
    images = cifar_calib[:8]
    _, _, qmodel, units, _ = _setup(resnet20, images, dc_steps=1)
    for unit in (units[1], units[4]):                      # layer1.0, and layer2.0 (strided, padded shortcut)
        module = unit_module(qmodel, unit)
        bns = [m for m in unit.modules.values() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad(), fp_mode(qmodel):
            (x,) = prefix_module(qmodel, [unit.input])(images)
            with bn_inputs(bns) as seen:
                module(x)
            calls = []
            handle = bns[-1].register_forward_hook(lambda *_: calls.append(1))
            probed = bn_probe(module, bns)(x)
            handle.remove()
        assert all(torch.equal(p, seen[bn]) for p, bn in zip(probed, bns)), unit.name
        assert not calls, f"{unit.name}: the last BN ran"


def test_the_bn_probe_falls_back_to_hooks_when_a_bn_is_not_a_graph_node(resnet20, cifar_calib):
    block = resnet20.layer1[0]

    class BlockIsLeaf(torch.fx.Tracer):                    # a model whose tracer keeps the block opaque
        def is_leaf_module(self, m, name):
            return m is block or super().is_leaf_module(m, name)

    wrapper = torch.nn.Sequential(block)
    module = torch.fx.GraphModule(wrapper, BlockIsLeaf().trace(wrapper))
    bns = [block.bn1, block.bn2]
    with torch.no_grad():
        x = resnet20.relu(resnet20.bn1(resnet20.conv1(cifar_calib[:8])))   # layer1.0's real input
        probed = bn_probe(module, bns)(x)
        with bn_inputs(bns) as seen:
            block(x)
    assert [p.shape for p in probed] == [(8, 16, 32, 32)] * 2
    assert all(torch.equal(p, seen[bn]) for p, bn in zip(probed, bns))


def test_the_engine_carries_the_uncorrected_cache_to_the_next_unit(resnet20, cifar_calib):
    images = cifar_calib[:32]
    method, ctx, qmodel, units, phase = _setup(resnet20, images, iters=2, pd=False, dc_steps=5)
    chain = units[1:3]                                     # layer1.0 -> layer1.1
    hooks = method.hooks(qmodel, chain, ctx)
    received, corrected = [], []

    class Recording(Hooks):
        def unit_start(self, unit, module, cache, phase):
            received.append(cache)
            corrected.append(hooks.unit_start(unit, module, cache, phase))
            return corrected[-1]

    with torch.no_grad(), fp_mode(qmodel):
        (fp_in,) = prefix_module(qmodel, [chain[0].input])(images)
        raw_fp_out = unit_module(qmodel, chain[0])(fp_in)
    history = Engine(qmodel, chain, images, CPU, EngineSettings(show_progress=False), Recording()).run([phase])
    assert not torch.allclose(corrected[0].fp_out, raw_fp_out)          # unit 0 learned a corrected target
    assert torch.allclose(received[1].fp_in, raw_fp_out)                # unit 1 starts from the raw FP output
    assert received[1].q_in.shape == received[1].fp_in.shape
    # The recorded error is against the FP network's output, comparable with QDrop's; DC's own target beside it.
    with torch.no_grad(), phase_state(qmodel, phase):
        out = unit_module(qmodel, chain[0])(received[0].q_in)
    network, own = (reconstruction_loss(out, t, 2.0).item() for t in (raw_fp_out, corrected[0].fp_out))
    assert network != pytest.approx(own, rel=1e-3)
    assert history[0]["final_rec_loss"] == pytest.approx(network, rel=1e-5)
    assert history[0]["final_rec_loss_method_target"] == pytest.approx(own, rel=1e-5)


def test_with_both_parts_off_the_loss_history_is_qdrop_exactly(resnet20, cifar_calib):
    images = cifar_calib[:32]
    same = dict(iters=8, log_every=1, act_init_images=32, w_lr=1e-3)   # QDrop's own rounding lr on both sides
    histories = {}
    for name, extra in (("qdrop", {}), ("pdquant", {"pd": False, "dc": False})):
        torch.manual_seed(1005)
        method, ctx, qmodel, units, _ = _setup(resnet20, images, name=name, **same, **extra)
        method.run(ctx)
        histories[name] = [(u["name"], u["history"], u["final_rec_loss"]) for u in ctx.results["units"]]
    assert len(histories["qdrop"]) == 11
    assert histories["pdquant"] == histories["qdrop"]


@pytest.mark.parametrize("algo,quant,message", [
    ({"T": 0}, {}, r"^config key 'algorithm\.T': expected a value > 0, got 0\.0$"),
    ({"lamb_c": -0.02}, {}, r"^config key 'algorithm\.lamb_c': expected a value > 0, got -0\.02$"),
    ({"pd_output": "dropped"}, {}, r"^config key 'algorithm\.pd_output': expected one of rerun, rerun_nodrop, "
                                   r"shared, got 'dropped'$"),
    ({}, {"fold_bn": True}, r"^config key 'quant\.fold_bn': expected false when algorithm\.dc is true "
                            r"\(distribution correction needs the BN layers\), got True$"),
])
def test_a_bad_value_fails_in_one_line(algo, quant, message):
    with pytest.raises(ConfigError, match=message):
        validate(base_tree(quant=quant, algorithm={"name": "pdquant", **algo}))


def test_folded_bn_is_fine_without_distribution_correction():
    assert validate(base_tree(quant={"fold_bn": True}, algorithm={"name": "pdquant", "dc": False})).algorithm.pd


@pytest.mark.imagenet_sample
@pytest.mark.parametrize("model,weight,temperature,lamb_c", [
    ("resnet18", 0.01, 4.0, 0.02), ("regnetx_600mf", 0.01, 4.0, 0.01),
    ("mobilenet_v2", 0.1, 1.0, 0.005), ("mnasnet2_0", 0.2, 1.0, 0.001),
])
def test_per_architecture_defaults_come_from_the_model_config(model, weight, temperature, lamb_c):
    """The references' per-network values live in configs/_base_/models/, not in code; a key the user sets wins."""
    path = os.path.join(REPO, f"configs/imagenet/pdquant/{model}_w2a4.yaml")
    placeholders = [f"data.root={ASSETS}/imagenet", "data.calibration.split=sample", "data.evaluation.split=sample",
                    f"model.checkpoint={ASSETS}/imagenet/mobilenet_v2_coral.pth"]
    p = load_config(path, placeholders).algorithm
    assert (p.weight, p.T, p.lamb_c, p.lamb_r, p.bn_lr) == (weight, temperature, lamb_c, 0.1, 1e-3)
    assert (p.w_lr, p.a_lr, p.prob, p.input_prob, p.dc_steps) == (3e-3, 4e-5, 0.5, 0.5, 500)
    explicit = load_config(path, placeholders + ["algorithm.T=2.0", "algorithm.lamb_c=0.5"]).algorithm
    assert (explicit.T, explicit.lamb_c) == (2.0, 0.5)


def test_without_model_defaults_the_method_defaults_apply():
    p = validate(base_tree(algorithm={"name": "pdquant"})).algorithm
    assert (p.weight, p.T, p.lamb_c) == (0.01, 4.0, 0.02)


def test_prediction_difference_needs_units_the_rest_of_the_network_can_follow(resnet20, cifar_calib):
    cfg = validate(base_tree(algorithm={"name": "pdquant", "granularity": "layer", "dc": False}))
    ctx = RunContext(cfg, resnet20, cifar_calib[:8], torch.zeros(8), CPU, show_progress=False)
    method = get_algorithm("pdquant")(cfg.algorithm)
    qmodel, _ = method.prepare(ctx)
    units = method.units(qmodel, ctx)
    inner = next(u for u in units if u.name == "layer1.0.conv1")      # the shortcut still needs the block input
    hooks = method.hooks(qmodel, units, ctx)
    with pytest.raises(ConfigError, match=r"^config key 'algorithm\.granularity': expected units that end where "
                                          r"the rest of the network needs nothing else \(algorithm\.pd: unit "
                                          r"layer1\.0\.conv1 does not\), got 'layer'$"):
        hooks.unit_start(inner, unit_module(qmodel, inner), None, method.phases()[0])


def test_there_are_configs_for_the_published_table():
    for model in ("resnet18", "resnet50", "mobilenet_v2", "regnetx_600mf", "regnetx_3200mf", "mnasnet2_0"):
        for bits in ("w4a4", "w2a4", "w4a2", "w2a2"):
            tree = load_yaml_tree(os.path.join(REPO, "configs", "imagenet", "pdquant", f"{model}_{bits}.yaml"))
            assert tree["algorithm"]["name"] == "pdquant" and tree["algorithm"]["iters"] == 20000
            assert (tree["quant"]["w"]["bits"], tree["quant"]["a"]["bits"]) == (int(bits[1]), int(bits[3]))
            assert not tree["quant"].get("fold_bn", False)
    mnasnet = load_yaml_tree(os.path.join(REPO, "configs", "imagenet", "pdquant", "mnasnet2_0_w4a4.yaml"))
    assert mnasnet["model"]["kwargs"] == {"alpha": 2.0}
