"""Module names of the checkpoints the papers use, mapped onto the zoo's (torchvision's) modules.

The ImageNet tables of BRECQ, QDrop, PD-Quant, MRECG and PTMQ all start from the files released with BRECQ
(`hubconf.py` there): ResNet-18/50 and MNasNet-2.0 carry torchvision's names already, MobileNetV2 flattens each
block's convolutions into one Sequential, and RegNetX uses pycls' names (`s1.b1.f.a`). timm names MobileNetV2,
RegNetX and MNasNet its own way too (its ResNets are torchvision's). Each naming is a key-renaming rule for one
architecture class; `models.checkpoint.load_checkpoint` tries the ones that fit the model when a checkpoint's keys
are not the model's own, and uses the one that maps every key onto the model's keys with the right shapes.
tests/models/test_checkpoint_names.py checks each rule against the references' full key lists.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.regnet import RegNet


@dataclass(frozen=True)
class Naming:
    source: str                                   # who released checkpoints with these names
    arch: type                                    # the zoo class whose modules the names map onto
    rename: Callable[[str], Optional[str]]        # reference key -> zoo key (None: no counterpart)

    @property
    def label(self) -> str:
        return f"{self.source} {self.arch.__name__}"


_NAMINGS: list[Naming] = []


def register_naming(naming: Naming) -> None:
    _NAMINGS.append(naming)


def namings_for(model: nn.Module) -> list[Naming]:
    return [n for n in _NAMINGS if isinstance(model, n.arch)]


# ------------------------------------------------------------------------------------------------- BRECQ
# MobileNetV2: one flat Sequential per block (conv, BN, ReLU6, ...) where torchvision nests Conv2dNormActivation.
_BRECQ_MBV2_FIRST = {0: "0.0", 1: "0.1", 3: "1", 4: "2"}                     # features.1: dw, BN, (ReLU6), pw, BN
_BRECQ_MBV2_BLOCK = {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"}   # pw, BN, dw, BN, pw-linear, BN


def _brecq_mobilenet_v2(key: str) -> Optional[str]:
    m = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)\.(.+)", key)
    if not m:
        return key
    block, index, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    table = _BRECQ_MBV2_FIRST if block == 1 else _BRECQ_MBV2_BLOCK
    return f"features.{block}.conv.{table[index]}.{rest}" if index in table else None


def _regnet_block(stage: str, block: str) -> str:
    # pycls and timm count blocks from 1 (`s2.b1`), torchvision from 0 (`block2-0`)
    return f"trunk_output.block{stage}.block{stage}-{int(block) - 1}"


_BRECQ_REGNET_PARTS = {"proj": "proj.0", "bn": "proj.1", "f.a": "f.a.0", "f.a_bn": "f.a.1", "f.b": "f.b.0",
                       "f.b_bn": "f.b.1", "f.c": "f.c.0", "f.c_bn": "f.c.1"}


def _brecq_regnet(key: str) -> Optional[str]:
    m = re.fullmatch(r"stem\.(conv|bn)\.(\w+)", key)
    if m:
        return f"stem.{0 if m.group(1) == 'conv' else 1}.{m.group(2)}"
    m = re.fullmatch(r"s(\d)\.b(\d+)\.(proj|bn|f\.[abc](?:_bn)?)\.(\w+)", key)
    if m:
        return f"{_regnet_block(m.group(1), m.group(2))}.{_BRECQ_REGNET_PARTS[m.group(3)]}.{m.group(4)}"
    m = re.fullmatch(r"head\.fc\.(\w+)", key)
    return f"fc.{m.group(1)}" if m else None


# -------------------------------------------------------------------------------------------------- timm
# timm's EfficientNet family (MobileNetV2, MNasNet): conv_stem/bn1, blocks.<stage>.<block>, conv_head/bn2.
_TIMM_BLOCK_LAYERS = r"blocks\.(\d+)\.(\d+)\.(conv_pwl|conv_pw|conv_dw|bn1|bn2|bn3)\.(\w+)"
_TIMM_MBV2_FIRST_INDEX = [1, 2, 4, 7, 11, 14, 17]     # torchvision features index of each timm stage's first block
_TIMM_MBV2_DS = {"conv_dw": "conv.0.0", "bn1": "conv.0.1", "conv_pw": "conv.1", "bn2": "conv.2"}
_TIMM_MBV2_IR = {"conv_pw": "conv.0.0", "bn1": "conv.0.1", "conv_dw": "conv.1.0", "bn2": "conv.1.1",
                 "conv_pwl": "conv.2", "bn3": "conv.3"}


def _timm_mobilenet_v2(key: str) -> Optional[str]:
    m = re.fullmatch(_TIMM_BLOCK_LAYERS, key)
    if m:
        stage, block, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if stage >= len(_TIMM_MBV2_FIRST_INDEX):
            return None
        table = _TIMM_MBV2_DS if stage == 0 else _TIMM_MBV2_IR
        return f"features.{_TIMM_MBV2_FIRST_INDEX[stage] + block}.{table[layer]}.{rest}" if layer in table else None
    return _timm_stem_head(key, stem="features.0.0", stem_bn="features.0.1", head="features.18.0",
                           head_bn="features.18.1")


_TIMM_MNAS_DS = {"conv_dw": 3, "bn1": 4, "conv_pw": 6, "bn2": 7}     # the stem's separable convolution
_TIMM_MNAS_IR = {"conv_pw": 0, "bn1": 1, "conv_dw": 3, "bn2": 4, "conv_pwl": 6, "bn3": 7}


def _timm_mnasnet(key: str) -> Optional[str]:
    m = re.fullmatch(_TIMM_BLOCK_LAYERS, key)
    if m:
        stage, block, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if stage == 0:
            return f"layers.{_TIMM_MNAS_DS[layer]}.{rest}" if block == 0 and layer in _TIMM_MNAS_DS else None
        return f"layers.{7 + stage}.{block}.layers.{_TIMM_MNAS_IR[layer]}.{rest}" if layer in _TIMM_MNAS_IR else None
    return _timm_stem_head(key, stem="layers.0", stem_bn="layers.1", head="layers.14", head_bn="layers.15")


def _timm_stem_head(key: str, stem: str, stem_bn: str, head: str, head_bn: str) -> Optional[str]:
    m = re.fullmatch(r"(conv_stem|bn1|conv_head|bn2|classifier)\.(\w+)", key)
    if not m:
        return None
    target = {"conv_stem": stem, "bn1": stem_bn, "conv_head": head, "bn2": head_bn, "classifier": "classifier.1"}
    return f"{target[m.group(1)]}.{m.group(2)}"


_TIMM_REGNET_PARTS = {"conv1.conv": "f.a.0", "conv1.bn": "f.a.1", "conv2.conv": "f.b.0", "conv2.bn": "f.b.1",
                      "conv3.conv": "f.c.0", "conv3.bn": "f.c.1", "downsample.conv": "proj.0",
                      "downsample.bn": "proj.1"}


def _timm_regnet(key: str) -> Optional[str]:
    m = re.fullmatch(r"stem\.(conv|bn)\.(\w+)", key)
    if m:
        return f"stem.{0 if m.group(1) == 'conv' else 1}.{m.group(2)}"
    m = re.fullmatch(r"s(\d)\.b(\d+)\.((?:conv[123]|downsample)\.(?:conv|bn))\.(\w+)", key)
    if m:
        return f"{_regnet_block(m.group(1), m.group(2))}.{_TIMM_REGNET_PARTS[m.group(3)]}.{m.group(4)}"
    m = re.fullmatch(r"head\.fc\.(\w+)", key)
    return f"fc.{m.group(1)}" if m else None


register_naming(Naming("BRECQ", tvm.MobileNetV2, _brecq_mobilenet_v2))
register_naming(Naming("BRECQ", RegNet, _brecq_regnet))
register_naming(Naming("timm", tvm.MobileNetV2, _timm_mobilenet_v2))
register_naming(Naming("timm", RegNet, _timm_regnet))
register_naming(Naming("timm", tvm.MNASNet, _timm_mnasnet))
