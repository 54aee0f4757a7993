"""One real reconstruction run end to end through the command, in the fast tier: ptq_main.py with QDrop on the
assets' ResNet-20 checkpoint and CIFAR-10 images (a short budget), results written and measured beside FP32, and
better than round-to-nearest from the same calibration images."""
import json
import subprocess
import sys

import yaml

from conftest import REPO, small_run_config
from ptqkit import pipeline
from ptqkit.config import validate
import pytest

pytestmark = pytest.mark.cifar10

SETTINGS = ["quant.w.bits=2", "runtime.threads=1", "data.evaluation.limit=500"]   # one thread: one xdist worker


@pytest.mark.slow   # a whole QDrop run in a subprocess (the daily tier has the engine's own tests)
def test_qdrop_runs_end_to_end_and_beats_round_to_nearest(tmp_path):
    config = small_run_config(tmp_path, "qdrop", {"name": "qdrop", "iters": 150, "act_init_images": 64}, "hist_mse",
                              images=64, seed=3)
    proc = subprocess.run([sys.executable, "ptq_main.py", "--quiet", "--config", config,
                           *[arg for s in SETTINGS for arg in ("--set", s)]],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(f"-> {tmp_path / 'qdrop'}")
    qdrop = json.loads((tmp_path / "qdrop" / "results.json").read_text())
    assert qdrop["quant"]["images"] == 500 and qdrop["fp32"]["images"] == 500
    assert [u["name"] for u in qdrop["algorithm_results"]["units"]][:2] == ["conv1", "layer1.0"]
    assert (tmp_path / "qdrop" / "quantized_model.pt").exists() and (tmp_path / "qdrop" / "progress.pt").exists()
    # round to nearest from the same config, in this process
    tree = yaml.safe_load(open(config))
    tree["algorithm"] = {"name": "naive"}
    tree["quant"]["w"]["bits"], tree["data"]["evaluation"]["limit"] = 2, 500
    (tmp_path / "naive").mkdir()
    naive = pipeline.run(validate(tree), str(tmp_path / "naive"), show_progress=False)
    assert naive["fp32"] == qdrop["fp32"]
    # W2A4: round to nearest collapses; 150 iterations per unit recover a good part of it
    assert qdrop["quant"]["top1"] > naive["quant"]["top1"] + 10, (naive["quant"], qdrop["quant"])
