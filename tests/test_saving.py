"""ptqkit.saving: a saved quantized model, reloaded in a new process, predicts exactly what the original did;
per-channel quantizer state, bit conventions and unhardened learned rounding survive the round trip."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, base_tree, top1
from ptqkit.errors import CheckpointError
from ptqkit.saving import load_quantized, save_quantized

pytestmark = pytest.mark.cifar10

RELOAD_SCRIPT = """
import sys
import torch
sys.path.insert(0, {repo!r})
torch.set_num_threads({threads})
from ptqkit.saving import load_quantized
model, cfg = load_quantized({model!r})
images = torch.load({images!r})
with torch.no_grad():
    logits = torch.cat([model(images[i:i + 250]) for i in range(0, len(images), 250)])
torch.save(logits, {out!r})
"""


def quantize_naive(fp_model, calib_images, **sections):
    from ptqkit.algorithms.base import RunContext
    from ptqkit.algorithms.registry import get_algorithm
    from ptqkit.config import validate
    cfg = validate(base_tree(**sections))
    ctx = RunContext(cfg=cfg, fp_model=fp_model, calib_images=calib_images, calib_labels=None,
                     device=torch.device("cpu"), show_progress=False)
    return get_algorithm(cfg.algorithm.name)(cfg.algorithm).run(ctx), cfg


@torch.no_grad()
def logits_of(model, images):
    model.eval()
    return torch.cat([model(images[i:i + 250]) for i in range(0, len(images), 250)])


@pytest.fixture(scope="module")
def w4a4(resnet20, cifar_calib):
    """Naive W4A4 ResNet-20 (per-channel 4-bit weights, MSE ranges from 64 calibration images)."""
    return quantize_naive(resnet20, cifar_calib[:64])


@pytest.fixture(scope="module")
def test_images(cifar_test_set):
    images, labels = cifar_test_set
    return images[::20].contiguous(), labels[::20].contiguous()  # 500 images, 50 of each class


@pytest.mark.slow
def test_reload_in_new_process_predicts_the_same(w4a4, test_images, tmp_path):
    qmodel, cfg = w4a4
    images, labels = test_images
    model_path, images_path, out_path = (str(tmp_path / n) for n in ("q.pt", "images.pt", "logits.pt"))
    save_quantized(qmodel, cfg, model_path)
    torch.save(images, images_path)
    script = RELOAD_SCRIPT.format(repo=REPO, threads=torch.get_num_threads(), model=model_path,
                                  images=images_path, out=out_path)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = torch.load(out_path)
    original = logits_of(qmodel, images)
    assert torch.equal(reloaded.argmax(1), original.argmax(1))
    assert (reloaded - original).abs().max().item() <= 1e-6
    acc = 100.0 * (original.argmax(1) == labels).float().mean().item()
    assert acc == 100.0 * (reloaded.argmax(1) == labels).float().mean().item()
    assert acc > 60.0  # a working W4A4 model, not a broken one that happens to agree with itself


def test_reload_restores_quantizer_state(w4a4, tmp_path):
    from ptqkit.quant.quantizers import fake_quantizers
    qmodel, cfg = w4a4
    path = str(tmp_path / "q.pt")
    save_quantized(qmodel, cfg, path)
    reloaded, cfg2 = load_quantized(path)
    assert cfg2.to_dict() == cfg.to_dict()
    before, after = dict(fake_quantizers(qmodel)), dict(fake_quantizers(reloaded))
    assert before.keys() == after.keys()
    for name, q in before.items():
        r = after[name]
        assert (r.quant_min, r.quant_max, r.bitwidth) == (q.quant_min, q.quant_max, q.bitwidth), name
        assert r.scale.shape == q.scale.shape and torch.equal(r.scale.data, q.scale.data), name
        assert torch.equal(r.zero_point, q.zero_point), name
        assert int(r.observer_enabled[0]) == 0 and int(r.fake_quant_enabled[0]) == int(q.fake_quant_enabled[0])
    # Per-channel 4-bit weights in the middle, 8-bit first layer (the bit conventions of the config).
    assert before["layer1.0.conv1.weight_fake_quant"].scale.shape == (16,)
    assert after["conv1.weight_fake_quant"].quant_max == 255
    assert after["layer1.0.conv1.weight_fake_quant"].quant_max == 15


def test_unhardened_learned_rounding_survives(resnet20, cifar_calib, test_images, tmp_path):
    from ptqkit.quant.quantizers import WeightQuantizer
    qmodel, cfg = quantize_naive(resnet20, cifar_calib[:32])
    layers = [m for m in qmodel.modules() if isinstance(getattr(m, "weight_fake_quant", None), WeightQuantizer)]
    layer = layers[3]
    layer.weight_fake_quant.init(layer.weight)   # MQBench's AdaRound mode (the engine hardens before saving)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # push the learned rounding away from round-to-nearest
        layer.weight_fake_quant.alpha.add_(3.0 * torch.randn(layer.weight.shape, generator=generator))
    images = test_images[0][:100]
    expected = logits_of(qmodel, images)
    path = str(tmp_path / "q.pt")
    save_quantized(qmodel, cfg, path)
    reloaded, _ = load_quantized(path)
    twin = [m for m in reloaded.modules() if isinstance(getattr(m, "weight_fake_quant", None), WeightQuantizer)][3]
    assert twin.weight_fake_quant.adaround
    assert torch.equal(twin.weight_fake_quant.alpha.data, layer.weight_fake_quant.alpha.data)
    assert torch.equal(logits_of(reloaded, images), expected)


def test_unreadable_or_foreign_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"^quantized model '.*nope\.pt': not found$"):
        load_quantized(str(tmp_path / "nope.pt"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a file written by save_quantized"):
        load_quantized(str(foreign))


def test_reloaded_accuracy_matches_the_run(tmp_path):
    """The pipeline's own numbers: what it measured is what the reloaded model measures."""
    from ptqkit import pipeline
    from ptqkit.config import validate
    cfg = validate(base_tree(data={"calibration": {"num_images": 32}, "evaluation": {"limit": 300}}))
    results = pipeline.run(cfg, str(tmp_path), show_progress=False)
    reloaded, cfg2 = load_quantized(os.path.join(str(tmp_path), "quantized_model.pt"))
    from ptqkit import data
    loader = data.evaluation_loader(data.make_splits(cfg2.data), cfg2.data.evaluation)
    again = pipeline.evaluate(reloaded, loader, torch.device("cpu"), show_progress=False)
    assert again["images"] == results["quant"]["images"] == 300
    assert again["top1"] == results["quant"]["top1"]
    images, labels = zip(*loader)
    assert top1(reloaded, torch.cat(images), torch.cat(labels)) == again["top1"]
