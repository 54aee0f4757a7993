"""`compose`: methods assembled from the published ones' parts. A preset alone is the published method, bit for bit;
parts combine; combinations that make no sense are refused before any work; a user's own loss term plugs in."""
import pytest
import torch

from conftest import base_tree
from ptqkit.algorithms.base import RunContext
from ptqkit.algorithms.engine import Hooks
from ptqkit.algorithms.reconstruction import Part
from ptqkit.algorithms.registry import get_algorithm, register_term
from ptqkit.config import validate
from ptqkit.errors import ConfigError

pytestmark = pytest.mark.cifar10

CPU = torch.device("cpu")
SHORT = {"iters": 3, "log_every": 1, "act_init_images": 16}
PD_SHORT = {"dc_steps": 3, "dc_batch": 16}


def run(resnet20, images, algorithm: dict, **tree):
    cfg = validate(base_tree(algorithm=algorithm, **tree))
    ctx = RunContext(cfg, resnet20, images, torch.zeros(len(images)), CPU, show_progress=False)
    method = get_algorithm(cfg.algorithm.name)(cfg.algorithm)
    torch.manual_seed(1005)
    model = method.run(ctx)
    return ctx.results, model


# (preset, the named method's own keys that shorten the run)
PRESETS = [("qdrop", {}), ("pdquant", PD_SHORT), ("mrecg", {"top_k": 2}), ("ptmq", {}),
           ("brecq_joint", {}), ("brecq", {"act_iters": 4}), ("adaround", {})]
FAST = {"pdquant"}


@pytest.mark.parametrize("preset,extra", [p if p[0] in FAST else pytest.param(*p, marks=pytest.mark.slow)
                                          for p in PRESETS])
def test_a_preset_alone_is_the_published_method_bit_for_bit(resnet20, cifar_calib, preset, extra):
    images = cifar_calib[:64]
    named, named_model = run(resnet20, images, {"name": preset, **SHORT, **extra})
    composed, composed_model = run(resnet20, images, {"name": "compose", "preset": preset, **SHORT, **extra})
    assert [u["name"] for u in composed["units"]] == [u["name"] for u in named["units"]]
    for a, b in zip(named["units"], composed["units"]):
        assert a["history"] == b["history"], a["name"]
        assert a["final_rec_loss"] == b["final_rec_loss"]
    x = images[:16]
    with torch.no_grad():
        assert torch.equal(named_model(x), composed_model(x))


def test_parts_combine_pd_loss_with_mrecg_groups_without_drop(resnet20, cifar_calib):
    images = cifar_calib[:64]
    results, _ = run(resnet20, images, {"name": "compose", "preset": "mrecg", "pd": True, "prob": 1.0,
                                        "input_prob": 1.0, **SHORT})
    assert results["mrecg"]["groups"] != [[k] for k in range(11)]               # merged groups
    assert all(len(u["history"]["pd"]) == 3 for u in results["units"])           # the PD term in every unit


@pytest.mark.parametrize("algorithm,quant,message", [
    ({"act_bits": [4, 6, 8]}, {"a": {"bits": None}},
     r"^config key 'algorithm\.act_bits': expected null with quant\.a\.bits null \(weight-only quantization has "
     r"no activation quantizer to switch\), got \[4, 6, 8\]$"),
    ({"act_bits": "paper", "learn": "two_stage"}, {},
     r"^config key 'algorithm\.act_bits': expected null with learn two_stage"),
    ({"dc": True}, {"fold_bn": True}, r"^config key 'quant\.fold_bn': expected false when algorithm\.dc is true"),
    ({"preset": "gptq"}, {}, r"^config key 'algorithm\.preset': expected one of qdrop, brecq_joint, brecq, "
                             r"adaround, pdquant, mrecg, ptmq, got 'gptq'$"),
    ({"terms": {"nonexistent": {}}}, {}, r"^config key 'algorithm\.terms\.nonexistent': expected a registered loss "
                                         r"term \(one of: "),
    ({"learn": "sideways"}, {}, r"^config key 'algorithm\.learn': expected one of joint, weights_first, "),
])
def test_a_combination_that_makes_no_sense_is_refused_in_one_line(algorithm, quant, message):
    with pytest.raises(ConfigError, match=message):
        validate(base_tree(algorithm={"name": "compose", **algorithm}, quant=quant))


@register_term("test_output_mean")
class OutputMeanTerm(Part):
    """A loss on the unit's output statistics: the squared difference of the quantized and FP channel means."""

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def hooks(self, qmodel, units, ctx, method):
        weight = self.weight

        class MeanHooks(Hooks):
            def extra_loss(self, unit, out_q, batch, it, phase):
                return {"mean": weight * (out_q.mean((0, 2, 3)) - batch.target.mean((0, 2, 3))).square().sum()
                        if out_q.dim() == 4 else out_q.sum() * 0.0}
        return MeanHooks()


def test_a_registered_loss_term_of_ones_own_joins_the_loss(resnet20, cifar_calib):
    results, _ = run(resnet20, cifar_calib[:64], {"name": "compose", "terms": {"test_output_mean": {"weight": 2.0}},
                                                  **SHORT})
    hist = results["units"][1]["history"]
    assert len(hist["mean"]) == 3 and hist["mean"][0] > 0
    assert all(t == pytest.approx(r + m + rnd) for t, r, m, rnd in
               zip(hist["total"], hist["rec"], hist["mean"], hist["round"]))
    with pytest.raises(ConfigError, match=r"^config key 'algorithm\.terms\.test_output_mean': expected arguments "
                                          r"its class accepts"):
        cfg = validate(base_tree(algorithm={"name": "compose", "terms": {"test_output_mean": {"wieght": 1}}}))
        get_algorithm("compose")(cfg.algorithm).make_parts()


def test_dry_run_prints_the_resolved_composition():
    import io
    from contextlib import redirect_stdout
    import ptq_main
    from conftest import REPO
    import os
    out = io.StringIO()
    with redirect_stdout(out):
        assert ptq_main.main(["--config", os.path.join(REPO, "configs/cifar10/resnet20_w4a4_qdrop.yaml"), "--dry-run",
                              "--set", "algorithm.name=compose", "--set", "algorithm.preset=ptmq",
                              "--set", "algorithm.pd=true", "--set", "data.calibration.num_images=32"]) == 0
    text = out.getvalue()
    assert "composition (from preset ptmq):" in text
    assert "  loss:        reconstruction (p = 2) + prediction difference (1 / lamb_r = 10, T = 4, output rerun)" in text
    assert "  act bits:    multi-bit [4, 6, 8]" in text
    assert "11 reconstruction units (block):" in text
