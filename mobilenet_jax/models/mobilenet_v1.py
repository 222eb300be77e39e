"""MobileNetV1 (Howard et al., 2017, https://arxiv.org/abs/1704.04861).

A 3x3 stride-2 stem convolution, then depthwise-separable blocks (3x3 depthwise
conv + BN + ReLU, 1x1 pointwise conv + BN + ReLU); downsampling by stride-2
depthwise convolutions, no pooling until the global average before the classifier.

The channel list is data: a profile is ``(stem_channels, blocks)`` where each block
is ``channels`` (stride 1) or ``(channels, stride)``, the notation of the PyTorch
code in the design notes, so pruned networks (e.g. AMC's ``0.5flops``) load as-is.
"""

from __future__ import annotations

from mobilenet_jax.models import common, table

Profile = str | tuple

V1_PROFILES: dict[str, tuple[int, tuple]] = {
    # Table 1 of the paper.
    "normal": (32, (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)),
    # AMC (He et al., 2018, https://arxiv.org/abs/1802.03494), 50% of the FLOPs.
    "0.5flops": (24, (48, (96, 2), 80, (192, 2), 200, (328, 2), 352, 368, 360, 328, 400, (736, 2), 752)),
}


def v1_architecture(profile: Profile = "normal", width: float = 1.0) -> tuple[int, tuple[tuple[int, int], ...]]:
    """Returns ``(stem_channels, ((channels, stride), ...))`` after the width multiplier.

    Channels scale as TF-slim's MobileNetV1 does: ``max(8, int(c * width))``.
    """
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"MobileNetV1 width must be a positive number, got {width!r}.")
    if isinstance(profile, str):
        if profile not in V1_PROFILES:
            raise ValueError(
                f"Unknown MobileNetV1 profile {profile!r}; use one of {sorted(V1_PROFILES)} or (stem, blocks)."
            )
        profile = V1_PROFILES[profile]
    try:
        stem, cfg = profile
        blocks = tuple((entry, 1) if isinstance(entry, int) else (int(entry[0]), int(entry[1])) for entry in cfg)
    except (TypeError, ValueError, IndexError):
        raise ValueError(
            f"A MobileNetV1 profile is (stem_channels, [channels or (channels, stride), ...]), got {profile!r}."
        ) from None
    if not isinstance(stem, int) or stem <= 0 or not blocks:
        raise ValueError(
            f"A MobileNetV1 profile needs a positive stem channel count and at least one block, got {profile!r}."
        )
    for channels, stride in blocks:
        if channels <= 0 or stride not in (1, 2):
            raise ValueError(f"MobileNetV1 block ({channels}, {stride}) needs channels > 0 and stride 1 or 2.")

    def scale(c: int) -> int:
        return max(8, int(c * width))

    return scale(stem), tuple((scale(c), s) for c, s in blocks)


def v1_network(
    profile: Profile = "normal", width: float = 1.0, activation: str = "relu", head_channels: int = 0
) -> table.Network:
    """The :class:`~mobilenet_jax.models.table.Network` of a MobileNetV1: one separable block per profile entry."""
    stem, entries = v1_architecture(profile, width)
    blocks, channels = [], stem
    for out, stride in entries:
        blocks.append(table.Block("separable", channels, channels, out, stride, activation=activation))
        channels = out
    return table.Network(stem, tuple(blocks), head_channels, "head", activation).check()


class MobileNetV1(common.MobileNetBase):
    """MobileNetV1 classifier or backbone.

    Attributes:
      num_classes: classifier outputs; ``None`` drops the head and returns the pooled features.
      width: the width multiplier alpha (any positive number; 1.0, 0.75, 0.5, 0.25 in the paper).
      profile: ``'normal'``, ``'0.5flops'`` (AMC) or ``(stem_channels, blocks)``.
      activation: ``'relu'`` (the paper, the design notes) or ``'relu6'`` (timm, Keras).
      head_channels: 0, or the width of a 1x1 conv + BN + activation before the pooling
        (``head_conv``, ``head_bn``; timm's ``mobilenetv1_100h``).
      padding: ``'torch'``, ``'tf'`` or ``'keras_v1'`` (see :mod:`mobilenet_jax.models.layers`).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); ``param_dtype`` stores parameters.
      bn_momentum, bn_epsilon: BatchNorm settings (defaults are PyTorch's momentum 0.1 and eps 1e-5).
      bn_axis_name: mapped/sharded axis over which to average BatchNorm statistics.
      depthwise_impl: 'auto' (per backend: 'ffi' on CPU), 'xla', 'shift' or 'ffi'; the parameters are the same.
      folded: the inference form (BatchNorm folded into convolution biases; see ``models.fold``).

    ``model.apply(variables, images, train=False)`` takes NHWC images and returns the
    logits; with ``return_features=True`` it returns ``(logits, features)`` where
    ``features`` maps ``'stride_2'`` ... ``'stride_32'`` to the last feature map at
    that stride and ``'pre_logits'`` to the pooled vector.
    """

    num_classes: int | None = 1000
    width: float = 1.0
    profile: Profile = "normal"
    activation: str = "relu"
    head_channels: int = 0

    def network(self) -> table.Network:
        """This model's architecture table."""
        return v1_network(self.profile, self.width, self.activation, self.head_channels)

    def with_network(self, network: table.Network) -> MobileNetV1:
        """This model with the channel counts of ``network`` (a resized :meth:`network`), as a profile."""
        blocks = tuple(b.out if b.stride == 1 else (b.out, b.stride) for b in network.blocks)
        return self.clone(profile=(network.stem_channels, blocks), width=1.0, head_channels=network.head_channels)
