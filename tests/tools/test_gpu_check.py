"""The GPU acceptance script's parts that run without a GPU: its element checks between the CPU's implementations
agree (and find a difference where there is one), every method's short run is a valid config, and a machine
without CUDA fails it unless asked for the CPU smoke test."""
import os

import pytest
import torch

from ptqkit.config import load_config
from ptqkit.tools import gpu_check


def test_cpu_implementations_agree_element_for_element():
    result = gpu_check.check_elements([("cpu", "torch")])
    assert result["passed"], result["paths"]
    assert result["paths"]["cpu/torch"]["compared"] > 40


@pytest.mark.slow   # compiles the kernels (about a minute on 2 cores)
def test_the_compiled_kernels_agree_with_the_c_kernels_element_for_element():
    """What CUDA runs, compiled for the CPU here: the same masks, outputs and gradients as the C kernels."""
    result = gpu_check.check_elements([("cpu", "compiled")])
    assert result["passed"], result["paths"]
    assert not result["paths"]["cpu/compiled"]["compile_failed"]


def test_the_comparison_finds_a_difference():
    inp = gpu_check._inputs()
    reference = gpu_check._compute("cpu", "torch", inp)
    got = dict(reference)
    name = next(n for n in reference if n.startswith("mask"))
    flipped = reference[name][0].clone()
    flipped.view(-1)[123] = ~flipped.view(-1)[123]
    got[name] = (flipped, "exact")
    out_name = next(n for n in reference if n.endswith("z=0: output"))
    shifted = reference[out_name][0].clone()
    shifted.view(-1)[:100] += gpu_check.STEP      # far more than rounding ties
    got[out_name] = (shifted, "ties")
    checks = gpu_check._compare(reference, got, inp["grad"])
    assert [n for n, c in checks.items() if not c["passed"]] == [name, out_name]


@pytest.mark.cifar10
def test_every_methods_short_run_is_a_valid_config():
    names = gpu_check.shipped_methods()
    assert {"naive", "adaround", "brecq", "brecq_joint", "qdrop", "pdquant", "mrecg", "ptmq", "fdda"} <= set(names)
    for name in names:
        cfg = load_config(os.path.join(gpu_check.REPO, gpu_check.method_config(name)),
                          gpu_check.method_overrides(name, 30))
        assert cfg.algorithm.name == name
    if os.path.exists(gpu_check._asset("imagenet/mobilenet_v2_coral.pth")):
        cfg = load_config(os.path.join(gpu_check.REPO, gpu_check.MOBILENET), gpu_check.mobilenet_overrides(30))
        assert cfg.algorithm.prepasses == ["cle"]


@pytest.mark.cifar10     # the smoke test's run reads the ResNet-20 checkpoint
def test_without_cuda_the_acceptance_fails_unless_asked_for_the_cpu_smoke_test(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gpu_check.main(["--report", str(tmp_path / "r.json"), "--methods", "naive"]) == 1
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
