"""Resume and interruption, end to end through ptq_main.py on ResNet-20 with the assets' checkpoint and images:
a run killed with SIGKILL in the middle of a unit and continued with --resume ends exactly where an uninterrupted
run of the same seed ends; SIGINT stops with a one-line message naming what was saved and how to continue."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import REPO, base_tree, small_run_config

pytestmark = pytest.mark.cifar10

ITERS = 40


def _config(tmp_path, name: str) -> str:
    return small_run_config(tmp_path, name, {"name": "qdrop", "iters": ITERS, "act_init_images": 32}, "hist_mse",
                            images=64, seed=7)


def _cmd(*args):
    return [sys.executable, os.path.join(REPO, "ptq_main.py"), "--quiet", *args]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _start_and_stop_mid_unit(tmp_path, name: str, sig: int, units_before: int = 3):
    """Start a run, wait until `units_before` units are saved and the next one is under way, send `sig`."""
    # A shell that starts pytest in the background (`cmd &` without job control) leaves SIGINT ignored, and an
    # ignored signal stays ignored across exec: give the run the default disposition an interactive Ctrl-C meets.
    proc = subprocess.Popen(_cmd("--config", _config(tmp_path, name)), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = tmp_path / name
    progress = run_dir / "progress.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists():
            saved = torch.load(progress, weights_only=True)
            if len(saved["history"]) >= units_before:
                break
        time.sleep(0.2)
    time.sleep(0.3)  # into the next unit's iterations
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.stderr.read()[-500:]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, run_dir


def _results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_sigkill_mid_unit_then_resume_matches_an_uninterrupted_run(tmp_path):
    full = subprocess.run(_cmd("--config", _config(tmp_path, "full")), cwd=REPO, env=_env(),
                          capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    reference = _results(tmp_path / "full")

    code, _, _, run_dir = _start_and_stop_mid_unit(tmp_path, "killed", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    done_before = len(torch.load(run_dir / "progress.pt", weights_only=True)["history"])
    assert 3 <= done_before < len(reference["algorithm_results"]["units"])

    resumed = subprocess.run(_cmd("--resume", str(run_dir)), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = _results(run_dir)
    assert result["resumed"]["after_unit"] == done_before - 1
    units = lambda r: [(u["name"], u["final_rec_loss"]) for u in r["algorithm_results"]["units"]]  # noqa: E731
    assert units(result) == units(reference)          # every unit, the skipped ones and the redone ones, bit-exact
    assert result["quant"]["top1"] == reference["quant"]["top1"]
    assert result["fp32"]["top1"] == reference["fp32"]["top1"]
    assert "resuming after unit" in (run_dir / "log.txt").read_text()


@pytest.mark.slow
def test_sigint_stops_cleanly_with_what_is_done_saved(tmp_path):
    code, _, err, run_dir = _start_and_stop_mid_unit(tmp_path, "interrupted", signal.SIGINT, units_before=2)
    assert code == 130
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[-1].startswith("interrupted; ") and f"--resume {run_dir}" in lines[-1], lines[-1]
    saved = torch.load(run_dir / "progress.pt", weights_only=True)
    assert len(saved["history"]) >= 2 and f"last: {saved['history'][-1]['name']}" in lines[-1]
    assert not (run_dir / "results.json").exists()
    assert (run_dir / "config.yaml").exists()


def _main(capsys, *args):
    import ptq_main
    code = ptq_main.main(list(args))
    return code, capsys.readouterr().err.strip()


def test_resume_refuses_a_missing_finished_or_foreign_folder(tmp_path, capsys):
    assert _main(capsys, "--resume", str(tmp_path / "nowhere")) == \
        (2, f"error: run folder '{tmp_path / 'nowhere'}': not found")
    folder = tmp_path / "naive_run"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(base_tree()))
    code, err = _main(capsys, "--resume", str(folder))
    assert code == 2 and err.startswith(f"error: resume state '{folder / 'progress.pt'}': not found (")
    (folder / "progress.pt").write_bytes(b"not a checkpoint")
    code, err = _main(capsys, "--resume", str(folder))
    assert code == 2 and err.startswith(f"error: resume state '{folder / 'progress.pt'}': cannot be read (")
    assert len(err.splitlines()) == 1
    (folder / "results.json").write_text("{}")
    assert _main(capsys, "--resume", str(folder)) == \
        (2, f"error: run folder '{folder}': already finished (results.json is there)")


def test_progress_carries_numpys_random_state_for_the_fixed_batch_draw(tmp_path):
    """batch_draw fixed draws from numpy's generator (as MQBench does), so a resumed run needs numpy's state too."""
    import numpy as np
    import torch.nn as nn
    from ptqkit.algorithms.progress import read_progress, restore_progress, save_progress
    model, path = nn.Linear(2, 2), str(tmp_path / "progress.pt")
    np.random.seed(3)
    np.random.rand()
    save_progress(path, model, 0, 0, ["p"], ["u"], [])
    expected = np.random.randint(0, 32, 20)
    np.random.rand(7)
    restore_progress(read_progress(path), model, ["p"], ["u"])
    assert np.array_equal(np.random.randint(0, 32, 20), expected)
