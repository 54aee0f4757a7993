"""ptqkit.tools.compare on hand-made results.json files: the numbers in the table, seed aggregation, variant columns,
refusal of mismatched runs (exact message), --allow-mixed marks, per-unit loss plots; ptqkit.tools.sweep's planning."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, base_tree
from ptqkit.config import deep_merge
from ptqkit.tools import compare
from ptqkit.tools.compare import MixedRunsError

pytestmark = pytest.mark.cifar10


def make_run(root, name, *, algorithm="naive", w=4, a=4, top1=75.0, fp32=81.03, images=10000, config=None,
             units=None) -> str:
    """A run folder with a results.json in the pipeline's format."""
    tree = deep_merge(base_tree(quant={"w": {"bits": w}, "a": {"bits": a}}, algorithm={"name": algorithm}),
                      config or {})
    results = {"model": "cifar_resnet20", "algorithm": algorithm, "bits": f"W{w}A{a}",
               "fp32": {"top1": fp32, "top5": 98.7, "images": images},
               "quant": {"top1": top1, "top5": 98.0, "images": images},
               "evaluation_images": images, "config": tree, "algorithm_results": {}}
    if units is not None:
        results["algorithm_results"]["units"] = units
    path = os.path.join(str(root), name)
    os.makedirs(path)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(results, f)
    return path


def units_of(n=3, iters=(0, 100, 200, 300)):
    return [{"name": f"layer{k + 1}", "iterations": iters[-1], "final_rec_loss": 0.1 / (k + 1),
             "history": {"iter": list(iters), "rec": [1.0 / (k + 1) / (i + 1) for i in range(len(iters))],
                         "round": [50.0 - 10 * i for i in range(len(iters))]}} for k in range(n)]


def test_table_numbers_and_seed_aggregation(tmp_path):
    runs = [make_run(tmp_path, "naive_w4", top1=75.84),
            make_run(tmp_path, "naive_w2", w=2, top1=24.75),
            make_run(tmp_path, "qdrop_w4_s1", algorithm="qdrop", top1=70.0),
            make_run(tmp_path, "qdrop_w4_s2", algorithm="qdrop", top1=71.0, config={"runtime": {"seed": 7}}),
            make_run(tmp_path, "qdrop_w4_s3", algorithm="qdrop", top1=72.0,
                     config={"runtime": {"seed": 8}, "data": {"calibration": {"batch_size": 64}}}),
            make_run(tmp_path, "naive_w8", w=8, a=8, top1=80.96, config={"quant": {"w": {"observer": "minmax"}}})]
    table, written = compare.compare([str(tmp_path)], str(tmp_path / "out"))
    assert [r.bits for r in table.rows] == ["W8A8", "W4A4", "W2A4"]
    assert table.columns == ["naive", "qdrop"]  # an observer that differs between rows is no variant
    w4 = next(r for r in table.rows if r.bits == "W4A4")
    cell = table.cells[(w4, "qdrop")]
    assert cell.n == 3 and cell.mean == pytest.approx(71.0) and cell.std == pytest.approx(1.0)
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| model × bits | FP32 top-1 | naive | qdrop |" in md
    assert "| cifar_resnet20 W4A4 | 81.03 | 75.84 | 71.00 ± 1.00 (n=3) |" in md
    assert "| cifar_resnet20 W2A4 | 81.03 | 24.75 | – |" in md
    with open(tmp_path / "out" / "table.csv") as f:
        rows = list(csv.DictReader(f))
    w4_csv = next(r for r in rows if r["bits"] == "W4A4")
    assert float(w4_csv["fp32_top1"]) == pytest.approx(81.03)
    assert float(w4_csv["qdrop top1"]) == pytest.approx(71.0) and float(w4_csv["qdrop std"]) == pytest.approx(1.0)
    assert w4_csv["qdrop n"] == "3" and float(w4_csv["naive top1"]) == pytest.approx(75.84)
    assert next(r for r in rows if r["bits"] == "W2A4")["qdrop n"] == "0"
    assert {os.path.basename(p) for p in written} == {"table.md", "table.csv", "accuracy.png"}
    assert os.path.getsize(tmp_path / "out" / "accuracy.png") > 10_000


def test_hyperparameter_variants_get_their_own_columns(tmp_path):
    make_run(tmp_path, "a", algorithm="qdrop", top1=70.0, config={"algorithm": {"prob": 0.5}})
    make_run(tmp_path, "b", algorithm="qdrop", top1=68.0, config={"algorithm": {"prob": 1.0}})
    make_run(tmp_path, "c", algorithm="qdrop", w=2, top1=50.0, config={"algorithm": {"prob": 0.5}})
    table = compare.build_table([compare.load_run(p) for p in compare.find_runs([str(tmp_path / "*")])])
    assert table.columns == ["qdrop (prob=0.5)", "qdrop (prob=1)"]
    w2 = next(r for r in table.rows if r.bits == "W2A4")
    assert table.cells[(w2, "qdrop (prob=0.5)")].values == [50.0]


def test_a_key_older_runs_lack_does_not_split_them_into_columns(tmp_path):
    """A run made before a key existed ran as its default does: it joins the runs that record the default
    (act_init_images stands for such a key: qdrop's default is 256)."""
    old = make_run(tmp_path, "old", algorithm="qdrop", top1=70.0, config={"algorithm": {"act_init_images": 256}})
    with open(os.path.join(old, "results.json")) as f:
        results = json.load(f)
    del results["config"]["algorithm"]["act_init_images"]
    with open(os.path.join(old, "results.json"), "w") as f:
        json.dump(results, f)
    make_run(tmp_path, "new", algorithm="qdrop", top1=72.0, config={"algorithm": {"act_init_images": 256}})
    make_run(tmp_path, "other", algorithm="qdrop", top1=60.0, config={"algorithm": {"act_init_images": 0}})
    table = compare.build_table([compare.load_run(p) for p in compare.find_runs([str(tmp_path / "*")])])
    assert sorted(table.columns) == ["qdrop (act_init_images=0)", "qdrop (act_init_images=256)"]
    assert sorted(table.cells[(table.rows[0], "qdrop (act_init_images=256)")].values) == [70.0, 72.0]


def test_a_quant_key_older_runs_lack_takes_its_default_too(tmp_path):
    """The same for a key of another section (quant.a.bound_grad, added after most runs were made)."""
    make_run(tmp_path, "old", algorithm="qdrop", top1=70.0)
    make_run(tmp_path, "new", algorithm="qdrop", top1=72.0, config={"quant": {"a": {"bound_grad": "pass"}}})
    make_run(tmp_path, "stop", algorithm="qdrop", top1=74.0, config={"quant": {"a": {"bound_grad": "stop"}}})
    table = compare.build_table([compare.load_run(p) for p in compare.find_runs([str(tmp_path / "*")])])
    assert sorted(table.columns) == ["qdrop (quant.a.bound_grad=pass)", "qdrop (quant.a.bound_grad=stop)"]
    assert sorted(table.cells[(table.rows[0], "qdrop (quant.a.bound_grad=pass)")].values) == [70.0, 72.0]


def test_mismatched_runs_are_refused_with_their_difference(tmp_path):
    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", images=1000, fp32=80.5, config={"data": {"evaluation": {"limit": 1000}}})
    runs = [compare.load_run(a), compare.load_run(b)]
    message = (f"runs are not comparable: '{b}' differs from '{a}' in data.evaluation.limit (1000 vs null), "
               "fp32.top1 (80.5 vs 81.03), evaluation images (1000 vs 10000); pass --allow-mixed to tabulate them "
               "anyway (rows marked by setting)")
    with pytest.raises(MixedRunsError, match="^" + re.escape(message) + "$"):
        compare.build_table(runs)
    table = compare.build_table(runs, allow_mixed=True)
    md = compare.to_markdown(table)
    assert "| cifar_resnet20 W4A4 [S1] | 81.03 | 75.00 |" in md
    assert "| cifar_resnet20 W4A4 [S2] | 80.50 | 75.00 |" in md
    assert "S2 differs from S1 in data.evaluation.limit = 1000 (S1: null)" in md


def test_other_checkpoint_or_calibration_draw_is_refused(tmp_path):
    a = compare.load_run(make_run(tmp_path, "a"))
    b = compare.load_run(make_run(tmp_path, "b", config={"data": {"calibration": {"num_images": 1024}}}))
    with pytest.raises(MixedRunsError, match=r"in data\.calibration\.num_images \(1024 vs 256\);"):
        compare.build_table([a, b])
    # other calibration images are another measurement, not a repeat to average
    d = compare.load_run(make_run(tmp_path, "d", config={"data": {"calibration": {"seed": 2}}}))
    with pytest.raises(MixedRunsError, match=r"in data\.calibration\.seed \(2 vs "):
        compare.build_table([a, d])
    c = compare.load_run(make_run(tmp_path, "c", config={"model": {"checkpoint": "/elsewhere/resnet20.th"}}))
    with pytest.raises(MixedRunsError, match=r"in model\.checkpoint \(/elsewhere/resnet20\.th vs "):
        compare.build_table([a, c])


def test_loss_plots_with_and_without_units(tmp_path, caplog):
    rec = make_run(tmp_path, "brecq", algorithm="brecq", top1=72.0, units=units_of())
    naive = make_run(tmp_path, "naive", top1=75.0)
    partial = make_run(tmp_path, "adaround", algorithm="adaround", top1=71.0,
                       units=[{"name": "layer1", "iterations": 0, "final_rec_loss": 0.5}])
    _, written = compare.compare([str(tmp_path)], str(tmp_path / "out"), loss_runs=[rec, naive, partial])
    names = {os.path.basename(p) for p in written}
    assert {"losses_brecq.png", "units_final.png"} <= names
    assert "losses_naive.png" not in names and "losses_adaround.png" not in names  # no history to draw
    assert any("recorded no per-unit losses" in r.getMessage() for r in caplog.records)


def test_missing_run_and_bad_results_are_one_line_errors(tmp_path):
    from ptqkit.errors import UserError
    with pytest.raises(UserError, match="not found"):
        compare.find_runs([str(tmp_path / "nope")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps({"model": "m"}))
    with pytest.raises(UserError, match=r"^run '.*bad': results.json lacks 'bits'$"):
        compare.load_run(str(bad))


def _tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_refuses_mixed_runs_in_one_line(tmp_path):
    make_run(tmp_path, "a")
    make_run(tmp_path, "b", config={"data": {"preset": "imagenet"}})
    proc = _tool("ptqkit.tools.compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: runs are not comparable:")
    assert "data.preset (imagenet vs cifar10)" in lines[0]


@pytest.mark.slow
def test_sweep_plans_and_validates_before_running(tmp_path):
    config = os.path.join(REPO, "configs", "cifar10", "resnet20_w4a4_naive.yaml")
    out = tmp_path / "sweep"
    proc = _tool("ptqkit.tools.sweep", "--config", config, "--sweep", "algorithm.name=naive", "quant.w.bits=2,4",
                 "quant.a.bits=4,8", "--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "4 runs, configs valid" in proc.stdout
    assert os.path.join(str(out), "name-naive_w.bits-2_a.bits-8") in proc.stdout
    proc = _tool("ptqkit.tools.sweep", "--config", config, "--sweep", "quant.w.bits=4,9", "--out", str(out))
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip() == ("error: sweep combination bits-9: config key 'quant.w.bits': expected a value in "
                                   "[2, 8], got 9")


def test_sweep_value_splitting():
    from ptqkit.tools.sweep import parse_sweep, split_values
    assert split_values("[1, 2],[3, 4], {a: 1, b: 2},'x,y'") == ["[1, 2]", "[3, 4]", "{a: 1, b: 2}", "'x,y'"]
    assert parse_sweep(["algorithm.name=naive,qdrop"]) == [("algorithm.name", ["naive", "qdrop"])]
