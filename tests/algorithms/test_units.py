"""Unit names: logs, results and resume records find a unit by its name, so every unit's is unique and says where
in the model it is."""
import torch
import torch.nn as nn

from conftest import base_tree
from ptqkit.algorithms.units import partition
from ptqkit.config import validate
from ptqkit.models.cifar_resnet import BasicBlock
from ptqkit.quant.prepare import prepare_quantized
import pytest

pytestmark = pytest.mark.cifar10


class SharedStem(nn.Module):
    """MNasNet's layout: a stem of plain conv/BN/ReLU triples inside the same Sequential as the blocks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                    BasicBlock(16, 16), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.layers(x).mean((2, 3)))


def test_units_that_share_a_parent_module_are_named_by_their_layers():
    model = SharedStem().eval()
    gm, _ = prepare_quantized(model, validate(base_tree()).quant)
    names = [u.name for u in partition(gm, model, "block", torch.zeros(1, 3, 8, 8))]
    assert names == ["layers.0", "layers.3", "layers.6", "layers.9", "layers.10", "fc"]
    layer_names = [u.name for u in partition(gm, model, "layer", torch.zeros(1, 3, 8, 8))]
    assert len(set(layer_names)) == len(layer_names) and layer_names[:3] == ["layers.0", "layers.3", "layers.6"]


def test_weight_only_units_are_cut_where_the_activation_quantizers_would_be(resnet20):
    """With quant.a.bits null there is no activation quantizer to cut the graph at: units must still be the blocks
    (found broken once: weight-only BRECQ reconstructed all of ResNet-20 as one unit, 26 % top-1 at W2A32)."""
    for granularity in ("block", "stage"):
        units = {}
        for a_bits in (4, None):
            gm, _ = prepare_quantized(resnet20, validate(base_tree(quant={"a": {"bits": a_bits}})).quant)
            units[a_bits] = [(u.name, u.weight_layers) for u in partition(gm, resnet20, granularity,
                                                                           torch.zeros(1, 3, 32, 32))]
        assert units[None] == units[4] and len(units[4]) > 3, granularity
