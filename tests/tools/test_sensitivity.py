"""Per-layer sensitivity (ptqkit.sensitivity, python -m ptqkit.tools.sensitivity) on ResNet-20 with a few real
images: finite numbers, 2 bits hurting more than 8 for most layers, the probe's partial graph computing what the
whole quantized network computes, the outputs written, and bad arguments refused in one line."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, base_tree
from ptqkit import sensitivity
from ptqkit.config import validate

pytestmark = pytest.mark.cifar10


@pytest.fixture(scope="module")
def report(resnet20, cifar_calib):
    """Sensitivity of every layer at 2 and 8 bits (weights and inputs), 16 + 24 of the seeded calibration images."""
    from ptqkit import data
    cfg = validate(base_tree())
    images, labels = data.draw_calibration(data.make_splits(cfg.data), cfg.data.calibration)
    settings = sensitivity.Settings(bits=[2, 8], what="both", calib_images=16, eval_images=24, batch_size=24,
                                    hessian=True, hessian_samples=2)
    return sensitivity.analyse(cfg, resnet20, images, labels, "cpu", settings, show_progress=False)


def test_every_number_is_finite_and_two_bits_hurt_more_than_eight(report):
    assert report["images"]["calibration"] == [0, 16] and report["images"]["held_out"] == [16, 40]
    rows = report["rows"]
    layers = [r["layer"] for r in report["layers"]]
    assert len(layers) == 20 and {r["what"] for r in rows} == {"w", "a"}
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("kl", "top1", "top1_drop", "agree", "logit_mse")), r
        assert r["kl"] >= -1e-6
    for what in ("w", "a"):
        kl = {(r["layer"], r["bits"]): r["kl"] for r in rows if r["what"] == what}
        worse = sum(kl[(layer, 2)] > kl[(layer, 8)] for layer in layers)
        assert worse >= 0.9 * len(layers), (what, worse)
    hess = {(r["layer"], r["bits"]): r["hessian"] for r in rows if r["what"] == "w"}
    assert all(math.isfinite(v) and v >= 0 for v in hess.values())
    # Two Hutchinson samples leave some traces below 0 (counted as 0); where the estimate is positive, the 2-bit
    # weights' larger rounding error must make the measure larger
    positive = [layer for layer, t in report["hessian_traces"].items() if t > 0]
    assert len(positive) >= len(layers) // 2
    assert all(hess[(layer, 2)] > hess[(layer, 8)] for layer in positive)
    acc = report["accumulated"]
    assert [r["layer"] for r in acc["layers"]] == layers
    assert all(math.isfinite(r["sqnr_db"]) and -1 <= r["cosine"] <= 1 for r in acc["layers"])
    assert math.isfinite(acc["logits"]["kl"])


def test_conventions_and_shared_inputs_are_marked(report):
    by = {r["layer"]: r for r in report["layers"]}
    assert by["conv1"]["fixed_w"] and by["linear"]["fixed_w"] and by["conv1"]["fixed_a"] and by["linear"]["fixed_a"]
    assert not by["layer2.0.conv1"]["fixed_w"]
    assert by["layer1.0.conv1"]["macs"] == 2_359_296


def test_a_probe_computes_what_the_whole_network_computes(resnet20, cifar_calib):
    """The partial graph from cached FP values gives the logits of the whole network with only that quantizer on."""
    from ptqkit.quant import prepare as pq
    from ptqkit.quant.quantizers import fake_quantizers
    cfg = validate(base_tree())
    gm, _ = pq.prepare_quantized(resnet20, sensitivity.uniform_quant(cfg.quant, 3))
    pq.calibrate(gm, cifar_calib[:16], 16, "cpu")
    for _, q in fake_quantizers(gm):
        q.disable_fake_quant()
    layers = [n for n in dict(gm.named_modules()) if hasattr(gm.get_submodule(n), "weight_fake_quant")]
    probes = sensitivity.make_probes(gm, layers, "both")
    runner = sensitivity.SuffixRunner(gm)
    keep = set()
    for p in probes:
        keep |= runner.plan(p.key, p.starts)
    x = cifar_calib[32:48]
    with torch.no_grad():
        cache, fp = runner.full(x, keep)
        assert torch.equal(fp, gm(x))
        for p in probes[::4]:
            sensitivity._switch(gm, p, True)
            assert torch.allclose(runner.run(p.key, cache), gm(x), atol=1e-5), p.key
            sensitivity._switch(gm, p, False)


def test_outputs_are_written(report, tmp_path):
    paths = sensitivity.write_outputs(report, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["accumulated.csv", "sensitivity.csv", "sensitivity.json",
                                                           "sensitivity.png"]
    rows = list(csv.DictReader(open(tmp_path / "sensitivity.csv")))
    assert len(rows) == len(report["rows"]) and rows[0]["layer"] == "conv1"
    assert json.load(open(tmp_path / "sensitivity.json"))["format"] == sensitivity.FORMAT
    text = sensitivity.format_report(report)
    assert "weights alone" in text and "input activations alone" in text and "accumulated" in text
    assert "layer3.2.conv2" in text


def test_cli_refuses_bad_bits_in_one_line(tmp_path):
    import yaml
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_tree()))
    proc = subprocess.run([sys.executable, "-m", "ptqkit.tools.sensitivity", "--config", str(path), "--bits", "2",
                           "9"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --bits: expected bit-widths in [2, 8], got 9"
