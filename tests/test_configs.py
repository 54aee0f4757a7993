"""Every config in configs/ validates. ImageNet configs carry placeholder paths (/path/to/...) for the user's
data and checkpoints; those are swapped for real files of the assets so that everything else is checked."""
import copy
import glob
import os

import pytest
import torch

from conftest import ASSETS, REPO
from ptqkit.config import load_config, load_tree

pytestmark = [pytest.mark.cifar10, pytest.mark.imagenet_sample]

CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
                 if "_base_" not in p)


def _placeholder_overrides(path):
    tree = load_tree(path)          # an MQBench config (configs/mqbench) is translated first
    sets = []
    if str(tree.get("data", {}).get("root", "")).startswith("/path/to"):
        sets += [f"data.root={ASSETS}/imagenet", "data.calibration.split=sample", "data.evaluation.split=sample"]
    if str(tree.get("model", {}).get("checkpoint", "")).startswith("/path/to"):
        sets.append(f"model.checkpoint={ASSETS}/imagenet/mobilenet_v2_coral.pth")
    return sets


MODELS = ("resnet18", "resnet50", "mobilenet_v2", "regnetx_600mf", "regnetx_3200mf", "mnasnet2_0")


def test_there_are_configs_for_every_published_table():
    names = {os.path.relpath(p, REPO) for p in CONFIGS}
    expected = [(m, b) for m in ("adaround", "brecq", "qdrop") for b in ("w4a4", "w2a4", "w3a3", "w2a2")]
    expected += [(m, b) for m in ("adaround", "brecq") for b in ("w2a32", "w3a32", "w4a32")]   # weight-only rows
    expected += [("brecq_joint", b) for b in ("w4a4", "w2a4", "w3a3")]                         # MQBench's BRECQ
    for method, bits in expected:
        for model in MODELS:
            assert f"configs/imagenet/{method}/{model}_{bits}.yaml" in names


def test_weight_only_configs_have_no_activation_bits():
    cfg = load_config(os.path.join(REPO, "configs/imagenet/brecq/resnet18_w2a32.yaml"),
                      _placeholder_overrides(os.path.join(REPO, "configs/imagenet/brecq/resnet18_w2a32.yaml")))
    assert cfg.quant.w.bits == 2 and cfg.quant.a.bits is None and cfg.algorithm.act_iters == 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_validates(path):
    cwd = os.getcwd()
    os.chdir(REPO)  # relative asset paths in configs are relative to the repository root
    try:
        load_config(path, _placeholder_overrides(path))
    finally:
        os.chdir(cwd)


def _representatives() -> list[str]:
    """One config per model (architecture and width) and method: what building them all would check, in a
    fraction of the time."""
    chosen: dict[tuple, str] = {}
    for path in CONFIGS:
        tree = load_tree(path)
        model, algo = tree.get("model", {}), tree.get("algorithm", {})
        key = (model.get("name"), str(sorted((model.get("kwargs") or {}).items())), algo.get("name", "naive"),
               algo.get("base"), str(tree.get("quant", {}).get("a", {}).get("bits", "")) == "None")
        if "mqbench" in os.path.relpath(path, REPO).split(os.sep):
            key = ("mqbench",)   # translated to models and methods built above; one of them is built
        chosen.setdefault(key, path)
    return sorted(chosen.values())


@pytest.fixture(scope="module")
def cached_preparation():
    """prepare_quantized memoised per model and quantizer layout (each test gets its own deep copy)."""
    from ptqkit.quant import prepare as pq
    original, cache = pq.prepare_quantized, {}

    def prepare(fp_model, qcfg, leaf_modules=()):
        key = (repr(fp_model), qcfg.fold_bn, qcfg.a.bits is None, qcfg.input_bits is None, tuple(leaf_modules))
        if key not in cache:
            cache[key] = original(fp_model, qcfg, leaf_modules)
        gm, layout = cache[key]
        return copy.deepcopy(gm), copy.deepcopy(layout)
    pq.prepare_quantized = prepare
    try:
        yield
    finally:
        pq.prepare_quantized = original


@pytest.mark.slow
@pytest.mark.parametrize("path", _representatives(), ids=lambda p: os.path.relpath(p, REPO))
def test_config_builds_traces_and_partitions(path, cached_preparation, capsys):
    """The model builds (random weights where the checkpoint is a placeholder), torch.fx traces it, MQBench
    inserts its quantizers, and the method partitions it into units with unique names that say where they are."""
    from ptqkit.algorithms.base import RunContext
    from ptqkit.algorithms.reconstruction import Reconstruction
    from ptqkit.algorithms.registry import get_algorithm
    from ptqkit.models import build_model
    from ptqkit.quant.quantizers import fake_quantizers
    cfg = load_config(path, _placeholder_overrides(path) + ["model.checkpoint=null"])
    model = build_model(cfg.model.name, **cfg.model.kwargs).eval()
    size = 32 if cfg.data.preset == "cifar10" else 224
    ctx = RunContext(cfg, model, torch.zeros(2, 3, size, size), torch.zeros(2), torch.device("cpu"),
                     show_progress=False)
    method = get_algorithm(cfg.algorithm.name)(cfg.algorithm)
    qmodel, _ = method.prepare(ctx)
    assert any(True for _ in fake_quantizers(qmodel))
    if isinstance(method, Reconstruction):
        qmodel = method.model_for_plan(ctx)             # calibrated where the partition needs ranges (MRECG)
        units = method.units(qmodel, ctx)
        names = [u.name for u in units]
        assert len(set(names)) == len(names), names
        layers = {layer for u in units for layer in u.weight_layers}
        weighted = {n for n, m in qmodel.named_modules() if hasattr(m, "weight_fake_quant")}
        assert layers == weighted                          # every weight layer is reconstructed, once
        assert sum(len(u.weight_layers) for u in units) == len(weighted)
    assert capsys.readouterr().out == ""


def test_reproduce_guide_is_generated_from_the_shipped_configs():
    """docs/REPRODUCE.md lists a shipped config for every published table cell and is what its generator writes
    (regenerate: python -m ptqkit.tools.make_reproduce)."""
    from ptqkit.tools import make_reproduce
    with open(os.path.join(REPO, "docs", "REPRODUCE.md")) as f:
        assert f.read() == make_reproduce.render(REPO)


def test_config_reference_is_generated_from_the_schema():
    """docs/CONFIG.md is what the schema says (regenerate: python -m ptqkit.tools.config_reference --write)."""
    from ptqkit.tools import config_reference
    with open(os.path.join(REPO, "docs", "CONFIG.md")) as f:
        assert f.read() == config_reference.document()
