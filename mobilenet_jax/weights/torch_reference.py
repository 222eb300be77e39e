"""PyTorch MobileNets in the design notes' layouts, for the parity tests and the benchmarks (needs torch).

Written here from the architecture descriptions in the design notes (AMC-style
MobileNetV1 with a channel profile; the MobileNetV2 port with ``int(c * width)``
rounding), so the converter is checked against PyTorch's own conv/BN/pooling code.
"""

from __future__ import annotations

import torch
from torch import nn

V1_NORMAL = (32, [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024])
V1_HALF_FLOPS = (24, [48, (96, 2), 80, (192, 2), 200, (328, 2), 352, 368, 360, 328, 400, (736, 2), 752])


def _conv_bn(cin: int, cout: int, stride: int, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), act(inplace=True))


class TorchMobileNetV1(nn.Module):
    """MobileNetV1 in the AMC key layout: conv1.{0,1}, features.N.{0,1,3,4}, classifier.0."""

    def __init__(self, num_classes: int, stem: int, cfg: list):
        super().__init__()
        self.conv1 = _conv_bn(3, stem, 2, nn.ReLU)
        layers, cin = [], stem
        for entry in cfg:
            cout, stride = (entry, 1) if isinstance(entry, int) else entry
            layers.append(
                nn.Sequential(
                    nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                    nn.BatchNorm2d(cin),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                )
            )
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        return self.classifier(x.mean(3).mean(2))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(cin, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TorchMobileNetV2Port(nn.Module):
    """The design notes' MobileNetV2 port: flat features.N.conv.M, int(c * width) rounding."""

    SETTING = [
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        cin = int(32 * width_mult)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        features = [_conv_bn(3, cin, 2, nn.ReLU6)]
        for t, c, n, s in self.SETTING:
            cout = int(c * width_mult)
            for i in range(n):
                features.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(nn.Sequential(nn.Conv2d(cin, last, 1, 1, 0, bias=False), nn.BatchNorm2d(last), nn.ReLU6(True)))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(3).mean(2))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics/affine and a unit-scale classifier, so parity is tested on O(1) logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(1 + 0.2 * torch.randn(module.num_features, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.num_features, generator=generator))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features**0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()
