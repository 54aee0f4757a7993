"""ImageNet MobileNetV1 (Howard et al. 2017), width 1.0 at 224 px by default, named the way torchvision names
MobileNetV2: `features.0` is the stem conv-BN-ReLU (`.0` conv, `.1` BN, `.2` ReLU), `features.1` .. `features.13`
are the depthwise-separable blocks (`.0` depthwise conv, `.1` BN, `.2` ReLU, `.3` pointwise conv, `.4` BN,
`.5` ReLU), then `classifier.1` is the linear layer after global average pooling (`classifier.0` a dropout).

There are 27 BatchNorm layers, the count FDDA's reference code assumes for this network. Checkpoints of other
implementations (e.g. pytorchcv `mobilenet_w1`) hold the same tensors in the same order under other names: rename
the keys in that order to load them.
"""
from __future__ import annotations

import torch.nn as nn

# (output channels, stride) of the 13 depthwise-separable blocks.
_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


def _depthwise_separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, 1, 0, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        channels = max(8, int(32 * width_mult))
        layers = [_conv_bn_relu(3, channels, 2)]
        for out, stride in _BLOCKS:
            out = max(8, int(out * width_mult))
            layers.append(_depthwise_separable(channels, out, stride))
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)
