"""The papers' checkpoints load as released: BRECQ's six files and timm's, with exactly the references' keys and
shapes (tests/data/checkpoint_names, verified against the reference model definitions), land where they belong."""
import gzip
import os

import pytest
import torch

from conftest import REPO
from ptqkit.errors import CheckpointError
from ptqkit.models import build_model, load_checkpoint

TABLES = os.path.join(REPO, "tests", "data", "checkpoint_names")
ZOO = {"resnet18": ("resnet18", {}), "resnet50": ("resnet50", {}), "mobilenet_v2": ("mobilenet_v2", {}),
       "regnetx_600mf": ("regnetx_600mf", {}), "regnetx_3200mf": ("regnetx_3200mf", {}),
       "mnasnet2_0": ("mnasnet", {"alpha": 2.0}), "mnasnet1_0": ("mnasnet", {"alpha": 1.0})}
# (table, the naming the loader must report; None: the file has the zoo's own names)
CASES = [("brecq_resnet18", None), ("brecq_resnet50", None), ("brecq_mobilenet_v2", "BRECQ MobileNetV2"),
         ("brecq_regnetx_600mf", "BRECQ RegNet"), ("brecq_regnetx_3200mf", "BRECQ RegNet"),
         ("brecq_mnasnet2_0", None), ("timm_mobilenet_v2", "timm MobileNetV2"),
         ("timm_regnetx_600mf", "timm RegNet"), ("timm_regnetx_3200mf", "timm RegNet"),
         ("timm_mnasnet1_0", "timm MNASNet")]
FAST = {"brecq_mobilenet_v2", "timm_regnetx_600mf", "timm_mnasnet1_0"}      # the rest in the slow tier


def read_table(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    with gzip.open(os.path.join(TABLES, f"{name}.tsv.gz"), "rt") as f:
        for line in f:
            key, shape, zoo_key = line.rstrip("\n").split("\t")
            rows.append((key, tuple(int(d) for d in shape.strip("()").split(",") if d), zoo_key))
    return rows


def reference_state(rows) -> dict:
    """Random tensors under the reference's keys, in its order; BN variances positive so the model can run."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, _ in rows:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


@pytest.mark.parametrize("table,naming", [(t, n) if t in FAST else pytest.param(t, n, marks=pytest.mark.slow)
                                          for t, n in CASES])
def test_released_checkpoint_loads_every_tensor_where_it_belongs(table, naming, tmp_path):
    rows = read_table(table)
    state = reference_state(rows)
    path = tmp_path / f"{table}.pth.tar"
    # BRECQ's MobileNetV2 file holds its weights under 'model'; the others are bare state_dicts.
    torch.save({"model": state, "epoch": 150} if table == "brecq_mobilenet_v2" else state, path)
    name, kwargs = ZOO[table.split("_", 1)[1]]
    model = build_model(name, **kwargs).eval()
    assert load_checkpoint(model, str(path), name) == naming
    loaded = model.state_dict()
    assert len(rows) == len(loaded)
    for key, _, zoo_key in rows:
        assert torch.equal(loaded[zoo_key], state[key]), (key, zoo_key)
    # The same tensors put in place by name give the same network function.
    by_name = build_model(name, **kwargs).eval()
    for key, _, zoo_key in rows:
        by_name.state_dict()[zoo_key].copy_(state[key])
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), by_name(x))


def test_a_file_with_no_known_names_fails_in_one_line_naming_what_was_tried(tmp_path):
    rows = read_table("timm_mobilenet_v2")
    state = reference_state(rows)
    state["blocks.9.0.conv_pw.weight"] = torch.zeros(1)        # a stage MobileNetV2 does not have
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_model("mobilenet_v2"), str(path), "mobilenet_v2")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint '{path}' does not match model 'mobilenet_v2': 262 missing (")
    assert message.endswith("; nor does it have the names of BRECQ MobileNetV2 or timm MobileNetV2 checkpoints")


def test_a_torchvision_mnasnet_state_dict_without_layout_metadata_loads(tmp_path):
    """torchvision's MNASNet refuses a state_dict that does not say which layout it holds; a renamed or re-saved
    file has lost that, so the loader states the layout the keys and shapes were checked against."""
    source = build_model("mnasnet", alpha=1.0)
    path = tmp_path / "mnasnet.pth"
    torch.save(dict(source.state_dict()), path)               # a plain dict: no _metadata
    target = build_model("mnasnet", alpha=1.0)
    assert load_checkpoint(target, str(path), "mnasnet") is None
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
