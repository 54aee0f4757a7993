"""Mixed precision under a budget (docs/MIXED_PRECISION.md): the knapsack solver against brute force, the budget
arithmetic on ResNet-20, and `quant.mixed` through a whole run — allocation applied, recorded, saved and reloaded,
resumed, exported to ONNX and checked with onnxruntime."""
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import base_tree, run_main
from ptqkit.errors import ConfigError
from ptqkit.quant import allocate, size


# ------------------------------------------------------------------------------------------------- solver
def _brute(costs, weights, capacity):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        if sum(weights[g][j] for g, j in enumerate(combo)) <= capacity:
            value = sum(costs[g][j] for g, j in enumerate(combo))
            best = value if best is None or value < best else best
    return best


def _value(costs, choice):
    return sum(costs[g][j] for g, j in enumerate(choice))


def _used(weights, choice):
    return sum(weights[g][j] for g, j in enumerate(choice))


def test_exact_solver_matches_brute_force_on_random_cases():
    rng = np.random.default_rng(1005)
    checked = infeasible = 0
    for _ in range(150):
        groups, options = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        costs = [list(rng.random(options) * 10 ** rng.uniform(-4, 1)) for _ in range(groups)]
        weights = [sorted(rng.integers(1, 60, options).tolist()) for _ in range(groups)]
        capacity = int(rng.integers(groups, 60 * groups))
        best = _brute(costs, weights, capacity)
        if best is None:
            with pytest.raises(allocate.InfeasibleBudget):
                allocate.solve_exact(costs, weights, capacity)
            infeasible += 1
            continue
        choice = allocate.solve_exact(costs, weights, capacity)
        assert _used(weights, choice) <= capacity
        assert _value(costs, choice) == pytest.approx(best, rel=1e-9, abs=1e-12)
        greedy = allocate.solve_greedy(costs, weights, capacity)
        assert _used(weights, greedy) <= capacity and _value(costs, greedy) >= best - 1e-12
        checked += 1
    assert checked > 60 and infeasible > 0


def test_exact_solver_is_exact_with_large_integer_weights():
    """BOPs-sized weights (1e9 and more): the capacity is checked in integers, never within a tolerance."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        costs = [list(rng.random(3)) for _ in range(6)]
        weights = [[int(m) * b * 4 for b in (2, 3, 4)] for m in rng.integers(10 ** 8, 10 ** 9, 6)]
        capacity = int(sum(w[1] for w in weights))
        choice = allocate.solve_exact(costs, weights, capacity)
        assert _used(weights, choice) <= capacity
        assert _value(costs, choice) == pytest.approx(_brute(costs, weights, capacity), rel=1e-9)


def test_infeasible_budget_is_one_error():
    with pytest.raises(allocate.InfeasibleBudget) as err:
        allocate.solve_exact([[1.0, 0.5], [2.0, 0.1]], [[2, 4], [2, 4]], 3)
    assert err.value.least == 4 and "\n" not in str(err.value)
    with pytest.raises(allocate.InfeasibleBudget):
        allocate.solve_greedy([[1.0, 0.5]], [[2, 4]], 1)


def test_greedy_raises_the_largest_error_per_added_cost_first():
    # layer 0: large error, many parameters; layer 1: smaller error, few parameters -> per parameter, layer 1 first
    costs = [[10.0, 1.0], [2.0, 0.5]]
    weights = [[200, 300], [2, 3]]     # 100 and 1 parameters: +1 bit costs 100 and 1
    assert allocate.solve_greedy(costs, weights, 203) == [0, 1]
    assert allocate.solve_greedy(costs, weights, 303) == [1, 1]


# ----------------------------------------------------------------------------------------- budget arithmetic
def test_budget_units():
    assert size.layer_cost("avg_w_bits", 100, 5000, 3, 4) == 300
    assert size.layer_cost("w_bytes", 100, 5000, 3, 4) == 300
    assert size.layer_cost("bops", 100, 5000, 3, 4) == 5000 * 3 * 4
    assert size.layer_cost("bops", 100, 5000, 3, None) == 5000 * 3 * 32
    assert size.capacity("avg_w_bits", 2.5, 1000) == 2500
    assert size.capacity("w_bytes", 100.5, 1000) == 804
    assert size.capacity("bops", 6.5e8, 1000) == 650_000_000
    assert size.in_budget_units("avg_w_bits", 2500, 1000) == 2.5
    assert size.in_budget_units("w_bytes", 804, 1000) == 100.5


@pytest.mark.cifar10
def test_size_of_resnet20_at_w4a4(resnet20, cifar_calib):
    """Known figures: 268,336 conv/linear weights, 40,551,040 MACs per 32x32 image; first conv and linear at 8
    bits (weights), their inputs at 8 bits (network input, last layer's input), the rest W4A4."""
    from ptqkit import sensitivity
    from ptqkit.config import validate
    from ptqkit.quant.prepare import prepare_quantized
    cfg = validate(base_tree())
    qmodel, _ = prepare_quantized(resnet20, cfg.quant)
    out = sensitivity.model_size(qmodel, cifar_calib[:1])
    assert out["params"] == 268_336 and out["macs"] == 40_551_040
    first, last = 432, 640                       # conv1 3x3x3x16, linear 64x10
    assert out["avg_w_bits"] == pytest.approx(((first + last) * 8 + (268_336 - first - last) * 4) / 268_336)
    assert out["w_bytes"] == ((first + last) * 8 + (268_336 - first - last) * 4) / 8
    conv1_macs, linear_macs = 32 * 32 * 16 * 27, 640
    assert out["layers"]["conv1"]["macs"] == conv1_macs and out["layers"]["linear"]["macs"] == linear_macs
    rest = 40_551_040 - conv1_macs - linear_macs
    assert out["bops"] == (conv1_macs + linear_macs) * 8 * 8 + rest * 4 * 4 == 670_081_024


# ------------------------------------------------------------------------------------- quant.mixed in a run
def _fake_sensitivity(path, layers, bits=(2, 3, 4, 8)):
    """A sensitivity.json whose weight KL falls with the bits and grows with the layer's depth."""
    rows = [{"layer": name, "what": "w", "bits": b, "kl": (i + 1) / 2 ** b, "top1_drop": float(i) / b,
             "logit_mse": 0.0, "top1": 0.0, "agree": 100.0}
            for i, name in enumerate(layers) for b in bits]
    path.write_text(json.dumps({"format": "ptqkit-sensitivity-v1", "model": "cifar_resnet20", "rows": rows}))
    return str(path)


RESNET20_LAYERS = ["conv1"] + [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)] + \
    ["linear"]


@pytest.mark.cifar10
def test_infeasible_budget_is_one_line_naming_the_least(tmp_path, resnet20, cifar_calib):
    from ptqkit import sensitivity
    from ptqkit.config import validate
    sens = _fake_sensitivity(tmp_path / "s.json", RESNET20_LAYERS)
    cfg = validate(base_tree(quant={"mixed": {"budget": {"avg_w_bits": 2.0}, "sensitivity": sens}}))
    with pytest.raises(ConfigError) as err:
        sensitivity.plan_mixed(cfg, resnet20, cifar_calib[:1], sensitivity.load_sensitivity(sens), sens)
    assert str(err.value) == ("config key 'quant.mixed.budget.avg_w_bits': expected a budget of at least 2.02397 "
                              "(every free layer at 2 bits; fixed layers and their bits: conv1 8, linear 8), got 2.0")


@pytest.mark.cifar10
@pytest.mark.parametrize("kind,value", [("avg_w_bits", 3.0), ("w_bytes", 100_000.0), ("bops", 5.0e8)])
def test_plan_respects_each_budget_and_fixes_the_convention_layers(tmp_path, resnet20, cifar_calib, kind, value):
    from ptqkit import sensitivity
    from ptqkit.config import validate
    sens = _fake_sensitivity(tmp_path / "s.json", RESNET20_LAYERS)
    cfg = validate(base_tree(quant={"mixed": {"budget": {kind: value}, "sensitivity": sens, "candidates": [2, 3, 4]},
                                    "layers": [{"match": "layer3.2.conv2", "w": {"bits": 8}}]}))
    plan = sensitivity.plan_mixed(cfg, resnet20, cifar_calib[:1], sensitivity.load_sensitivity(sens), sens)
    assert plan["fixed"] == {"conv1": 8, "layer3.2.conv2": 8, "linear": 8}   # conventions and the config's entry
    assert set(plan["allocation"]) == set(RESNET20_LAYERS) - set(plan["fixed"])
    assert set(plan["allocation"].values()) <= {2, 3, 4}
    assert plan["budget"]["used"] <= value
    # the greedy baseline on the same problem stays within the budget and is never better than the exact solver
    greedy = validate(base_tree(quant={"mixed": {"budget": {kind: value}, "sensitivity": sens, "solver": "greedy"},
                                       "layers": [{"match": "layer3.2.conv2", "w": {"bits": 8}}]}))
    g = sensitivity.plan_mixed(greedy, resnet20, cifar_calib[:1], sensitivity.load_sensitivity(sens), sens)
    assert g["budget"]["used"] <= value and plan["objective"] <= g["objective"] + 1e-12


def _run_config(tmp_path, name, quant, algorithm=None):
    tree = base_tree(quant=quant, algorithm=algorithm or {"name": "naive"},
                     runtime={"output_dir": str(tmp_path / name), "threads": 1, "seed": 1005})
    tree["data"]["calibration"]["num_images"] = 64
    tree["data"]["evaluation"].update(limit=200, workers=0)
    return tree


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """A naive run of ResNet-20 with quant.mixed (avg 3 weight bits from {2, 3, 4}) over a given sensitivity."""
    from ptqkit import pipeline
    from ptqkit.config import validate
    tmp_path = tmp_path_factory.mktemp("mixed")
    sens = _fake_sensitivity(tmp_path / "sens.json", RESNET20_LAYERS)
    cfg = validate(_run_config(tmp_path, "run", {"mixed": {"budget": {"avg_w_bits": 3.0}, "sensitivity": sens}}))
    run_dir = pipeline.new_run_dir(cfg.runtime.output_dir)
    results = pipeline.run(cfg, run_dir, show_progress=False)
    return run_dir, results


@pytest.mark.cifar10
def test_mixed_run_records_allocation_size_and_a_resolved_config(mixed_run):
    from ptqkit.config import load_config
    run_dir, results = mixed_run
    mp = results["mixed_precision"]
    assert mp["budget"]["kind"] == "avg_w_bits" and mp["budget"]["used"] <= 3.0
    assert results["size"]["avg_w_bits"] == pytest.approx(mp["budget"]["used"])
    assert set(mp["allocation"].values()) <= {2, 3, 4} and len(set(mp["allocation"].values())) > 1
    for layer, bits in mp["allocation"].items():
        assert results["size"]["layers"][layer]["w_bits"] == bits
    assert results["size"]["layers"]["conv1"]["w_bits"] == 8 and results["size"]["layers"]["linear"]["w_bits"] == 8
    # labelled by the bits its layers span, not by the uniform default it started from
    assert results["bits"] == f"per-layer W2-8A4-8 (average {results['size']['avg_w_bits']:.2f} weight bits)"
    # the run folder's config builds the allocated model as it is: allocation as quant.layers, mixed off
    saved = load_config(os.path.join(run_dir, "config.yaml"))
    assert not saved.quant.mixed.enabled
    assert {e.match: e.w.bits for e in saved.quant.layers} == mp["allocation"]
    assert json.load(open(os.path.join(run_dir, "mixed_precision.json")))["allocation"] == mp["allocation"]
    # allocation.yaml is a quant.layers block another config can include
    alloc = yaml.safe_load(open(os.path.join(run_dir, "allocation.yaml")))
    assert {e["match"]: e["w"]["bits"] for e in alloc["quant"]["layers"]} == mp["allocation"]


@pytest.mark.cifar10
def test_allocation_yaml_is_includable(mixed_run, tmp_path):
    from ptqkit.config import load_config
    run_dir, results = mixed_run
    shutil.copy(os.path.join(run_dir, "allocation.yaml"), tmp_path / "allocation.yaml")
    tree = base_tree()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"_base_": "allocation.yaml", **tree}))
    cfg = load_config(str(tmp_path / "cfg.yaml"))
    assert {e.match: e.w.bits for e in cfg.quant.layers} == results["mixed_precision"]["allocation"]


@pytest.mark.cifar10
def test_mixed_model_saved_and_reloaded_gives_the_same_logits(mixed_run, cifar_test_set):
    from ptqkit.saving import load_quantized
    from ptqkit.tools.export import evaluation_images
    run_dir, results = mixed_run
    qmodel, cfg = load_quantized(os.path.join(run_dir, "quantized_model.pt"))
    modules = dict(qmodel.named_modules())
    for layer, bits in results["mixed_precision"]["allocation"].items():
        assert modules[layer].weight_fake_quant.bitwidth == bits
    images, labels = cifar_test_set
    with torch.no_grad():
        first = qmodel(images[:200])
        again, _ = load_quantized(os.path.join(run_dir, "quantized_model.pt"))
        assert torch.equal(first, again(images[:200]))
    # and the reloaded model is the one the run evaluated: the same top-1 on the run's 200 evaluation images
    pixels, targets = evaluation_images(cfg, 200)
    with torch.no_grad():
        top1 = 100.0 * (qmodel(pixels).argmax(1) == targets).float().mean().item()
    assert top1 == pytest.approx(results["quant"]["top1"])


@pytest.mark.cifar10
def test_mixed_model_exports_to_onnx_and_onnxruntime_agrees(mixed_run, tmp_path):
    from ptqkit.tools.export import export_run
    run_dir, _ = mixed_run
    r = export_run(run_dir, images=200, out_dir=str(tmp_path / "export"), threads=1)
    assert r["top1_agreement_pct"] >= 99.0
    import onnx
    model = onnx.load(r["onnx_checked"])
    ranges = {}
    for node in model.graph.node:
        if node.op_type == "Clip" and node.name.endswith("/Clip") and ".weight/" in node.name:
            init = {i.name: i for i in model.graph.initializer}
            hi = onnx.numpy_helper.to_array(init[node.input[2]])
            ranges[node.name.split(".weight/")[0]] = int(hi)
    # the 2- and 3-bit layers' integer ranges are in the graph (0..3, 0..7); 8-bit ones need no Clip
    assert {3, 7} <= set(ranges.values())


class _Stopped(Exception):
    pass


@pytest.mark.cifar10
@pytest.mark.slow   # two QDrop runs and a resume
def test_a_mixed_qdrop_run_stopped_and_resumed_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """The run folder's config.yaml holds the allocation as quant.layers: a resumed run rebuilds the same mixed
    model, loads the saved units into it and ends where an uninterrupted run of the same seed ends."""
    import ptq_main
    from ptqkit import pipeline
    from ptqkit.algorithms import progress
    from ptqkit.config import validate
    sens = _fake_sensitivity(tmp_path / "sens.json", RESNET20_LAYERS)
    quant = {"mixed": {"budget": {"avg_w_bits": 3.0}, "sensitivity": sens},
             "layers": [{"match": "layer3.2.conv2", "a": {"bits": 6}}]}
    qdrop = {"name": "qdrop", "iters": 3, "log_every": 1, "act_init_images": 16}

    def start(name):
        tree = _run_config(tmp_path, name, quant, qdrop)
        tree["data"]["calibration"]["num_images"] = 32
        cfg = validate(tree)
        return cfg, pipeline.new_run_dir(cfg.runtime.output_dir)

    cfg, full_dir = start("full")
    reference = pipeline.run(cfg, full_dir, show_progress=False)

    save = progress.save_progress

    def save_then_stop(path, qmodel, phase, unit, *args):
        save(path, qmodel, phase, unit, *args)
        if unit == 3:
            raise _Stopped

    monkeypatch.setattr(progress, "save_progress", save_then_stop)
    cfg, run_dir = start("stopped")
    with pytest.raises(_Stopped):
        pipeline.run(cfg, run_dir, show_progress=False)
    monkeypatch.setattr(progress, "save_progress", save)
    assert ptq_main.main(["--resume", run_dir, "--quiet"]) == 0
    result = json.load(open(os.path.join(run_dir, "results.json")))
    assert result["resumed"]["after_unit"] == 3
    assert result["mixed_precision"]["allocation"] == reference["mixed_precision"]["allocation"]
    assert result["size"]["layers"] == reference["size"]["layers"]
    assert result["size"]["layers"]["layer3.2.conv2"]["a_bits"] == 6
    units = lambda r: [(u["name"], u["final_rec_loss"]) for u in r["algorithm_results"]["units"]]  # noqa: E731
    assert units(result) == units(reference)
    assert result["quant"]["top1"] == reference["quant"]["top1"]


@pytest.mark.cifar10
def test_dry_run_with_a_sensitivity_file_prints_the_allocated_layers(tmp_path, capsys):
    sens = _fake_sensitivity(tmp_path / "sens.json", RESNET20_LAYERS)
    tree = base_tree(quant={"mixed": {"budget": {"avg_w_bits": 3.0}, "sensitivity": sens}},
                     runtime={"output_dir": str(tmp_path / "run")})
    tree["data"]["calibration"]["num_images"] = 8
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    status, out, err = run_main(capsys, "--config", str(tmp_path / "cfg.yaml"), "--dry-run")
    assert status == 0, err[-2000:]
    lines = out.splitlines()
    plan = next(line for line in lines if line.startswith("mixed precision: "))
    assert plan.startswith("mixed precision: budget avg_w_bits 3 (used 2.9") and f"sensitivity {sens}" in plan
    head = lines.index(next(line for line in lines if line.startswith("per-layer quantization")))
    rows = {line.split()[0]: line.split() for line in lines[head + 2:head + 22]}
    bits = {name: int(row[4]) for name, row in rows.items()}
    assert list(bits) == RESNET20_LAYERS and bits["conv1"] == bits["linear"] == 8 and set(bits.values()) == {2, 3, 4, 8}
    assert all("w from layers[" in " ".join(rows[name]) for name in RESNET20_LAYERS[1:-1])
    assert not os.path.exists(tmp_path / "run")
