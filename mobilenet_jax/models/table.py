"""Architecture tables: each network described once, as data.

A MobileNet is a stem convolution, a sequence of blocks, an optional 1x1 head
convolution, global average pooling and a classifier. :class:`Network` holds that
sequence as records, as torchvision's ``InvertedResidualConfig`` lists and timm's
``arch_def`` do; :class:`Block` is one row:

* ``'separable'`` (MobileNetV1): depthwise ``conv_dw`` + ``bn_dw`` + activation, then
  pointwise ``conv_pw`` + ``bn_pw`` + activation;
* ``'inverted_residual'`` (MobileNetV2): pointwise expansion ``conv_pw`` + ``bn_pw`` +
  activation (absent when ``expand`` is False), depthwise ``conv_dw`` + ``bn_dw`` +
  activation, linear projection ``conv_pwl`` + ``bn_pwl``, and the input added to the
  output when ``residual``.
* ``'universal'`` (MobileNetV4's universal inverted bottleneck): an optional depthwise
  ``conv_dw_start`` + ``bn_dw_start`` (no activation; ``start_kernel`` > 0), the
  expansion ``conv_pw``, an optional depthwise ``conv_dw`` (``kernel`` > 0) and the
  projection ``conv_pwl``; the stride is the middle depthwise layer's, or the start one's
  without it. ``start_kernel`` = 0 and ``kernel`` > 0 is MobileNetV2's block; both > 0
  "ExtraDW"; ``kernel`` = 0 "ConvNeXt"-like; both 0 an FFN.
* ``'fused'`` (MobileNetV4's fused IB, EfficientNetV2's fused MBConv): a full k x k
  ``conv_exp`` + ``bn_exp`` + activation to ``hidden`` channels, then ``conv_pwl`` + ``bn_pwl``.
* ``'conv'``: one full k x k (or 1x1) ``conv`` + ``bn`` + activation (MobileNetV4's conv stages).

The first two kinds may squeeze and excite the depthwise layer's output (``se_channels`` > 0;
MobileNetV3, EfficientNet): global average pool, ``se/conv_reduce`` (1x1 with bias) to
``se_channels`` + ReLU, ``se/conv_expand`` (1x1 with bias) back + the ``se_gate``
(hard sigmoid in MobileNetV3, sigmoid in EfficientNet), and the depthwise output scaled
per channel by the result (Hu et al. 2018; torchvision's ``SqueezeExcitation``).

After the pooling a network may have one more layer before the classifier
(``head_hidden`` > 0; MobileNetV3): ``head_fc``, a dense layer with a bias and the
network's activation, applied to the pooled vector (torchvision's ``classifier.0``,
timm's ``conv_head``, Keras's ``Conv_2``); with ``head_fc_norm`` (MobileNetV4) it has
no bias and a BatchNorm ``head_fc_bn`` before the activation (timm's ``norm_head``).

The Flax modules are built from the table (:func:`mobilenet_jax.models.common.forward`),
and every other part walks it: :meth:`Network.convs` lists each convolution with its
parameter path, kind, channels, kernel, stride and activation (BatchNorm folding for
export, weight-layout name maps), and :func:`channel_groups` derives which tensors
share a channel axis (pruning). The parameter names above are the checkpoints' API.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

BLOCK_KINDS = ("separable", "inverted_residual", "universal", "fused", "conv")
ACTIVATIONS = ("relu", "relu6", "hard_swish")
SE_GATES = ("hard_sigmoid", "sigmoid")


class Conv(NamedTuple):
    """One convolution and its BatchNorm (and activation), as a walk over a table gives it."""

    path: str  # parameter path of the convolution, e.g. 'block_3/conv_dw'
    norm: str  # parameter path of its BatchNorm, e.g. 'block_3/bn_dw'; '' for a conv with a bias instead (SE)
    kind: str  # 'full' (k x k over all inputs), 'pointwise' (1x1) or 'depthwise' (k x k per channel)
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    activation: str | None  # None: linear

    @property
    def name(self) -> str:
        """The convolution's name inside its block (``conv_dw``)."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def norm_name(self) -> str:
        return self.norm.rsplit("/", 1)[-1]


class Block(NamedTuple):
    """One block row: its kind, channel counts, depthwise kernel and stride, activation and shortcut."""

    kind: str
    in_channels: int
    hidden: int  # the expansion width (the depthwise layer's), or in_channels without expansion
    out: int
    stride: int = 1
    kernel: int = 3  # the (middle) depthwise kernel; a fused or conv block's full kernel; 0: none (universal)
    expand: bool = False  # inverted residual: a 1x1 expansion conv (expansion factor != 1)
    residual: bool = False  # the input is added to the output
    activation: str = "relu6"
    se_channels: int = 0  # squeeze-excitation of the depthwise output to this width; 0: none
    se_gate: str = "hard_sigmoid"  # the excitation's gate: 'hard_sigmoid' or 'sigmoid'
    start_kernel: int = 0  # universal: the depthwise conv before the expansion; 0: none

    def convs(self, prefix: str) -> tuple[Conv, ...]:
        """The block's convolutions in order, their paths under ``prefix`` (``'block_3'``)."""
        if self.kind in ("universal", "fused", "conv"):
            return self._mobilenet_v4_convs(prefix)
        dw = Conv(
            f"{prefix}/conv_dw", f"{prefix}/bn_dw", "depthwise", self.hidden, self.hidden, self.kernel,
            self.stride, self.activation,
        )  # fmt: skip
        if self.kind == "separable":
            pw = Conv(f"{prefix}/conv_pw", f"{prefix}/bn_pw", "pointwise", self.hidden, self.out, 1, 1, self.activation)
            return dw, pw
        pwl = Conv(f"{prefix}/conv_pwl", f"{prefix}/bn_pwl", "pointwise", self.hidden, self.out, 1, 1, None)
        if not self.expand:
            return dw, pwl
        pw = Conv(
            f"{prefix}/conv_pw", f"{prefix}/bn_pw", "pointwise", self.in_channels, self.hidden, 1, 1, self.activation
        )
        return pw, dw, pwl

    def _mobilenet_v4_convs(self, prefix: str) -> tuple[Conv, ...]:
        act, k = self.activation, self.kernel
        if self.kind == "conv":
            kind = "full" if k > 1 else "pointwise"
            return (Conv(f"{prefix}/conv", f"{prefix}/bn", kind, self.in_channels, self.out, k, self.stride, act),)
        pwl = Conv(f"{prefix}/conv_pwl", f"{prefix}/bn_pwl", "pointwise", self.hidden, self.out, 1, 1, None)
        if self.kind == "fused":
            exp = Conv(
                f"{prefix}/conv_exp", f"{prefix}/bn_exp", "full", self.in_channels, self.hidden, k, self.stride, act
            )
            return exp, pwl
        convs = []
        if self.start_kernel:
            stride = 1 if k else self.stride
            convs.append(Conv(f"{prefix}/conv_dw_start", f"{prefix}/bn_dw_start", "depthwise", self.in_channels,
                              self.in_channels, self.start_kernel, stride, None))  # fmt: skip
        convs.append(
            Conv(f"{prefix}/conv_pw", f"{prefix}/bn_pw", "pointwise", self.in_channels, self.hidden, 1, 1, act)
        )
        if k:
            convs.append(Conv(f"{prefix}/conv_dw", f"{prefix}/bn_dw", "depthwise", self.hidden, self.hidden, k,
                              self.stride, act))  # fmt: skip
        return (*convs, pwl)

    def hidden_path(self, prefix: str) -> str | None:
        """The conv whose output width is ``hidden`` (a depthwise layer passes it, or an expansion writes it)."""
        if self.kind in ("separable", "inverted_residual"):
            return f"{prefix}/conv_dw"
        return {"universal": f"{prefix}/conv_pw", "fused": f"{prefix}/conv_exp"}.get(self.kind)

    def se_convs(self, prefix: str) -> tuple[Conv, ...]:
        """The squeeze-excitation's two 1x1 convolutions (with biases, no BatchNorm), or none."""
        if not self.se_channels:
            return ()
        reduce = Conv(f"{prefix}/se/conv_reduce", "", "pointwise", self.hidden, self.se_channels, 1, 1, "relu")
        expand = Conv(f"{prefix}/se/conv_expand", "", "pointwise", self.se_channels, self.hidden, 1, 1, self.se_gate)
        return reduce, expand

    def check(self, index: int) -> None:
        """Raises ValueError with one sentence when the row cannot be built."""
        where = f"Block {index} ({self.kind})"
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f"Block {index}'s kind must be one of {BLOCK_KINDS}, got {self.kind!r}.")
        if min(self.in_channels, self.hidden, self.out) < 1:
            raise ValueError(f"{where} needs positive channel counts, got {self.in_channels}/{self.hidden}/{self.out}.")
        no_middle = self.kind == "universal" and self.kernel == 0
        if self.stride not in (1, 2) or (not no_middle and (self.kernel < 1 or self.kernel % 2 == 0)):
            raise ValueError(f"{where} needs stride 1 or 2 and an odd kernel, got {self.stride} and {self.kernel}.")
        if self.start_kernel and (self.kind != "universal" or self.start_kernel % 2 == 0 or self.start_kernel < 0):
            raise ValueError(f"{where}: only a universal block has an odd start_kernel, got {self.start_kernel}.")
        if no_middle and not self.start_kernel and self.stride != 1:
            raise ValueError(f"{where} has no depthwise layer to take its stride 2.")
        if self.se_channels and self.kind not in ("separable", "inverted_residual"):
            raise ValueError(f"{where}: squeeze-excitation is built for separable and inverted-residual blocks only.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{where}'s activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if self.se_channels < 0 or self.se_gate not in SE_GATES:
            raise ValueError(
                f"{where}'s squeeze-excitation needs se_channels >= 0 and se_gate in {SE_GATES}, "
                f"got {self.se_channels} and {self.se_gate!r}."
            )
        if (self.kind in ("separable", "conv") or (self.kind == "inverted_residual" and not self.expand)) and (
            self.hidden != self.in_channels
        ):
            raise ValueError(
                f"{where} has no expansion conv, so its depthwise layer has its {self.in_channels} input "
                f"channels, not {self.hidden}."
            )
        if self.residual and (self.kind in ("separable", "conv") or self.stride != 1 or self.in_channels != self.out):
            raise ValueError(
                f"{where} adds its input to its output, so it must be an inverted residual with stride 1 and as "
                f"many outputs as inputs ({self.in_channels}), not {self.out} at stride {self.stride}; prune a "
                "residual group's outputs together."
            )


class Network(NamedTuple):
    """A whole network: stem, blocks, optional head conv; then pooling and the classifier.

    ``head_channels`` = 0 means no 1x1 conv after the blocks; ``head_prefix`` names it
    (``'last'``: ``last_conv``/``last_bn``, MobileNetV2; ``'head'``: ``head_conv``/``head_bn``, timm's
    ``mobilenetv1_100h``).
    """

    stem_channels: int
    blocks: tuple[Block, ...]
    head_channels: int = 0
    head_prefix: str = "last"
    activation: str = "relu6"  # the stem's and the head conv's
    stem_kernel: int = 3
    in_channels: int = 3
    head_hidden: int = 0  # a dense layer (bias, activation) after the pooling, ``head_fc``; 0: none
    head_fc_norm: bool = False  # head_fc without a bias, followed by BatchNorm ``head_fc_bn`` (MobileNetV4)

    def convs(self) -> tuple[Conv, ...]:
        """Every convolution in order: the stem, each block's, the head conv."""
        convs = [
            Conv("stem_conv", "stem_bn", "full", self.in_channels, self.stem_channels, self.stem_kernel, 2,
                 self.activation)
        ]  # fmt: skip
        for i, block in enumerate(self.blocks):
            convs += block.convs(f"block_{i}")
        if self.head_channels:
            convs.append(self.head_conv())
        return tuple(convs)

    def head_conv(self) -> Conv:
        h = self.head_prefix
        out = self.head_channels
        return Conv(f"{h}_conv", f"{h}_bn", "pointwise", self.features_in(), out, 1, 1, self.activation)

    def head_fc(self) -> Conv | None:
        """The dense layer after the pooling (as a 1x1 conv with a bias and no BatchNorm), or None."""
        if not self.head_hidden:
            return None
        norm = "head_fc_bn" if self.head_fc_norm else ""
        return Conv("head_fc", norm, "pointwise", self.pooled_channels, self.head_hidden, 1, 1, self.activation)

    @property
    def pooled_channels(self) -> int:
        """Width of the pooled vector: the head conv's, or the last block's."""
        return self.head_channels or self.features_in()

    def features_in(self) -> int:
        """Channels entering the head conv (the last block's outputs, or the stem's)."""
        return self.blocks[-1].out if self.blocks else self.stem_channels

    @property
    def num_features(self) -> int:
        """Width of the feature vector the classifier reads."""
        return self.head_hidden or self.pooled_channels

    def check(self) -> Network:
        """Raises ValueError with one sentence for a table that cannot be built; returns the table."""
        if self.stem_channels < 1 or self.activation not in ACTIVATIONS:
            raise ValueError(
                f"The stem needs positive channels and an activation in {ACTIVATIONS}, got "
                f"{self.stem_channels} and {self.activation!r}."
            )
        if self.head_prefix not in ("last", "head"):
            raise ValueError(f"head_prefix must be 'last' or 'head', got {self.head_prefix!r}.")
        if self.head_channels < 0 or self.head_hidden < 0:
            raise ValueError(
                f"head_channels and head_hidden must be >= 0, got {self.head_channels} and {self.head_hidden}."
            )
        channels = self.stem_channels
        for i, block in enumerate(self.blocks):
            block.check(i)
            if block.in_channels != channels:
                raise ValueError(f"Block {i} takes {block.in_channels} channels; the layer before gives {channels}.")
            channels = block.out
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (``model.json``)."""
        return {**self._asdict(), "blocks": [block._asdict() for block in self.blocks]}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Network:
        try:
            blocks = tuple(Block(**block) for block in record["blocks"])
            return cls(**{**record, "blocks": blocks}).check()
        except (TypeError, KeyError) as error:
            raise ValueError(f"A network table needs stem_channels and blocks of Block fields: {error}.") from None


def at(tree: Mapping, path: str) -> Any:
    """The entry of a variables tree (``params`` or ``batch_stats``) at a table path, e.g. ``'block_3/bn_dw'``."""
    for key in path.split("/"):
        tree = tree[key]
    return tree


def replace_at(tree: Mapping, path: str, value: Any) -> dict:
    """A copy of ``tree`` with the entry at a table path replaced by ``value`` (the dicts along the path copied,
    everything else shared)."""
    key, _, rest = path.partition("/")
    return {**tree, key: replace_at(tree[key], rest, value) if rest else value}


# ----------------------------------------------------------------------------- channel groups


class Group(NamedTuple):
    """Tensors that share one channel axis: pruning a channel slices all of them together.

    ``producers`` write the channels (their kernels' output axis and their BatchNorm),
    ``passes`` carry them through per channel (depthwise kernels and their BatchNorm),
    ``readers`` take them as inputs (kernels' input axis; ``'classifier'`` for the dense
    layer). A group has several producers where residual adds join their outputs.
    """

    producers: tuple[Conv, ...]
    passes: tuple[Conv, ...]
    readers: tuple[str, ...]

    @property
    def channels(self) -> int:
        return self.producers[0].out_channels


def channel_groups(network: Network, classifier: bool = True) -> tuple[Group, ...]:
    """The channel groups of ``network``, in the order their first producer runs.

    Derived from the table alone: a convolution that is not depthwise starts a group
    (its outputs), a depthwise one passes its input's group through, every
    non-depthwise convolution reads the group before it, and a residual block's
    projection joins the group of the block's input. A squeeze-excitation reads the
    depthwise layer's group, its reduced channels are a group of their own, and its
    expand conv's outputs (which scale the depthwise outputs channel by channel) join the
    depthwise layer's group as a producer.
    """
    groups: list[dict[str, list]] = []

    def start(conv: Conv) -> int:
        groups.append({"producers": [conv], "passes": [], "readers": []})
        return len(groups) - 1

    current = start(network.convs()[0])  # the stem
    for i, block in enumerate(network.blocks):
        block_input = current
        for conv in block.convs(f"block_{i}"):
            if conv.kind == "depthwise":
                groups[current]["passes"].append(conv)
                if block.se_channels:
                    reduce, expand = block.se_convs(f"block_{i}")
                    groups[current]["readers"].append(reduce.path)
                    groups[current]["producers"].append(expand)
                    groups[start(reduce)]["readers"].append(expand.path)
                continue
            groups[current]["readers"].append(conv.path)
            if block.residual and conv.name == "conv_pwl":
                groups[block_input]["producers"].append(conv)
                current = block_input
            else:
                current = start(conv)
    if network.head_channels:
        groups[current]["readers"].append(network.head_conv().path)
        current = start(network.head_conv())
    if network.head_hidden:
        groups[current]["readers"].append(network.head_fc().path)
        current = start(network.head_fc())
    if classifier:
        groups[current]["readers"].append("classifier")
    return tuple(Group(tuple(g["producers"]), tuple(g["passes"]), tuple(g["readers"])) for g in groups)


def resize(network: Network, widths) -> Network:
    """``network`` with each channel group of :func:`channel_groups` at the width given for it, in order."""
    groups = channel_groups(network, classifier=False)
    if len(widths) != len(groups):
        raise ValueError(f"The network has {len(groups)} channel groups; {len(widths)} widths were given.")
    width_of = {conv.path: int(w) for group, w in zip(groups, widths, strict=True) for conv in group.producers}
    width_of.update({conv.path: int(w) for group, w in zip(groups, widths, strict=True) for conv in group.passes})
    blocks, channels = [], width_of["stem_conv"]
    for i, block in enumerate(network.blocks):
        hidden_path = block.hidden_path(f"block_{i}")
        hidden = width_of[hidden_path] if hidden_path else channels
        out = width_of[block.convs(f"block_{i}")[-1].path]
        se = width_of[f"block_{i}/se/conv_reduce"] if block.se_channels else 0
        blocks.append(block._replace(in_channels=channels, hidden=hidden, out=out, se_channels=se))
        channels = out
    head = width_of[network.head_conv().path] if network.head_channels else 0
    hidden = width_of["head_fc"] if network.head_hidden else 0
    return network._replace(
        stem_channels=width_of["stem_conv"], blocks=tuple(blocks), head_channels=head, head_hidden=hidden
    ).check()
