"""Every config in configs/ validates. ImageNet configs carry placeholder paths (/path/to/...) for the user's
data and checkpoints; those are swapped for real shared files so that everything else is checked."""
import glob
import os

import pytest

from conftest import ASSETS, REPO
from ptqkit.config import load_config, load_yaml_tree

CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
                 if "_base_" not in p)


def _placeholder_overrides(path):
    tree = load_yaml_tree(path)
    sets = []
    if str(tree.get("data", {}).get("root", "")).startswith("/path/to"):
        sets += [f"data.root={ASSETS}/imagenet", "data.calibration.split=sample", "data.evaluation.split=sample"]
    if str(tree.get("model", {}).get("checkpoint", "")).startswith("/path/to"):
        sets.append(f"model.checkpoint={ASSETS}/imagenet/mobilenet_v2_coral.pth")
    return sets


def test_there_are_configs_for_every_published_table():
    names = {os.path.relpath(p, REPO) for p in CONFIGS}
    for method in ("adaround", "brecq", "qdrop"):
        for model in ("resnet18", "resnet50", "mobilenet_v2", "regnetx_600mf", "regnetx_3200mf", "mnasnet2_0"):
            for bits in ("w4a4", "w2a4", "w3a3", "w2a2"):
                assert f"configs/imagenet/{method}/{model}_{bits}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_validates(path):
    cwd = os.getcwd()
    os.chdir(REPO)  # relative asset paths in configs are relative to the repository root
    try:
        load_config(path, _placeholder_overrides(path))
    finally:
        os.chdir(cwd)
