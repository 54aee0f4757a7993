"""MRECG on the real ResNet-20 (the assets' checkpoint, real CIFAR-10 calibration images): scheme checks in one line and
before any calibration, singletons = the base method exactly, the data-free capacity's numbers, deterministic
automatic merging of exactly top_k pairs, the dry run, the ImageNet hand-written schemes against our units, and
the per-unit loss plot."""
import dataclasses
import io
import json
import os
import re
from contextlib import redirect_stdout

import pytest
import torch

from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.mrecg import MRECG
from ptqkit.algorithms.registry import get_algorithm
from conftest import REPO, base_tree
from ptqkit.config import load_config, validate
from ptqkit.errors import ConfigError

pytestmark = pytest.mark.cifar10

CPU = torch.device("cpu")
RESNET20_UNITS = ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["linear"]


def _context(resnet20, images, name="mrecg", **algo):
    # MinMax ranges: what is tested here does not depend on the range search, which dominates the run time.
    quant = {"w": {"bits": 2, "observer": "minmax"}, "a": {"bits": 4, "observer": "minmax"}}
    cfg = validate(base_tree(quant=quant, algorithm={"name": name, **algo}))
    ctx = RunContext(cfg, resnet20, images, torch.zeros(len(images)), CPU, show_progress=False)
    return get_algorithm(name)(cfg.algorithm), ctx


@pytest.mark.parametrize("scheme,problem", [
    ([0, 1, 2, [3, 4], 5, [6, 7], 8, 9], r"unit 10 is missing"),
    ([0, 1, 2, [3, 5], 4, 6, 7, 8, 9, 10], r"group \[3, 5\] is not consecutive"),
    (list(range(12)), r"index 11 is out of range"),
    ([0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], r"unit 1 appears twice"),
    ([1, 0] + list(range(2, 11)), r"the units are out of order"),
])
def test_a_scheme_that_does_not_fit_the_units_fails_in_one_line_before_calibration(resnet20, cifar_calib,
                                                                                   monkeypatch, scheme, problem):
    method, ctx = _context(resnet20, cifar_calib[:32], scheme=scheme)
    from ptqkit.quant import prepare as pq
    monkeypatch.setattr(pq, "calibrate", lambda *a, **k: pytest.fail("calibration started before the check"))
    expected = (r"^config key 'algorithm\.scheme': expected each of the 11 reconstruction units \(indices 0\.\.10\) "
                rf"exactly once, in order, consecutive inside a group \({problem}\), got {re.escape(str(scheme))}$")
    with pytest.raises(ConfigError, match=expected):
        method.run(ctx)


@pytest.mark.parametrize("scheme", ["manual", [], [0, [1, [2]]], [0, -1], [True, 1]])
def test_a_malformed_scheme_fails_when_the_config_is_validated(scheme):
    with pytest.raises(ConfigError, match=r"^config key 'algorithm\.scheme': expected 'auto' or a list of unit "
                                          r"indices and lists of consecutive unit indices, e\.g\. .*, got "):
        validate(base_tree(algorithm={"name": "mrecg", "scheme": scheme}))


def test_top_k_beyond_the_comparable_pairs_fails_in_one_line(resnet20, cifar_calib):
    method, ctx = _context(resnet20, cifar_calib[:32], top_k=9)
    with pytest.raises(ConfigError, match=r"^config key 'algorithm\.top_k': expected at most 8, the comparable "
                                          r"\(topologically homogeneous\) adjacent pairs among this model's 11 "
                                          r"units, got 9$"):
        method.prepare(ctx)


def _run(resnet20, images, name, **algo):
    method, ctx = _context(resnet20, images, name, iters=3, log_every=1, act_init_images=32, **algo)
    torch.manual_seed(1005)
    qmodel = method.run(ctx)
    return ctx.results, qmodel.state_dict()


@pytest.mark.parametrize("base", ["qdrop", "brecq_joint"])
def test_a_scheme_of_singletons_reproduces_the_base_method_exactly(resnet20, cifar_calib, base):
    images = cifar_calib[:64]
    ours, our_state = _run(resnet20, images, "mrecg", base=base, scheme=list(range(11)))
    theirs, their_state = _run(resnet20, images, base)
    assert [u["name"] for u in ours["units"]] == RESNET20_UNITS
    assert ours["mrecg"]["groups"] == [[k] for k in range(11)]
    for a, b in zip(ours["units"], theirs["units"]):
        assert (a["phase"], a["history"], a["final_rec_loss"]) == (b["phase"], b["history"], b["final_rec_loss"])
    assert our_state.keys() == their_state.keys()
    assert all(torch.equal(our_state[k], their_state[k]) for k in our_state)


def test_a_merged_run_records_its_groups(resnet20, cifar_calib):
    results, _ = _run(resnet20, cifar_calib[:64], "mrecg", top_k=2)
    assert results["mrecg"]["merged_pairs"] == [3, 6]
    assert [u["members"] for u in results["units"]] == results["mrecg"]["groups"]
    assert [u["name"] for u in results["units"]][3:6] == ["layer1.2+layer2.0", "layer2.1", "layer2.2+layer3.0"]
    assert all(u["final_rec_loss"] > 0 for u in results["units"])


def test_data_free_capacity_numbers_and_tie_break(resnet20, cifar_calib):
    method, ctx = _context(resnet20, cifar_calib[:32], top_k=2)
    qmodel, _ = method.prepare(ctx)
    units = method.units(qmodel, ctx)
    plan = method.parts[0].make_plan(method, qmodel, method.block_units(qmodel, ctx), ctx)
    caps = dict(zip(plan.base_units, plan.capacities))
    # conv1 and linear: 8-bit weights; blocks: 2-bit; a stride-2 conv counts 0.5 of its weights.
    assert caps["conv1"] == 3 * 16 * 9 * 8 and caps["linear"] == 64 * 10 * 8
    assert caps["layer1.0"] == 2 * 16 * 16 * 9 * 2
    assert caps["layer2.0"] == (0.5 * 16 * 32 * 9 + 32 * 32 * 9) * 2
    assert caps["layer3.1"] == 2 * 64 * 64 * 9 * 2
    diffs = plan.differences
    assert diffs[0] is None and diffs[9] is None                 # stem -> block, block -> classifier
    assert diffs[3] == diffs[6] == pytest.approx(0.916291, abs=1e-6)   # ln 2.5: the two stage entries tie
    assert [u.name for u in units] == ["conv1", "layer1.0", "layer1.1", "layer1.2+layer2.0", "layer2.1",
                                       "layer2.2+layer3.0", "layer3.1", "layer3.2", "linear"]
    method.params.top_k = 1
    assert method.parts[0].make_plan(method, qmodel, method.block_units(qmodel, ctx), ctx).merged_pairs == [3]                       # the tie goes to the earlier pair


@pytest.mark.parametrize("top_k", [1, 3])
def test_loss_capacity_merging_is_deterministic_merges_top_k_pairs_and_restores_state(resnet20, cifar_calib, top_k):
    method, ctx = _context(resnet20, cifar_calib[:64], capacity="loss", probe_images=32, act_init_images=32,
                           top_k=top_k)
    qmodel = method.calibrated_model(ctx, method.phases())
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    plans = []
    for _ in range(2):
        torch.manual_seed(1005)
        units = method.units(qmodel, ctx)
        torch.manual_seed(1005)
        plans.append(method.parts[0].make_plan(method, qmodel, method.block_units(qmodel, ctx), ctx))
        assert len(units) == 11 - top_k
    assert plans[0].groups == plans[1].groups and plans[0].probe_losses == plans[1].probe_losses
    assert len(plans[0].merged_pairs) == top_k
    assert sum(len(g) - 1 for g in plans[0].groups) == top_k
    assert all(loss > 0 for loss in plans[0].probe_losses)
    after = qmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the probe leaves the calibration as it was


@pytest.mark.slow
def test_dry_run_prints_capacities_and_groups():
    import ptq_main
    out = io.StringIO()
    args = ["--config", os.path.join(REPO, "configs/cifar10/resnet20_w4a4_mrecg.yaml"), "--dry-run",
            "--set", "data.calibration.num_images=32", "--set", "algorithm.capacity=params"]
    with redirect_stdout(out):
        assert ptq_main.main(args) == 0
    text = out.getvalue()
    assert re.search(r"^\s+4\s+layer2\.0\s+4\.608e\+04\s+0\.47$", text, re.M)
    assert re.search(r"^\s+3\s+layer1\.2\s+1\.843e\+04\s+0\.9163  <- merged$", text, re.M)
    assert "groups: [0, 1, 2, [3, 4], 5, [6, 7], 8, 9, 10]" in text
    assert "9 reconstruction units (block, on qdrop):" in text


def test_imagenet_hand_written_schemes_fit_our_units():
    """Shapes only: the partition and the data-free capacity read no weight values, so no checkpoint is needed."""
    from ptqkit.models import build_model
    from ptqkit.quant import prepare as pq
    from ptqkit.algorithms.mrecg import scheme_groups
    from ptqkit.algorithms.units import partition
    expected = {"resnet18": ("layer1.1+layer2.0", "layer2.1+layer3.0"),
                "resnet50": ("layer1.2+layer2.0", "layer2.3+layer3.0+layer3.1", "layer3.5+layer4.0"),
                "regnetx_600mf": tuple("+".join(f"trunk_output.block{b[5]}.{b}" for b in group.split())
                                       for group in ("block2-2 block3-0 block3-1", "block3-4 block4-0",
                                                     "block4-5 block4-6"))}
    for model, merged in expected.items():
        cfg = load_config(os.path.join(REPO, f"configs/imagenet/mrecg/qdrop/{model}_w4a4.yaml"),
                          [f"data.root={REPO}", "data.calibration.split=null", "data.evaluation.split=null",
                           "model.checkpoint=null"])
        fp = build_model(cfg.model.name, **cfg.model.kwargs).eval()
        qmodel, _ = pq.prepare_quantized(fp, cfg.quant)
        units = partition(qmodel, fp, "block")
        groups = scheme_groups(cfg.algorithm.scheme, len(units))
        names = ["+".join(units[i].name for i in g) for g in groups if len(g) > 1]
        assert tuple(names) == merged, model
        if model == "resnet18":
            # The data-free capacity with the log-ratio difference selects exactly the released scheme.
            method = MRECG(dataclasses.replace(cfg.algorithm, scheme="auto", capacity="params", top_k=2))
            ctx = RunContext(cfg, fp, torch.zeros(1, 3, 224, 224), torch.zeros(1), CPU, show_progress=False)
            assert method.parts[0].make_plan(method, qmodel, units, ctx).groups == groups


def make_run(root, name, algorithm, units):
    """A run folder with the parts of results.json the plot reads."""
    path = os.path.join(str(root), name)
    os.makedirs(path)
    results = {"model": "cifar_resnet20", "algorithm": algorithm, "bits": "W2A4", "fp32": {"top1": 81.03},
               "quant": {"top1": 50.0, "images": 10000}, "config": base_tree(),
               "algorithm_results": {"units": units}}
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(results, f)
    return path


def test_plot_of_final_losses_per_unit_index(tmp_path):
    from ptqkit.tools import plot_unit_losses
    plain = [{"name": n, "phase": "qdrop", "index": k, "iterations": 10, "final_rec_loss": 1.0 + k % 2,
              "history": {"iter": [0], "rec": [2.0]}} for k, n in enumerate(["a", "b", "c", "d"])]
    merged = [dict(plain[0]), dict(plain[1], name="b+c", members=[1, 2], final_rec_loss=1.2),
              dict(plain[3], index=2, members=[3])]
    merged[0]["members"] = [0]
    make_run(tmp_path, "qdrop", "qdrop", plain)
    path = make_run(tmp_path, "mrecg", "mrecg", merged)
    names, points = plot_unit_losses.unit_points(plot_unit_losses.load_run(path))
    assert names == ["a", "b", "c", "d"] and [m for m, _ in points] == [[0], [1, 2], [3]]
    out = plot_unit_losses.plot([str(tmp_path)], str(tmp_path / "units.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
