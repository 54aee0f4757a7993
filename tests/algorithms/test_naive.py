"""Naive PTQ and the pipeline around it, on the real ResNet-20 and CIFAR-10 test images."""
import json
import os

import pytest
import torch

from conftest import base_tree, top1
from ptqkit.config import validate
from ptqkit.quant.prepare import calibrate, prepare_quantized

pytestmark = pytest.mark.cifar10


def _naive(cfg, model, calib):
    qmodel, layout = prepare_quantized(model, cfg.quant)
    calibrate(qmodel, calib, 32, torch.device("cpu"))
    return qmodel, layout


@pytest.mark.slow
def test_w8a8_is_within_half_a_point_of_fp32(resnet20, cifar_calib, cifar_test_set):
    cfg = validate(base_tree(quant={"w": {"bits": 8, "observer": "minmax"}, "a": {"bits": 8, "observer": "minmax"}}))
    qmodel, _ = _naive(cfg, resnet20, cifar_calib)
    images, labels = cifar_test_set[0][:5000], cifar_test_set[1][:5000]   # half the test set: keeps CI short
    fp32, q = top1(resnet20, images, labels), top1(qmodel, images, labels)
    assert fp32 - q < 0.5, (fp32, q)


def test_bit_conventions_are_applied_as_configured(resnet20, cifar_calib):
    cfg = validate(base_tree(quant={"w": {"bits": 2}, "a": {"bits": 4}, "first_layer_w_bits": 8,
                                    "last_layer_w_bits": None, "last_layer_a_bits": 8, "input_bits": None}))
    qmodel, layout = prepare_quantized(resnet20, cfg.quant)
    modules = dict(qmodel.named_modules())
    assert layout.first_layers == ["conv1"] and layout.last_layer == "linear"
    assert modules["conv1"].weight_fake_quant.bitwidth == 8
    assert modules["linear"].weight_fake_quant.bitwidth == 2       # null = same as w.bits
    assert modules["layer2.0.conv1"].weight_fake_quant.bitwidth == 2
    assert modules[layout.last_input_quantizer].bitwidth == 8
    assert layout.input_quantizers == []                           # input_bits null: image not quantized
    assert not any(n.args and getattr(n.args[0], "op", None) == "placeholder" and "fake_quantizer" in str(n.target)
                   for n in qmodel.graph.nodes)


def test_bound_grad_reaches_every_activation_quantizer(resnet20):
    from ptqkit.errors import ConfigError
    from ptqkit.quant.quantizers import act_quantizers
    for value in ("pass", "stop"):
        qmodel, _ = prepare_quantized(resnet20, validate(base_tree(quant={"a": {"bound_grad": value}})).quant)
        assert {q.bound_grad for q in act_quantizers(qmodel)} == {value}
    with pytest.raises(ConfigError, match=r"^config key 'quant\.a\.bound_grad'"):
        validate(base_tree(quant={"a": {"bound_grad": "clip"}}))


@pytest.mark.slow
def test_w4a4_mse_beats_minmax_and_keeps_the_model_useful(resnet20, cifar_calib, cifar_test_set):
    images, labels = cifar_test_set
    images, labels = images[:2000], labels[:2000]
    accs = {}
    for obs in ("minmax", "hist_mse"):
        cfg = validate(base_tree(quant={"w": {"bits": 4, "observer": obs}, "a": {"bits": 4, "observer": obs}}))
        qmodel, _ = _naive(cfg, resnet20, cifar_calib)
        accs[obs] = top1(qmodel, images, labels)
    assert accs["hist_mse"] > accs["minmax"]
    assert accs["hist_mse"] > 60.0


def test_pipeline_writes_results_and_never_overwrites_a_run(tmp_path):
    import ptq_main
    out = tmp_path / "run"
    args = ["--config", "configs/cifar10/resnet20_w8a8_naive.yaml", "--quiet",
            "--set", f"runtime.output_dir={out}", "--set", "data.evaluation.limit=300",
            "--set", "data.calibration.num_images=64", "--set", "data.evaluation.workers=0",
            "--set", "runtime.threads=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert ptq_main.main(args) == 0
        assert torch.get_num_threads() == 2          # the run's one thread does not leak into its caller
    finally:
        torch.set_num_threads(threads)
    first = json.loads((out / "results.json").read_text())
    assert first["evaluation_images"] == 300 and first["calibration_images"] == 64
    assert set(first["fp32"]) == {"top1", "top5", "images"} and first["fp32"]["images"] == 300
    assert first["versions"]["mqbench-torch2"] == "0.1.1"
    assert "quantize" in first["seconds"] and (out / "config.yaml").exists() and (out / "log.txt").exists()
    assert ptq_main.main(args) == 0
    assert os.path.exists(f"{out}-2/results.json")               # the first run's files are untouched
    assert json.loads((out / "results.json").read_text()) == first
