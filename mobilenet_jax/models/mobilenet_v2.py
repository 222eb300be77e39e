"""MobileNetV2 (Sandler et al., 2018, https://arxiv.org/abs/1801.04381).

Inverted residual blocks: 1x1 expansion + ReLU6, 3x3 depthwise + ReLU6, linear 1x1
projection, with a residual connection when the block keeps stride 1 and width.
"""

from __future__ import annotations

import functools

from mobilenet_jax.models import common, layers, table

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
KIND = "inverted_residual"


def v2_architecture(
    width: float = 1.0,
    rounding: str = "torchvision",
    block_table: tuple[tuple[int, int, int, int], ...] = V2_BLOCKS,
    stem_channels: int = 32,
    last_channels: int = 1280,
    round_nearest: int = 8,
    block_channels: tuple[tuple[int, int], ...] | None = None,
    fix_stem_head: bool = False,
) -> tuple[int, tuple[table.Block, ...], int]:
    """Returns ``(stem, (Block, ...), last)``: the stem's channels, the inverted-residual rows, the last conv's.

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
            hidden = int(round(in_channels * t))
            block = table.Block(KIND, in_channels, hidden, out_channels, stride, expand=t != 1, residual=residual)
            blocks.append(block)
            in_channels = out_channels
    if min([stem, last] + [c for b in blocks for c in (b.in_channels, b.hidden, b.out)]) < 1:
        raise ValueError(f"MobileNetV2 width {width} leaves a layer with no channels; use a larger width.")
    if block_channels is not None:
        blocks = _with_channels(stem, blocks, block_channels)
    return stem, tuple(blocks), last


def _with_channels(stem: int, blocks: list[table.Block], block_channels) -> list[table.Block]:
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


def model_architecture(model: MobileNetV2) -> tuple[int, tuple[table.Block, ...], int]:
    """:func:`v2_architecture` of a :class:`MobileNetV2`'s fields, pruned counts (if any) applied."""
    table_rows = tuple(map(tuple, model.block_table))
    stem, blocks, last = v2_architecture(model.width, model.rounding, table_rows, fix_stem_head=model.fix_stem_head)
    stem = stem if model.stem_channels is None else model.stem_channels
    last = last if model.last_channels is None else model.last_channels
    if model.block_channels is not None or model.stem_channels is not None:
        pairs = [(b.hidden, b.out) for b in blocks] if model.block_channels is None else model.block_channels
        blocks = _with_channels(stem, list(blocks), tuple(map(tuple, pairs)))
    return stem, tuple(blocks), last


class MobileNetV2(common.MobileNetBase):
    """MobileNetV2 classifier or backbone.

    Attributes:
      num_classes: classifier outputs; ``None`` drops the head and returns the pooled features.
      width: the width multiplier (any positive number; 0.35 ... 1.4 in the paper).
      rounding: 'torchvision' (multiples of 8, loads every torchvision ``width_mult``)
        or 'floor' (``int(c * width)``, the PyTorch port in the design notes).
      dropout_rate: dropout before the classifier (needs a 'dropout' rng when training).
      block_table: the ``(t, c, n, s)`` rows.
      block_channels: ``None``, or one ``(hidden, out)`` pair per block replacing the
        counts of ``width`` (what :mod:`mobilenet_jax.compression.prune` writes).
      stem_channels, last_channels: ``None``, or the stem's / last conv's channel count
        replacing the one ``width`` gives (pruning writes them).
      fix_stem_head: keep the stem at 32 and the last conv at 1280 channels at any width (timm's ``d`` variants).
      padding: ``'torch'``, ``'tf'`` or ``'keras_v1'`` (see :mod:`mobilenet_jax.models.layers`).
      dtype, param_dtype, bn_momentum, bn_epsilon, bn_axis_name, depthwise_impl, folded: as in MobileNetV1.

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
    stem_channels: int | None = None
    last_channels: int | None = None
    fix_stem_head: bool = False

    def network(self) -> table.Network:
        """This model's architecture table."""
        stem, blocks, last = model_architecture(self)
        return table.Network(stem, blocks, last, "last", "relu6").check()

    def with_network(self, network: table.Network) -> MobileNetV2:
        """This model with the channel counts of ``network`` (a resized :meth:`network`)."""
        pairs = tuple((block.hidden, block.out) for block in network.blocks)
        return self.clone(
            block_channels=pairs, stem_channels=network.stem_channels, last_channels=network.head_channels
        )
