"""MobileNetV4 conv-small and conv-medium (Qin et al., 2024, https://arxiv.org/abs/2404.10518).

The convolutional MobileNetV4s: a 3x3 stride-2 stem, then stages of plain conv-BN-ReLU
layers (conv-small), fused inverted bottlenecks (conv-medium's first stage) and
universal inverted bottlenecks (UIB: an optional depthwise conv before the expansion,
the 1x1 expansion, an optional depthwise conv after it, the 1x1 projection), a 1x1 conv
to 960 channels, global pooling, then a 1x1 conv to 1280 channels with BatchNorm and
ReLU on the pooled vector, and the classifier. ReLU throughout, no squeeze-excitation.
The hybrid variants (with attention) are not built here.

The rows follow timm's ``_gen_mobilenet_v4`` (``mobilenetv4_conv_small``,
``mobilenetv4_conv_medium``), which reproduces the paper's Tables 11 and 12; at a width
other than 1.0 channels round as timm's ``round_channels`` does, the stem stays at 32
below width 1.0, and the 1280-channel layer after the pooling keeps its width.
"""

from __future__ import annotations

from mobilenet_jax.models import common, table
from mobilenet_jax.models.layers import make_divisible

# One row per block: (kind, start depthwise kernel, kernel, stride, expansion ratio, out channels). A universal
# block's kernel is its middle depthwise layer's (0: none); a fused or conv block's is its full conv's.
Row = tuple[str, int, int, int, float, int]
UIB, FUSED, CONV = "universal", "fused", "conv"
CONV_SMALL: tuple[Row, ...] = (
    (CONV, 0, 3, 2, 1, 32), (CONV, 0, 1, 1, 1, 32),
    (CONV, 0, 3, 2, 1, 96), (CONV, 0, 1, 1, 1, 64),
    (UIB, 5, 5, 2, 3, 96), *[(UIB, 0, 3, 1, 2, 96)] * 4, (UIB, 3, 0, 1, 4, 96),
    (UIB, 3, 3, 2, 6, 128), (UIB, 5, 5, 1, 4, 128), (UIB, 0, 5, 1, 4, 128), (UIB, 0, 5, 1, 3, 128),
    *[(UIB, 0, 3, 1, 4, 128)] * 2,
)  # fmt: skip
CONV_MEDIUM: tuple[Row, ...] = (
    (FUSED, 0, 3, 2, 4, 48),
    (UIB, 3, 5, 2, 4, 80), (UIB, 3, 3, 1, 2, 80),
    (UIB, 3, 5, 2, 6, 160), *[(UIB, 3, 3, 1, 4, 160)] * 2, (UIB, 3, 5, 1, 4, 160), (UIB, 3, 3, 1, 4, 160),
    (UIB, 3, 0, 1, 4, 160), (UIB, 0, 0, 1, 2, 160), (UIB, 3, 0, 1, 4, 160),
    (UIB, 5, 5, 2, 6, 256), (UIB, 5, 5, 1, 4, 256), *[(UIB, 3, 5, 1, 4, 256)] * 2, (UIB, 0, 0, 1, 4, 256),
    (UIB, 3, 0, 1, 4, 256), (UIB, 3, 5, 1, 2, 256), (UIB, 5, 5, 1, 4, 256), *[(UIB, 0, 0, 1, 4, 256)] * 2,
    (UIB, 5, 0, 1, 2, 256),
)  # fmt: skip
# rows, blocks per stage (timm's blocks.S.J numbering; the 960-channel conv is the stage after these)
VARIANTS = {"conv_small": (CONV_SMALL, (2, 2, 6, 6)), "conv_medium": (CONV_MEDIUM, (1, 2, 8, 11))}


def v4_network(variant: str = "conv_small", width: float = 1.0) -> table.Network:
    """The :class:`~mobilenet_jax.models.table.Network` of a convolutional MobileNetV4."""
    if variant not in VARIANTS:
        raise ValueError(f"MobileNetV4 variant must be one of {tuple(VARIANTS)}, got {variant!r}.")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"MobileNetV4 width must be a positive number, got {width!r}.")
    stem = 32 if width < 1.0 else make_divisible(32 * width)
    blocks, channels = [], stem
    for kind, start, kernel, stride, ratio, out in VARIANTS[variant][0]:
        out = make_divisible(out * width)
        hidden = channels if kind == CONV else make_divisible(channels * ratio)
        residual = kind != CONV and stride == 1 and channels == out
        blocks.append(
            table.Block(
                kind,
                channels,
                hidden,
                out,
                stride,
                kernel,
                expand=kind != CONV,
                residual=residual,
                activation="relu",
                start_kernel=start,
            )  # fmt: skip
        )
        channels = out
    last = make_divisible(960 * width)
    return table.Network(stem, tuple(blocks), last, "last", "relu", head_hidden=1280, head_fc_norm=True).check()


def v4_stages(variant: str) -> list[tuple[int, int]]:
    """``(stage, index)`` of each block in timm's numbering."""
    return [(stage, j) for stage, n in enumerate(VARIANTS[variant][1]) for j in range(n)]


class MobileNetV4(common.MobileNetBase):
    """Convolutional MobileNetV4 (conv-small, conv-medium) classifier or backbone.

    Attributes:
      num_classes: classifier outputs; ``None`` drops the classifier and returns the
        features it would read (after the 1280-channel layer, timm's ``pre_logits``).
      variant: ``'conv_small'`` or ``'conv_medium'``.
      width: channel multiplier (timm's ``mobilenetv4_conv_small_050`` is 0.5).
      dropout_rate: dropout before the classifier (timm's default 0; its recipes train with 0.2-0.3).
      network_table: ``None``, or the architecture table itself (what pruning writes).
      padding, dtype, param_dtype, bn_momentum, bn_epsilon, bn_axis_name, depthwise_impl, folded: as in MobileNetV1.

    ``return_features=True`` also returns ``'stride_2'`` ... ``'stride_32'`` and ``'pre_logits'``.
    """

    num_classes: int | None = 1000
    variant: str = "conv_small"
    width: float = 1.0
    dropout_rate: float = 0.0
    network_table: table.Network | None = None

    def network(self) -> table.Network:
        """This model's architecture table."""
        if self.network_table is not None:
            return self.network_table.check()
        return v4_network(self.variant, self.width)

    def with_network(self, network: table.Network) -> MobileNetV4:
        """This model with ``network``'s channel counts (a resized :meth:`network`)."""
        return self.clone(network_table=network)
