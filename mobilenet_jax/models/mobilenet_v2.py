"""MobileNetV2 (Sandler et al., 2018, https://arxiv.org/abs/1801.04381).

Inverted residual blocks: 1x1 expansion + ReLU6, 3x3 depthwise + ReLU6, linear 1x1
projection, with a residual connection when the block keeps stride 1 and width.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mobilenet_jax.models import common, layers

# Table 2 of the paper. t: expansion factor, c: output channels, n: repeats,
# s: stride of the first repeat.
V2_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
V2_ROUNDINGS = ("torchvision", "floor")


def v2_architecture(
    width: float = 1.0,
    rounding: str = "torchvision",
    block_table: tuple[tuple[int, int, int, int], ...] = V2_BLOCKS,
    stem_channels: int = 32,
    last_channels: int = 1280,
    round_nearest: int = 8,
) -> tuple[int, tuple[tuple[int, int, int, int], ...], int]:
    """Returns ``(stem, ((in, hidden, out, stride), ...), last)`` channel counts.

    ``rounding='torchvision'`` rounds to multiples of ``round_nearest`` exactly as
    ``torchvision.models.mobilenet_v2``; ``'floor'`` is ``int(c * width)`` as in the
    PyTorch port of the design notes. Either way the last conv keeps 1280 channels
    unless ``width > 1``.
    """
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"MobileNetV2 width must be a positive number, got {width!r}.")
    if rounding == "torchvision":
        scale = functools.partial(layers.make_divisible, divisor=round_nearest)
    elif rounding == "floor":
        scale = int
    else:
        raise ValueError(f"MobileNetV2 rounding must be one of {V2_ROUNDINGS}, got {rounding!r}.")
    stem = scale(stem_channels * width)
    last = scale(last_channels * max(1.0, width))
    blocks = []
    in_channels = stem
    for t, c, n, s in block_table:
        if t < 1 or n < 1 or s not in (1, 2):
            raise ValueError(
                f"MobileNetV2 block row (t={t}, c={c}, n={n}, s={s}) needs t >= 1, n >= 1 and s in (1, 2)."
            )
        out_channels = scale(c * width)
        for i in range(n):
            blocks.append((in_channels, int(round(in_channels * t)), out_channels, s if i == 0 else 1))
            in_channels = out_channels
    if min([stem, last] + [c for block in blocks for c in block[:3]]) < 1:
        raise ValueError(f"MobileNetV2 width {width} leaves a layer with no channels; use a larger width.")
    return stem, tuple(blocks), last


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when hidden == in), 3x3 depthwise, linear 1x1 projection."""

    in_channels: int
    hidden_channels: int
    out_channels: int
    strides: int
    make: common.Layers

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if self.hidden_channels != self.in_channels:
            x = self.make.pointwise(self.hidden_channels, name="conv_pw")(x)
            x = nn.relu6(self.make.norm(name="bn_pw")(x))
        x = self.make.depthwise(strides=self.strides, name="conv_dw")(x)
        x = nn.relu6(self.make.norm(name="bn_dw")(x))
        x = self.make.pointwise(self.out_channels, name="conv_pwl")(x)
        x = self.make.norm(name="bn_pwl")(x)
        if self.strides == 1 and self.in_channels == self.out_channels:
            x = x + shortcut
        return x


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier or backbone.

    Attributes:
      num_classes: classifier outputs; ``None`` drops the head and returns the pooled features.
      width: the width multiplier (any positive number; 0.35 ... 1.4 in the paper).
      rounding: 'torchvision' (multiples of 8, loads every torchvision ``width_mult``)
        or 'floor' (``int(c * width)``, the PyTorch port in the design notes).
      dropout_rate: dropout before the classifier (needs a 'dropout' rng when training).
      block_table: the ``(t, c, n, s)`` rows.
      dtype, param_dtype, bn_momentum, bn_epsilon, bn_axis_name, depthwise_impl: as in MobileNetV1.

    ``model.apply(variables, images, train=False)`` returns logits; with
    ``return_features=True`` it returns ``(logits, features)``, ``features`` mapping
    ``'stride_2'`` ... ``'stride_32'`` to the last feature map at each stride
    (``'stride_32'`` is the 1280-channel last conv) and ``'pre_logits'`` to the pooled vector.
    """

    num_classes: int | None = 1000
    width: float = 1.0
    rounding: str = "torchvision"
    dropout_rate: float = 0.2
    block_table: tuple[tuple[int, int, int, int], ...] = V2_BLOCKS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        common.check_images(x, "MobileNetV2")
        stem, blocks, last = v2_architecture(self.width, self.rounding, tuple(map(tuple, self.block_table)))
        make = common.layer_factories(self, train)
        x = common.stem(make, x, stem, nn.relu6)
        stride = 2
        features = {}
        for i, (cin, hidden, cout, block_stride) in enumerate(blocks):
            x = InvertedResidual(cin, hidden, cout, block_stride, make, name=f"block_{i}")(x)
            stride *= block_stride
            features[f"stride_{stride}"] = x
        x = make.pointwise(last, name="last_conv")(x)
        features[f"stride_{stride}"] = x = nn.relu6(make.norm(name="last_bn")(x))
        x, features = common.head(self, x, features, train, self.dropout_rate)
        return (x, features) if return_features else x
