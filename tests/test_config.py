"""Config loading: `_base_` deep merge, `--set`, and every bad input reported in one line naming the key."""
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ASSETS, CIFAR, REPO, base_tree, cifar_checkpoint, run_main
from ptqkit.config import apply_overrides, deep_merge, load_config, load_yaml_tree, validate
from ptqkit.errors import ConfigError, UserError

pytestmark = pytest.mark.cifar10


def test_base_inheritance_and_set_overrides():
    cfg = load_config(os.path.join(REPO, "configs/cifar10/resnet20_w4a4_qdrop.yaml"),
                      ["quant.w.bits=2", "algorithm.prob=0.25", "data.evaluation.limit=100"])
    assert cfg.model.name == "cifar_resnet20"              # from _base_
    assert cfg.quant.w.per_channel is True                 # from _base_, merged under the file's own quant
    assert cfg.quant.w.bits == 2 and cfg.quant.a.bits == 4  # --set beats the file
    assert cfg.algorithm.name == "qdrop" and cfg.algorithm.iters == 2000 and cfg.algorithm.prob == 0.25
    assert cfg.algorithm.weight == 0.01                    # per-architecture default resolved
    assert cfg.data.evaluation.limit == 100


@pytest.mark.parametrize("algorithm,given,resolved", [
    ({"name": "brecq_joint"}, None, "stop"), ({"name": "brecq_joint"}, "pass", "pass"),
    ({"name": "qdrop"}, None, "pass"), ({"name": "qdrop"}, "stop", "stop"), ({"name": "adaround"}, None, "pass"),
    ({"name": "compose", "preset": "brecq_joint"}, None, "stop"), ({"name": "compose"}, None, "pass")])
def test_bound_grad_left_unset_is_the_methods_own_and_a_set_one_wins(algorithm, given, resolved):
    """brecq_joint defaults to `stop`, every other method to `pass`; a compose preset takes its method's; the
    resolved value is what the run folder's config.yaml records (a resumed run keeps it)."""
    quant = {} if given is None else {"a": {"bound_grad": given}}
    cfg = validate(base_tree(algorithm=algorithm, quant=quant))
    assert cfg.quant.a.bound_grad == resolved
    assert validate(cfg.to_dict()).quant.a.bound_grad == resolved


@pytest.mark.imagenet_sample
@pytest.mark.parametrize("model,weight", [("mobilenet_v2", 0.1), ("mnasnet2_0", 0.2), ("resnet18", 0.01)])
def test_per_architecture_rounding_weight_comes_from_the_model_config(model, weight):
    path = os.path.join(REPO, f"configs/imagenet/qdrop/{model}_w2a4.yaml")
    placeholders = [f"data.root={ASSETS}/imagenet", "data.calibration.split=sample", "data.evaluation.split=sample",
                    f"model.checkpoint={ASSETS}/imagenet/mobilenet_v2_coral.pth"]
    assert load_config(path, placeholders).algorithm.weight == weight
    assert load_config(path, placeholders + ["algorithm.weight=0.5"]).algorithm.weight == 0.5


def test_deep_merge_delete_replaces_a_section():
    merged = deep_merge({"quant": {"w": {"bits": 4, "symmetric": True}}},
                       {"quant": {"w": {"_delete_": True, "bits": 2}}})
    assert merged == {"quant": {"w": {"bits": 2}}}


def test_base_paths_are_relative_to_the_including_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("quant: {w: {bits: 3}}\n")
    (tmp_path / "sub" / "child.yaml").write_text("_base_: ../base.yaml\nquant: {a: {bits: 5}}\n")
    assert load_yaml_tree(str(tmp_path / "sub" / "child.yaml")) == {"quant": {"w": {"bits": 3}, "a": {"bits": 5}}}


@pytest.mark.parametrize("tree,message", [
    (base_tree(quant={"w": {"bitz": 4}}),
     r"^config key 'quant\.w\.bitz': expected a known key \(one of: bits, per_channel, symmetric, observer, p\)$"),
    (base_tree(quant={"w": {"bits": 9}}), r"^config key 'quant\.w\.bits': expected a value in \[2, 8\], got 9$"),
    (base_tree(quant={"a": {"bits": "four"}}),
     r"^config key 'quant\.a\.bits': expected an integer or null, got 'four'$"),
    (base_tree(model={"checkpoint": "/nonexistent/r20.th"}),
     r"^config key 'model\.checkpoint': expected an existing file, got '/nonexistent/r20\.th'$"),
    (base_tree(data={"root": "/nonexistent/cifar"}),
     r"^config key 'data\.root': expected an existing folder, got '/nonexistent/cifar'$"),
    (base_tree(data={"evaluation": {"split": "validation"}}),
     r"^config key 'data\.evaluation\.split': expected a subfolder of .*cifar10, got 'validation'$"),
    (base_tree(algorithm={"name": "qdrop", "prob": 1.5}),
     r"^config key 'algorithm\.prob': expected a value in \[0\.0, 1\.0\], got 1\.5$"),
    (base_tree(algorithm={"name": "brecq", "prob": 0.5}),
     r"^config key 'algorithm\.prob': expected a known key \(one of: name, prepasses, prepass_images, iters, "),
    (base_tree(runtime={"device": "tpu"}), r"^config key 'runtime\.device': expected one of auto, cpu, cuda, got 'tpu'$"),
    (base_tree(model={"name": "resnet21"}), r"^config key 'model\.name': expected one of: cifar_resnet20, "),
    (dict(base_tree(), extra={"x": 1}), r"^config key 'extra': expected a known section \(one of: model, data, "),
])
def test_bad_values_fail_in_one_line_naming_the_key(tree, message):
    with pytest.raises(ConfigError, match=message):
        validate(tree)


def test_unknown_algorithm_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"^config key 'algorithm\.name': expected a registered algorithm "
                                          r"\(one of: adaround, brecq, brecq_joint, .*naive, .*qdrop.*\), got 'gptq'$"):
        validate(base_tree(algorithm={"name": "gptq"}))


def test_set_needs_key_and_value():
    with pytest.raises(UserError, match=r"--set 'quant\.w\.bits': expected key\.path=value"):
        apply_overrides({}, ["quant.w.bits"])


def _cli(tmp_path, tree, *extra):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return subprocess.run([sys.executable, os.path.join(REPO, "ptq_main.py"), "--config", str(path), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = _cli(tmp_path, base_tree(), "--set", "quant.w.bits=9")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config key 'quant.w.bits': expected a value in [2, 8], got 9"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_resnet56_checkpoint_for_resnet20_is_one_line_and_exit_2(tmp_path):
    tree = base_tree(model={"checkpoint": cifar_checkpoint(56)}, runtime={"output_dir": str(tmp_path / "run")})
    proc = _cli(tmp_path, tree, "--quiet")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint '{cifar_checkpoint(56)}' does not match model 'cifar_resnet20': "
                           "180 unexpected (layer1.3.conv1.weight")
    assert "Traceback" not in proc.stderr
    # found after the run folder was made, before any work: the folder goes too (no empty run, no "-2" next time)
    assert not os.path.exists(tmp_path / "run")


def test_cli_set_takes_several_pairs(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_tree()))
    status, out, err = run_main(capsys, "--config", str(path), "--dry-run", "--set", "quant.w.bits=2", "quant.a.bits=3",
                                "--set", "runtime.seed=7")
    assert status == 0, err
    resolved = yaml.safe_load(out.split("\n\n")[0])
    assert (resolved["quant"]["w"]["bits"], resolved["quant"]["a"]["bits"], resolved["runtime"]["seed"]) == (2, 3, 7)


def test_cli_missing_config_file(capsys):
    status, _, err = run_main(capsys, "--config", "nope.yaml")
    assert status == 2 and err.strip() == "error: config file 'nope.yaml': not found"


_BRANCHY = """
import sys, torch.nn as nn
sys.path.insert(0, {repo!r})
from ptqkit.models import register_model

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x).mean((2, 3))
        return -self.conv(x).mean((2, 3))

register_model("branchy", Branchy)
import ptq_main
sys.exit(ptq_main.main(["--config", {cfg!r}, "--quiet", "--set", "model.name=branchy",
                        "--set", "model.checkpoint=null", "--set", "runtime.output_dir={out}"]))
"""


@pytest.mark.slow
def test_cli_untraceable_model_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_tree()))
    script = _BRANCHY.format(repo=REPO, cfg=str(cfg), out=tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: torch.fx cannot trace model 'Branchy': ")
    assert last.endswith("(hint: list the offending module classes in model.leaf_modules)")
    assert not os.path.exists(tmp_path / "run")
