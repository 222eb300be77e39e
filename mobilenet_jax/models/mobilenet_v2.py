"""MobileNetV2 (Sandler et al., 2018, https://arxiv.org/abs/1801.04381).

Inverted residual blocks: 1x1 expansion + ReLU6, 3x3 depthwise + ReLU6, linear 1x1
projection, with a residual connection when the block keeps stride 1 and width.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

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
V2_ROUNDINGS = ("torchvision", "floor", "keras")


class V2Block(NamedTuple):
    """One inverted residual block: channel counts, stride, and its two structural choices."""

    in_channels: int
    hidden: int
    out: int
    stride: int
    expand: bool  # a 1x1 expansion conv (expansion factor t != 1)
    residual: bool  # a shortcut (stride 1 and, before any pruning, in == out)


def v2_architecture(
    width: float = 1.0,
    rounding: str = "torchvision",
    block_table: tuple[tuple[int, int, int, int], ...] = V2_BLOCKS,
    stem_channels: int = 32,
    last_channels: int = 1280,
    round_nearest: int = 8,
    block_channels: tuple[tuple[int, int], ...] | None = None,
    fix_stem_head: bool = False,
) -> tuple[int, tuple[V2Block, ...], int]:
    """Returns ``(stem, (V2Block, ...), last)``.

    ``rounding='torchvision'`` rounds to multiples of ``round_nearest`` exactly as
    ``torchvision.models.mobilenet_v2``; ``'floor'`` is ``int(c * width)`` as in the
    PyTorch port of the design notes; ``'keras'`` is ``keras.applications.MobileNetV2``'s
    ``make_divisible(int(c * width))`` for the block outputs. Either way the last conv
    keeps 1280 channels unless ``width > 1``; ``fix_stem_head`` keeps the stem at 32 and
    the last conv at 1280 whatever the width (timm's ``mobilenetv2_110d``/``120d``).

    ``block_channels`` (one ``(hidden, out)`` pair per block, as pruning writes them)
    replaces the counts the width gives; the blocks keep their expansion convs and
    shortcuts, so the blocks a shortcut joins must keep one width.
    """
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"MobileNetV2 width must be a positive number, got {width!r}.")
    divisible = functools.partial(layers.make_divisible, divisor=round_nearest)
    if rounding == "torchvision":
        scale = block_scale = divisible
    elif rounding == "floor":
        scale = block_scale = int
    elif rounding == "keras":
        scale, block_scale = divisible, lambda c: divisible(int(c))
    else:
        raise ValueError(f"MobileNetV2 rounding must be one of {V2_ROUNDINGS}, got {rounding!r}.")
    stem = stem_channels if fix_stem_head else scale(stem_channels * width)
    last = last_channels if fix_stem_head else scale(last_channels * max(1.0, width))
    blocks = []
    in_channels = stem
    for t, c, n, s in block_table:
        if t < 1 or n < 1 or s not in (1, 2):
            raise ValueError(
                f"MobileNetV2 block row (t={t}, c={c}, n={n}, s={s}) needs t >= 1, n >= 1 and s in (1, 2)."
            )
        out_channels = block_scale(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            residual = stride == 1 and in_channels == out_channels
            blocks.append(V2Block(in_channels, int(round(in_channels * t)), out_channels, stride, t != 1, residual))
            in_channels = out_channels
    if min([stem, last] + [c for block in blocks for c in block[:3]]) < 1:
        raise ValueError(f"MobileNetV2 width {width} leaves a layer with no channels; use a larger width.")
    if block_channels is not None:
        blocks = _with_channels(stem, blocks, block_channels)
    return stem, tuple(blocks), last


def _with_channels(stem: int, blocks: list[V2Block], block_channels) -> list[V2Block]:
    """``blocks`` with the ``(hidden, out)`` counts of ``block_channels``, checked block by block."""
    if len(block_channels) != len(blocks):
        raise ValueError(f"block_channels has {len(block_channels)} entries; the model has {len(blocks)} blocks.")
    result, in_channels = [], stem
    for i, (block, entry) in enumerate(zip(blocks, block_channels, strict=True)):
        if len(entry) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in entry):
            raise ValueError(f"block_channels[{i}] must be a (hidden, out) pair of integers, got {entry!r}.")
        hidden, out = entry
        if min(hidden, out) < 1:
            raise ValueError(f"Block {i} needs positive channel counts, got (hidden={hidden}, out={out}).")
        if not block.expand and hidden != in_channels:
            raise ValueError(
                f"Block {i} has no expansion conv, so its hidden width is its input width {in_channels}, not {hidden}."
            )
        if block.residual and out != in_channels:
            raise ValueError(
                f"Block {i} adds its input to its output (a residual connection), so it must output as many channels "
                f"as it receives ({in_channels}), not {out}; prune a residual group's outputs together."
            )
        result.append(block._replace(in_channels=in_channels, hidden=hidden, out=out))
        in_channels = out
    return result


def model_architecture(model: MobileNetV2) -> tuple[int, tuple[V2Block, ...], int]:
    """:func:`v2_architecture` of a :class:`MobileNetV2`'s fields."""
    channels = None if model.block_channels is None else tuple(map(tuple, model.block_channels))
    table = tuple(map(tuple, model.block_table))
    return v2_architecture(
        model.width, model.rounding, table, block_channels=channels, fix_stem_head=model.fix_stem_head
    )


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when hidden == in), 3x3 depthwise, linear 1x1 projection."""

    block: V2Block
    make: common.Layers

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if self.block.expand:
            x = self.make.pointwise(self.block.hidden, name="conv_pw")(x)
            x = nn.relu6(self.make.norm(name="bn_pw")(x))
        x = self.make.depthwise(strides=self.block.stride, name="conv_dw")(x)
        x = nn.relu6(self.make.norm(name="bn_dw")(x))
        x = self.make.pointwise(self.block.out, name="conv_pwl")(x)
        x = self.make.norm(name="bn_pwl")(x)
        if self.block.residual:
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
      block_channels: ``None``, or one ``(hidden, out)`` pair per block replacing the
        counts of ``width`` (what :mod:`mobilenet_jax.prune` writes).
      fix_stem_head: keep the stem at 32 and the last conv at 1280 channels at any width (timm's ``d`` variants).
      padding: ``'torch'``, ``'tf'`` or ``'keras_v1'`` (see :mod:`mobilenet_jax.models.layers`).
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
    block_channels: tuple[tuple[int, int], ...] | None = None
    fix_stem_head: bool = False
    padding: str = "torch"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        common.check_images(x, "MobileNetV2")
        stem, blocks, last = model_architecture(self)
        make = common.layer_factories(self, train)
        x = common.stem(make, x, stem, nn.relu6, self.padding)
        stride = 2
        features = {}
        for i, block in enumerate(blocks):
            x = InvertedResidual(block, make, name=f"block_{i}")(x)
            stride *= block.stride
            features[f"stride_{stride}"] = x
        x = make.pointwise(last, name="last_conv")(x)
        features[f"stride_{stride}"] = x = nn.relu6(make.norm(name="last_bn")(x))
        x, features = common.head(self, x, features, train, self.dropout_rate)
        return (x, features) if return_features else x
