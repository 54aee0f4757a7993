"""Pre-passes on the real networks: cross-layer equalization computes the same function with equalized ranges
(MobileNetV2's ReLU6 included), bias correction removes the channel-mean shift weight rounding causes while the
FP network stays the FP network, and a run with both saves and loads back to the same outputs."""
import json
import os

import pytest
import torch

from conftest import IMAGENET, base_tree
from ptqkit.algorithms.prepass import ChannelClippedReLU, correct_bias, equalized
from ptqkit.config import validate
from ptqkit.quant import prepare as pq
from ptqkit.quant import state
from ptqkit.quant.quantizers import act_quantizers, fp_mode, quant_state

pytestmark = pytest.mark.cifar10


def test_cle_keeps_resnet20s_function_and_equalizes_its_ranges(resnet20, cifar_calib):
    eq, report = equalized(resnet20)
    x = cifar_calib[:32]
    with torch.no_grad():
        assert torch.allclose(eq(x), resnet20(x), atol=1e-4, rtol=1e-4)
    assert report["pairs"] == 9                       # conv1 -> conv2 inside each of the 9 blocks
    assert report["range_ratio_after"] < report["range_ratio_before"] / 2
    # no channel's activation (BN-estimated top, beta + 3 |gamma|) grows beyond the layer's largest before
    for name in ("layer1.0.bn1", "layer2.1.bn1", "layer3.2.bn1"):
        before, after = (dict(m.named_modules())[name] for m in (resnet20, eq))
        top = [(bn.bias + 3 * bn.weight.abs()).clamp_min(0).max().detach() for bn in (before, after)]
        assert float(top[1]) <= float(top[0]) * (1 + 1e-5)
    assert resnet20.layer1[0].bn1.weight.data_ptr() != eq.layer1[0].bn1.weight.data_ptr()   # a copy


@pytest.mark.imagenet_sample
def test_cle_keeps_mobilenet_v2s_relu6_exactly():
    """The paper swaps ReLU6 for ReLU (on this checkpoint: 79.5 -> 69.5 FP32 top-1 on 200 sample images); here each
    equalized ReLU6 clips per channel at 6 / s."""
    from ptqkit.data import image_folder
    from ptqkit.models import build_model, load_checkpoint
    model = build_model("mobilenet_v2")
    load_checkpoint(model, os.path.join(IMAGENET, "mobilenet_v2_coral.pth"))
    model.eval()
    folder = image_folder(os.path.join(IMAGENET, "sample"), None, "imagenet_pm1")
    x = torch.stack([folder[i][0] for i in range(0, 1000, 125)])
    eq, report = equalized(model)
    clipped = [m for m in eq.modules() if isinstance(m, ChannelClippedReLU)]
    assert len(clipped) == report["relu6_clipped_per_channel"] > 30
    assert any(float(m.upper.min()) < 6.0 < float(m.upper.max()) for m in clipped)
    with torch.no_grad():
        ref, out = model(x), eq(x)
    assert torch.allclose(out, ref, atol=1e-3 * float(ref.abs().max()))
    assert report["range_ratio_after"] < report["range_ratio_before"] / 2


def _channel_shift(gm, node_name, x):
    """Mean over channels of |mean quantized-weights output - mean FP output| at one layer (activations FP)."""
    from ptqkit.algorithms.graph import prefix_module
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == node_name)
    prefix = prefix_module(gm, [node])
    with torch.no_grad(), quant_state(gm, only=act_quantizers(gm), quantize=False):
        (q,) = prefix(x)
        with quant_state(gm, quantize=False), state.fp_biases(gm):
            (f,) = prefix(x)
    return float((q.mean((0, 2, 3)) - f.mean((0, 2, 3))).abs().mean())


def test_bias_correction_removes_the_mean_shift_and_leaves_the_fp_network(resnet20, cifar_calib):
    cfg = validate(base_tree(quant={"w": {"bits": 2}, "a": {"bits": 4}}))
    gm, _ = pq.prepare_quantized(resnet20, cfg.quant)
    pq.calibrate(gm, cifar_calib[:64], 32, torch.device("cpu"))
    held_out = cifar_calib[128:256]
    before = _channel_shift(gm, "layer3.2.conv2", held_out)
    report = correct_bias(gm, cifar_calib[:128], 32, torch.device("cpu"))
    after = _channel_shift(gm, "layer3.2.conv2", held_out)
    assert report["layers"] == 20
    assert after < 0.5 * before, (before, after)          # measured on images the correction did not see
    with torch.no_grad(), fp_mode(gm), state.fp_biases(gm):
        assert torch.allclose(gm(held_out[:16]), resnet20(held_out[:16]), atol=1e-4)


@pytest.mark.slow
def test_a_run_with_both_prepasses_saves_and_loads_back(tmp_path, monkeypatch):
    import ptq_main
    from conftest import REPO
    from ptqkit.saving import load_quantized
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    assert ptq_main.main(["--config", "configs/cifar10/resnet20_w4a4_naive.yaml", "--quiet",
                          "--set", "algorithm.prepasses=[cle,bias_correction]", "--set", "algorithm.prepass_images=64",
                          "--set", "data.calibration.num_images=128", "--set", "data.evaluation.limit=500",
                          "--set", f"runtime.output_dir={out}"]) == 0
    results = json.load(open(out / "results.json"))
    assert results["algorithm_results"]["cle"]["pairs"] == 9
    assert results["algorithm_results"]["bias_correction"]["layers"] == 20
    assert results["quant"]["top1"] > results["fp32"]["top1"] - 8.0
    model, cfg = load_quantized(str(out / "quantized_model.pt"))
    from ptqkit import data
    xs, ys = zip(*data.evaluation_loader(data.make_splits(cfg.data), cfg.data.evaluation))
    with torch.no_grad():
        top1 = 100.0 * float((model(torch.cat(xs)).argmax(1) == torch.cat(ys)).float().mean())
    assert top1 == pytest.approx(results["quant"]["top1"], abs=0.01)     # the model as it was evaluated
