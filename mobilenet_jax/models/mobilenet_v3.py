"""MobileNetV3 (Howard et al., 2019, https://arxiv.org/abs/1905.02244): Large and Small, and the minimalistic variants.

Inverted residual blocks as MobileNetV2's, with 3x3 or 5x5 depthwise kernels,
squeeze-excitation after the depthwise layer in some blocks (reduce to a quarter,
ReLU, expand, hard sigmoid) and hard-swish instead of ReLU in the later blocks. The
stem has 16 channels and hard-swish; after the blocks a 1x1 conv (6x the last block's
width) + BN + hard-swish, global pooling, then a dense layer with a bias (1280 or
1024 channels) + hard-swish (``head_fc``), dropout and the classifier.

The *minimalistic* variants (the paper's section 6.1.4 table; Keras's and TF-slim's
``minimalistic``, timm's ``_minimal``) drop squeeze-excitation and hard-swish and use
3x3 kernels everywhere: they quantize well.

The three sources round channels at other widths differently (``rounding``):

* ``'torchvision'``: every listed count (expansions included) times the width, rounded
  to a multiple of 8 (``_make_divisible``); the dense head layer scales too.
* ``'timm'``: block outputs rounded as torchvision's, expansions as
  ``make_divisible(in * ratio)`` of the rounded input; the stem stays at 16 below width 0.75 and the head layer at
  1280/1024 (timm's ``_gen_mobilenet_v3``).
* ``'keras'``: as timm's, but the stem always has 16 channels and the head layer scales
  only above width 1 (``keras.applications.MobileNetV3*``).

At width 1.0 the three give the same network. The squeeze-excitation width is
``make_divisible(expanded / 4)`` in every source.
"""

from __future__ import annotations

import dataclasses

from mobilenet_jax.models import common, table
from mobilenet_jax.models.layers import make_divisible

# One row per block: (kernel, expansion ratio, expanded channels, out channels, squeeze-excite, activation, stride).
# The listed expansions are torchvision's _mobilenet_v3_conf (Tables 1 and 2 of the paper); the ratios are timm's
# and Keras's (the same counts at width 1.0).
Row = tuple[int, float, int, int, bool, str, int]
RE, HS = "relu", "hard_swish"
V3_LARGE: tuple[Row, ...] = (
    (3, 1, 16, 16, False, RE, 1),
    (3, 4, 64, 24, False, RE, 2),
    (3, 3, 72, 24, False, RE, 1),
    (5, 3, 72, 40, True, RE, 2),
    (5, 3, 120, 40, True, RE, 1),
    (5, 3, 120, 40, True, RE, 1),
    (3, 6, 240, 80, False, HS, 2),
    (3, 2.5, 200, 80, False, HS, 1),
    (3, 2.3, 184, 80, False, HS, 1),
    (3, 2.3, 184, 80, False, HS, 1),
    (3, 6, 480, 112, True, HS, 1),
    (3, 6, 672, 112, True, HS, 1),
    (5, 6, 672, 160, True, HS, 2),
    (5, 6, 960, 160, True, HS, 1),
    (5, 6, 960, 160, True, HS, 1),
)
V3_SMALL: tuple[Row, ...] = (
    (3, 1, 16, 16, True, RE, 2),
    (3, 4.5, 72, 24, False, RE, 2),
    (3, 88 / 24, 88, 24, False, RE, 1),  # timm writes e3.67; 24 * 3.67 = 88.08 rounds to the same 88
    (5, 4, 96, 40, True, HS, 2),
    (5, 6, 240, 40, True, HS, 1),
    (5, 6, 240, 40, True, HS, 1),
    (5, 3, 120, 48, True, HS, 1),
    (5, 3, 144, 48, True, HS, 1),
    (5, 6, 288, 96, True, HS, 2),
    (5, 6, 576, 96, True, HS, 1),
    (5, 6, 576, 96, True, HS, 1),
)
VARIANTS = {"large": (V3_LARGE, 1280), "small": (V3_SMALL, 1024)}
# Blocks per stage (timm's arch_def rows, which its parameter names ``blocks.S.J`` number); the 1x1 conv after
# the blocks is timm's stage after these.
V3_STAGES = {"large": (1, 2, 3, 4, 2, 3), "small": (1, 2, 3, 2, 3)}
V3_ROUNDINGS = ("torchvision", "timm", "keras")


def v3_network(
    variant: str = "large", width: float = 1.0, minimal: bool = False, rounding: str = "torchvision"
) -> table.Network:
    """The :class:`~mobilenet_jax.models.table.Network` of a MobileNetV3 (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"MobileNetV3 variant must be one of {tuple(VARIANTS)}, got {variant!r}.")
    if rounding not in V3_ROUNDINGS:
        raise ValueError(f"MobileNetV3 rounding must be one of {V3_ROUNDINGS}, got {rounding!r}.")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"MobileNetV3 width must be a positive number, got {width!r}.")
    rows, head_hidden = VARIANTS[variant]
    stem = make_divisible(16 * width)
    if rounding == "keras" or (rounding == "timm" and width < 0.75):
        stem = 16
    blocks, channels = [], stem
    for kernel, ratio, expanded, out, se, act, stride in rows:
        out = make_divisible(out * width)
        hidden = make_divisible(expanded * width) if rounding == "torchvision" else make_divisible(channels * ratio)
        if ratio == 1 and rounding != "torchvision":
            hidden = channels
        block = table.Block(
            "inverted_residual", channels, hidden, out, stride, 3 if minimal else kernel, expand=hidden != channels,
            residual=stride == 1 and channels == out, activation="relu" if minimal else act,
            se_channels=make_divisible(hidden / 4) if se and not minimal else 0,
        )  # fmt: skip
        blocks.append(block)
        channels = out
    # The 1x1 conv after the blocks: 6x the last block's outputs (torchvision), rounded (Keras), or timm's listed
    # 960/576 times the width, rounded.
    last = {"torchvision": 6 * channels, "keras": make_divisible(6 * channels)}.get(
        rounding, make_divisible(6 * rows[-1][3] * width)
    )
    if rounding == "torchvision" or (rounding == "keras" and width > 1):
        head_hidden = make_divisible(head_hidden * width)
    activation = "relu" if minimal else HS
    return table.Network(stem, tuple(blocks), last, "last", activation, head_hidden=head_hidden).check()


def v3_stages(variant: str) -> list[tuple[int, int]]:
    """``(stage, index)`` of each block in timm's numbering."""
    return [(stage, j) for stage, n in enumerate(V3_STAGES[variant]) for j in range(n)]


class MobileNetV3(common.MobileNetBase):
    """MobileNetV3 Large or Small classifier or backbone.

    Attributes:
      num_classes: classifier outputs; ``None`` drops the classifier and returns the
        features it would read (after ``head_fc``, timm's ``pre_logits``).
      variant: ``'large'`` or ``'small'``.
      width: the width multiplier (0.75 and 1.0 published; any positive number builds).
      minimal: the minimalistic variant (no squeeze-excitation, ReLU only, 3x3 kernels).
      rounding: ``'torchvision'``, ``'timm'`` or ``'keras'``: how channels round at widths other than 1.0.
      dropout_rate: dropout before the classifier (0.2 in torchvision, timm and Keras).
      network_table: ``None``, or the architecture table itself, replacing what the
        fields above give (what pruning writes: the same blocks at other widths).
      bn_epsilon: 1e-3 (the paper's TF models, torchvision and Keras); timm's MobileNetV3s use 1e-5.
      padding, dtype, param_dtype, bn_momentum, bn_axis_name, depthwise_impl, folded: as in MobileNetV1
        (Keras's and timm's ``tf_`` models use ``padding='tf'``).

    ``return_features=True`` also returns ``'stride_2'`` ... ``'stride_32'`` (the last
    feature map at each stride; ``'stride_32'`` is the 1x1 conv's output) and ``'pre_logits'``.
    """

    num_classes: int | None = 1000
    variant: str = "large"
    width: float = 1.0
    minimal: bool = False
    rounding: str = "torchvision"
    dropout_rate: float = 0.2
    network_table: table.Network | None = None
    bn_epsilon: float = dataclasses.field(default=1e-3, kw_only=True)  # the paper's, torchvision's and Keras's

    def network(self) -> table.Network:
        """This model's architecture table."""
        if self.network_table is not None:
            return self.network_table.check()
        return v3_network(self.variant, self.width, self.minimal, self.rounding)

    def with_network(self, network: table.Network) -> MobileNetV3:
        """This model with ``network``'s channel counts (a resized :meth:`network`)."""
        return self.clone(network_table=network)
