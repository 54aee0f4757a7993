"""ptqkit.tools.export: MQBench's Academic ONNX of a naive W4A4 ResNet-20, made runnable by onnxruntime, agrees with the
PyTorch fake-quant model on real test images; backends that cannot work here say why in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, base_tree
from ptqkit.tools import export as tx

pytestmark = pytest.mark.cifar10


@pytest.fixture(scope="module")
def w4a4_run(tmp_path_factory):
    """A run folder (config, results, quantized_model.pt) of a naive W4A4 ResNet-20 evaluated on 200 images."""
    from ptqkit import pipeline
    from ptqkit.config import validate
    cfg = validate(base_tree(data={"calibration": {"num_images": 64}, "evaluation": {"limit": 200}}))
    run_dir = str(tmp_path_factory.mktemp("w4a4_run"))
    pipeline.run(cfg, run_dir, show_progress=False)
    return run_dir


def test_academic_export_agrees_with_pytorch(w4a4_run, tmp_path):
    import onnx
    out = str(tmp_path / "export")
    result = tx.export_run(w4a4_run, images=200, out_dir=out, threads=torch.get_num_threads())
    assert result["images"] == 200
    assert result["top1_agreement_pct"] >= 99.5, result
    assert result["max_abs_logit_diff"] < 5.0 and result["mean_abs_logit_diff"] < 0.05
    assert result["top1_pytorch"] > 60.0  # a working W4A4 model
    with open(os.path.join(out, "export_check.json")) as f:
        assert json.load(f)["top1_agreement_pct"] == result["top1_agreement_pct"]

    academic = onnx.load(result["onnx_mqbench_academic"])
    custom = [n for n in academic.graph.node if n.domain == tx.CUSTOM_DOMAIN]
    assert len(custom) == 20 and {n.op_type for n in custom} == {"FixedPerChannelAffine"}  # 19 convs + linear
    runnable = onnx.load(result["onnx_checked"])
    ops = [n.op_type for n in runnable.graph.node]
    assert not any(n.domain == tx.CUSTOM_DOMAIN for n in runnable.graph.node)
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 20
    assert ops.count("Clip") >= 18  # 4-bit weights clamp to 0..15 inside uint8; the 8-bit first/last need none
    assert result["replaced_custom_nodes"] == {"FixedPerChannelAffine": 20}


def test_qdq_rewrite_reproduces_the_4bit_weights(w4a4_run, tmp_path):
    """The rewritten weight path alone: the dequantized weights equal the fake-quantized PyTorch weights."""
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from ptqkit.saving import load_quantized
    result = tx.export_run(w4a4_run, images=8, out_dir=str(tmp_path), threads=1)
    model = onnx.load(result["onnx_checked"])
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "layer1.0.conv1" in n.input[1])
    model.graph.output.append(helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    weights = session.run([dq.output[0]], {"input": torch.zeros(1, 3, 32, 32).numpy()})[0]
    qmodel, _ = load_quantized(os.path.join(w4a4_run, "quantized_model.pt"))
    layer = dict(qmodel.named_modules())["layer1.0.conv1"]
    with torch.no_grad():
        expected = layer.weight_fake_quant(layer.weight).numpy()
    assert (weights == expected).all()
    assert len(set(weights[0].round(6).ravel().tolist())) <= 16  # 4 bits per output channel


def test_legacy_exporter_patch_is_restored():
    original = torch.onnx.export
    with pytest.raises(RuntimeError):
        with tx.legacy_onnx_exporter():
            assert torch.onnx.export is not original
            raise RuntimeError("boom")
    assert torch.onnx.export is original


def test_broken_or_unavailable_backends_say_why():
    with pytest.raises(tx.ExportError, match=r"^backend onnx_qnn: the ONNX_QNN export of mqbench-torch2 0\.1\.1 is "
                                             r"broken .*; use academic$"):
        tx.check_backend("onnx_qnn")
    missing = tx.tensorrt_missing()
    if not missing:
        pytest.skip("polygraphy, onnx-graphsurgeon and numpy < 2.4 are all present here")
    with pytest.raises(tx.ExportError, match=r"^backend tensorrt needs .*; --backend academic needs none$"):
        tx.check_backend("tensorrt")


def test_cli_errors_are_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ptqkit.tools.export", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: run '{tmp_path}': no quantized_model.pt (was runtime.save_model false?)"
