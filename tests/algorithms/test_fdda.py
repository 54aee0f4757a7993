"""FDDA on the real ResNet-20 and CIFAR-10 images: BNS centers, the generator's objective, the config's checks,
the state of the returned model, and MobileNetV1 in the zoo."""
import pytest
import torch

from conftest import base_tree, cifar_checkpoint
from ptqkit.config import validate
from ptqkit.models import build_model
from ptqkit.errors import ConfigError, UserError
from ptqkit.algorithms.bns import batchnorm_layers, check_centers, compute_bns_centers

pytestmark = pytest.mark.cifar10

FDDA_QUANT = {"w": {"bits": 4, "per_channel": True, "observer": "minmax"}, "a": {"bits": 4, "observer": "ema_minmax"}}


def _calibration(per_class: int):
    from ptqkit import data
    cfg = validate(base_tree(data={"calibration": {"per_class": per_class}}))
    return data.draw_calibration(data.make_splits(cfg.data), cfg.data.calibration)


def _fdda_cfg(**algorithm):
    return validate(base_tree(quant=FDDA_QUANT, data={"calibration": {"per_class": 1}},
                              algorithm={"name": "fdda", **algorithm}))


def _context(cfg, model, images, labels):
    from ptqkit.algorithms.base import RunContext
    return RunContext(cfg=cfg, fp_model=model, calib_images=images, calib_labels=labels,
                      device=torch.device("cpu"), show_progress=False)


def test_bns_centers_are_the_bn_input_statistics_of_each_class_batch(resnet20):
    images, labels = _calibration(per_class=3)
    # batch_size 2 splits every 3-image class batch in two: the accumulation must still give whole-batch statistics.
    centers = compute_bns_centers(resnet20, images, labels, batch_size=2)
    layers = batchnorm_layers(resnet20)
    assert centers["layers"] == [name for name, _ in layers] and len(layers) == 19
    assert centers["classes"].tolist() == list(range(10)) and centers["counts"].tolist() == [3] * 10
    with torch.no_grad():
        hits = resnet20(images).argmax(1) == labels
    assert centers["correct"].tolist() == [int(hits[labels == c].sum()) for c in range(10)]

    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, inp, name=name: seen.__setitem__(name, inp[0]))
               for name, m in layers]
    try:
        for k, cls in enumerate(centers["classes"].tolist()):
            with torch.no_grad():
                resnet20(images[labels == cls])
            for i, (name, _) in enumerate(layers):
                x = seen[name]
                assert torch.allclose(centers["mean"][i][k], x.mean((0, 2, 3)), atol=1e-5), (cls, name)
                assert torch.allclose(centers["var"][i][k], x.var((0, 2, 3), unbiased=False), atol=1e-5), (cls, name)
    finally:
        for h in handles:
            h.remove()


def test_bns_centers_tool_writes_one_center_per_class(tmp_path):
    from ptqkit.tools.bns_centers import main
    out = tmp_path / "centers.pt"
    assert main(["--config", "configs/cifar10/resnet20_w4a4_fdda.yaml", "--out", str(out),
                 "--set", "runtime.device=cpu"]) == 0
    centers = torch.load(out, weights_only=True)
    assert centers["model"] == "cifar_resnet20" and centers["counts"].tolist() == [1] * 10
    check_centers(centers, build_model("cifar_resnet20"), str(out))
    with pytest.raises(UserError, match=r"centers\.pt': BN layers 19 do not match the model's 31 \(computed for "
                                        r"another model\?\)$"):
        check_centers(centers, build_model("cifar_resnet32"), str(out))
    tree = base_tree(quant=FDDA_QUANT, model={"name": "cifar_resnet32", "checkpoint": cifar_checkpoint(32)},
                     algorithm={"name": "fdda", "centers": str(out)})
    with pytest.raises(ConfigError, match=r"^config key 'algorithm\.centers': expected BNS centers of model "
                                          r"'cifar_resnet32', got .*made for 'cifar_resnet20'\)\"$"):
        validate(tree)
    assert [m.shape for m in centers["mean"][:2]] == [torch.Size([10, 16])] * 2


def test_generator_loss_decreases_on_resnet20(resnet20, tmp_path):
    from ptqkit.algorithms.engine import frozen_parameters as frozen
    from ptqkit.algorithms.fdda import FDDA, EpochStats
    torch.manual_seed(0)
    images, labels = _calibration(per_class=1)
    cfg = _fdda_cfg(g_width=32, batch_size=16)
    algo = FDDA(cfg.algorithm)
    ctx = _context(cfg, resnet20, images, labels)
    state = algo._generator_state(ctx, resnet20, num_classes=10)
    losses = []
    untrained = algo._generator_report(state, resnet20, images, labels, None)
    with frozen(resnet20):
        for _ in range(20):
            stats = EpochStats()
            algo._generator_step(state, resnet20, epoch=0, stats=stats)
            losses.append(stats.means()["g_loss"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, losses
    # the report measures what the steps optimised: class batches move towards their own BN centers
    trained = algo._generator_report(state, resnet20, images, labels, str(tmp_path))
    assert trained["cbns_own"] < 0.8 * untrained["cbns_own"], (untrained, trained)
    assert (tmp_path / "samples.png").stat().st_size > 0 and "samples" not in untrained
    assert all(p.grad is None and p.requires_grad for p in resnet20.parameters())  # teacher untouched, restored


@pytest.mark.parametrize("use_generated", [True, False])
def test_run_returns_a_quantized_model_with_ranges_of_its_final_weights(resnet20, use_generated):
    from ptqkit.algorithms.fdda import FDDA
    from ptqkit.quant.quantizers import fake_quantizers
    torch.manual_seed(0)
    images, labels = _calibration(per_class=1)
    cfg = _fdda_cfg(epochs=2, iters_per_epoch=3, warmup_epochs=1, act_freeze_epoch=1, g_width=16,
                    use_generated=use_generated, lr=1e-3)
    before = [p.clone() for p in resnet20.parameters()]
    ctx = _context(cfg, resnet20, images, labels)
    qmodel = FDDA(cfg.algorithm).run(ctx)
    assert all(torch.equal(a, b) for a, b in zip(before, resnet20.parameters()))
    assert all(p.requires_grad for p in resnet20.parameters())
    assert all(int(q.observer_enabled[0]) == 0 and int(q.fake_quant_enabled[0]) == 1
               for _, q in fake_quantizers(qmodel))
    conv = dict(qmodel.named_modules())["layer2.0.conv1"]
    wq = conv.weight_fake_quant
    w = conv.weight.detach().flatten(1)
    expected_scale = (w.amax(1).clamp_min(0) - w.amin(1).clamp_max(0)) / 15
    assert torch.allclose(wq.scale, expected_scale, rtol=1e-5)
    assert not torch.equal(conv.weight, dict(resnet20.named_modules())["layer2.0.conv1"].weight)  # it was trained
    history = ctx.results["fdda"]
    assert history["student_steps"] == 3 and history["generator_steps"] == (6 if use_generated else 0)
    assert ("g_loss" in history["epochs"][0]) == use_generated and "s_loss" in history["epochs"][1]


@pytest.mark.parametrize("override, message", [
    ({"algorithm": {"name": "fdda", "temperature": 0}},
     r"^config key 'algorithm\.temperature': expected a value >= 0\.001, got 0\.0$"),
    ({"algorithm": {"name": "fdda", "epochs": 5, "warmup_epochs": 5}},
     r"^config key 'algorithm\.warmup_epochs': expected fewer than algorithm\.epochs \(5\), or no student step "
     r"is taken, got 5$"),
    ({"algorithm": {"name": "fdda", "augment": "mixup"}},
     r"^config key 'algorithm\.augment': expected one of resized_crop, pad_crop, none, got 'mixup'$"),
    ({"algorithm": {"name": "fdda"}, "quant": {"w": {"observer": "mse"}}},
     r"^config key 'quant\.w\.observer': expected minmax \(fdda recomputes weight ranges at every step\), "
     r"got 'mse'$"),
])
def test_config_rejects_bad_values_in_one_line(override, message):
    from ptqkit.config import deep_merge
    tree = base_tree(quant=FDDA_QUANT)
    with pytest.raises(ConfigError, match=message):
        validate(deep_merge(tree, override))


def test_published_defaults():
    p = _fdda_cfg().algorithm
    assert (p.ce_weight, p.bns_weight, p.dbns_weight, p.cbns_weight, p.single_ce_weight) == (0.5, 0.2, 0.9, 0.01, 0.5)
    assert (p.dbns_mean_sigma, p.dbns_var_sigma, p.temperature, p.alpha) == (0.5, 1.0, 20.0, 20.0)
    assert (p.lr, p.momentum, p.nesterov, p.weight_decay, p.batch_size, p.real_batch_size) == \
        (1e-6, 0.9, True, 1e-4, 16, 16)
    assert (p.epochs, p.iters_per_epoch, p.warmup_epochs, p.act_freeze_epoch) == (400, 200, 50, 4)


def test_mobilenet_v1_is_the_standard_network():
    from ptqkit.quant.prepare import trace_check
    model = build_model("mobilenet_v1").eval()
    assert sum(p.numel() for p in model.parameters()) == 4231976
    assert len(batchnorm_layers(model)) == 27
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    trace_check(model)
