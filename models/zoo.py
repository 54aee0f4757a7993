"""Model zoo by name. Builders construct architectures only: weights come from `model.checkpoint`, never from the
network."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.regnet import BlockParams, RegNet

from ptqkit.errors import ConfigError
from ptqkit.models.cifar_resnet import CifarResNet
from ptqkit.models.mobilenet_v1 import MobileNetV1

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    if name in _BUILDERS:
        raise KeyError(f"model '{name}' is already registered")
    _BUILDERS[name] = builder


def available_models() -> list[str]:
    return sorted(_BUILDERS)


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in _BUILDERS:
        raise ConfigError("model.name", "one of: " + ", ".join(available_models()), name)
    try:
        return _BUILDERS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError("model.kwargs", f"arguments accepted by the '{name}' builder ({exc})", kwargs) from None


def _regnetx(depth, w_0, w_a, w_m, group_width, **kwargs):
    # RegNetX = no squeeze-excitation; parameters from Radosavovic et al. 2020 (pycls model zoo).
    params = BlockParams.from_init_params(depth=depth, w_0=w_0, w_a=w_a, w_m=w_m, group_width=group_width)
    return RegNet(params, norm_layer=partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1), **kwargs)


for _depth in (20, 32, 44, 56):
    register_model(f"cifar_resnet{_depth}", partial(CifarResNet, _depth))
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register_model(_name, partial(getattr(tvm, _name), weights=None))
register_model("mobilenet_v2", partial(tvm.mobilenet_v2, weights=None))  # kwargs: width_mult 1.0/0.75/0.5/0.35
register_model("mobilenet_v1", MobileNetV1)  # kwargs: num_classes, width_mult, dropout
register_model("mnasnet", lambda alpha=1.0, **kw: tvm.MNASNet(alpha, **kw))  # alpha 0.5/0.75/1.0/1.3/2.0
register_model("regnetx_400mf", partial(tvm.regnet_x_400mf, weights=None))
register_model("regnetx_800mf", partial(tvm.regnet_x_800mf, weights=None))
register_model("regnetx_600mf", partial(_regnetx, 16, 48, 36.97, 2.24, 24))
register_model("regnetx_3200mf", partial(_regnetx, 25, 88, 26.31, 2.25, 48))
