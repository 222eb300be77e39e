"""Pieces MobileNetV1 and MobileNetV2 share: layer factories, the input check, the stem and the head.

Both networks are ``stem -> blocks -> (last conv) -> global average pool ->
classifier``; only the blocks differ. The functions here are called from inside a
model's ``@nn.compact`` ``__call__``, so the submodules they create belong to that
model and keep its explicit parameter names (``stem_conv``, ``stem_bn``,
``classifier``).

:func:`reset_classifier` replaces the classifier of loaded variables (timm's
``reset_classifier``, as a function on variables), e.g. to fine-tune a converted
1000-class model on 10 classes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mobilenet_jax.models import layers, table


class Layers(NamedTuple):
    """Layer constructors with a model's dtype, BatchNorm, padding and depthwise settings bound."""

    conv: Callable[..., nn.Module]  # k x k convolution (the stem)
    norm: Callable[..., Callable]  # BatchNorm in the model's train/eval mode (nothing in the folded form)
    pointwise: Callable[..., nn.Module]  # 1x1 convolution
    depthwise: Callable[..., nn.Module]  # per-channel k x k convolution
    padding: str
    squeeze_excite: Callable[..., nn.Module]  # the same in both forms: its convolutions have biases, no BatchNorm
    fuse_batchnorm: bool = False  # depthwise convs on the C++ kernels apply the BatchNorms next to them (conv_bn)


def layer_factories(model: nn.Module, train: bool) -> Layers:
    """The constructors every layer of ``model`` uses; ``model`` has the MobileNet runtime fields.

    With ``model.folded`` (the inference form, see :mod:`mobilenet_jax.models.fold`) the
    convolutions carry a bias, BatchNorm is gone, and every convolution is one XLA
    convolution op (what converters such as LiteRT's fuse with the bias and activation).
    """
    precision = dict(dtype=model.dtype, param_dtype=model.param_dtype)
    depthwise = functools.partial(layers.DepthwiseConv, padding=model.padding, **precision)
    squeeze_excite = functools.partial(SqueezeExcite, **precision)
    if model.folded:
        conv = functools.partial(nn.Conv, use_bias=True, **precision)
        return Layers(
            conv=conv,
            norm=lambda name, activation=None: _activation_only(activation),
            pointwise=lambda features, name: conv(features, (1, 1), padding="VALID", name=name),
            depthwise=functools.partial(depthwise, implementation="xla", use_bias=True),
            padding=model.padding,
            squeeze_excite=squeeze_excite,
        )
    return Layers(
        conv=functools.partial(
            layers.Conv,
            use_bias=False,
            kernel_init=layers.conv_kernel_init,
            implementation=model.depthwise_impl,
            **precision,
        ),
        norm=functools.partial(
            layers.BatchNorm,
            implementation=_batchnorm_implementation(model.depthwise_impl),
            use_running_average=not train,
            momentum=model.bn_momentum,
            epsilon=model.bn_epsilon,
            axis_name=model.bn_axis_name,
            **precision,
        ),
        pointwise=functools.partial(layers.PointwiseConv, **precision),
        depthwise=functools.partial(depthwise, implementation=model.depthwise_impl),
        padding=model.padding,
        squeeze_excite=squeeze_excite,
        fuse_batchnorm=model.fuse_batchnorm,
    )


def _identity(x: jax.Array) -> jax.Array:
    return x


def _batchnorm_implementation(depthwise_impl: str) -> str:
    """The BatchNorm's: the kernels where the depthwise convs take them ('ffi', 'auto' on CPU), else flax's code."""
    return "ffi" if layers.resolve_depthwise_impl(depthwise_impl) == "ffi" else "xla"


def _activation_only(name: str | None) -> Callable:
    """The folded model's stand-in for a BatchNorm (gone into the convolution) that applies ``name``."""
    return activation(name)


def check_images(x: jax.Array, architecture: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{architecture} expects NHWC images of rank 4, got shape {x.shape}.")


ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "hard_swish": nn.hard_swish,  # x * relu6(x + 3) / 6, as torch's Hardswish (MobileNetV3)
    "hard_sigmoid": nn.hard_sigmoid,  # relu6(x + 3) / 6, as torch's Hardsigmoid
    "sigmoid": nn.sigmoid,
}


def activation(name: str | None) -> Callable:
    if name is None:
        return _identity
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}.")
    return ACTIVATIONS[name]


def conv_bn(make: Layers, conv: table.Conv, x: jax.Array | layers.Deferred, following: table.Conv | None = None):
    """One table row's convolution, its BatchNorm and activation, named as the table names them.

    ReLU/ReLU6 are the BatchNorm call's own (on CPU its backward recomputes the mask). On the C++
    kernels' path (``make.fuse_batchnorm``) the BatchNorms next to a depthwise conv run inside its
    custom call: in inference its own BatchNorm and activation are applied to each output before it
    is stored; and where ``following`` (the table's next convolution, if this one's output feeds it
    alone) is a depthwise conv on the kernels, this row's BatchNorm and activation are returned
    undone (a :class:`~mobilenet_jax.models.layers.Deferred`) for that call to apply as it reads its
    input, in training and inference. BatchNorm's ``__call__`` then does not run.
    """
    own = conv.activation if conv.activation in layers.BATCHNORM_ACTIVATIONS else None
    norm = make.norm(name=conv.norm_name, activation=own)
    if conv.kind == "depthwise":
        layer = make.depthwise(kernel_size=conv.kernel, strides=conv.stride, name=conv.name)
        affine = norm.inference_affine(x) if make.fuse_batchnorm and layer.uses_kernels(x) else None
        if affine is not None:
            y = layer(x, batchnorm=(*affine, own))
            return y if own is not None else activation(conv.activation)(y)
        y = layer(x)
    elif conv.kind == "pointwise":
        y = make.pointwise(conv.out_channels, name=conv.name)(layers.materialize(x))
    else:
        pads = tuple(layers.pad_amounts(n, conv.kernel, conv.stride, make.padding) for n in x.shape[1:3])
        layer = make.conv(conv.out_channels, (conv.kernel,) * 2, strides=conv.stride, padding=pads, name=conv.name)
        y = layer(layers.materialize(x))
    deferred = _deferred(make, norm, conv, y, following)
    if deferred is not None:
        return deferred
    x = norm(y)
    return x if own is not None else activation(conv.activation)(x)


def _deferred(make: Layers, norm, conv: table.Conv, y: jax.Array, following: table.Conv | None):
    """``norm`` and ``conv``'s activation on ``y``, left to ``following`` where it is a depthwise conv that
    applies them inside its kernel call (else None: they are applied now)."""
    if not make.fuse_batchnorm or following is None or following.kind != "depthwise":
        return None
    if conv.activation is not None and conv.activation not in layers.BATCHNORM_ACTIVATIONS:
        return None
    reader = make.depthwise(kernel_size=following.kernel, strides=following.stride, parent=None)
    return norm.deferred(y) if reader.takes_deferred(y) else None


class SqueezeExcite(nn.Module):
    """Squeeze-excitation of a table block (``block.se_channels`` > 0): pool, reduce, expand, gate, scale."""

    block: table.Block
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        for conv in self.block.se_convs(""):
            layer = nn.Conv(conv.out_channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name=conv.name)
            scale = activation(conv.activation)(layer(scale))
        return x * scale


class TableBlock(nn.Module):
    """One :class:`~mobilenet_jax.models.table.Block` row: its convolutions in order, the squeeze-excitation
    after the depthwise one, and the shortcut. ``following``: the next block's first convolution, where this
    block's output feeds it alone (see :func:`conv_bn`)."""

    block: table.Block
    make: Layers
    following: table.Conv | None = None

    @nn.compact
    def __call__(self, x: jax.Array | layers.Deferred) -> jax.Array | layers.Deferred:
        if self.block.residual:
            x = layers.materialize(x)
        shortcut = x
        convs = self.block.convs("")
        for i, conv in enumerate(convs):
            following = convs[i + 1] if i + 1 < len(convs) else self.following
            if (conv.kind == "depthwise" and self.block.se_channels) or (self.block.residual and i + 1 == len(convs)):
                following = None  # read by the squeeze-excitation, or added to the shortcut
            x = conv_bn(self.make, conv, x, following)
            if conv.kind == "depthwise" and self.block.se_channels:
                x = self.make.squeeze_excite(self.block, name="se")(x)
        return x + shortcut if self.block.residual else x


class MobileNetBase(nn.Module):
    """What every table-built MobileNet shares: how it runs (keyword-only fields) and its forward pass.

    Subclasses add the fields that describe their architecture and define
    ``network()`` (the :class:`~mobilenet_jax.models.table.Network` those fields give)
    and ``with_network(network)`` (the same model with a resized network's channel counts).
    ``model.apply(variables, images, train=False)`` returns logits; with
    ``return_features=True``, ``(logits, features)`` (see :func:`forward`).
    """

    _: dataclasses.KW_ONLY
    padding: str = "torch"  # 'torch', 'tf' or 'keras_v1' (see mobilenet_jax.models.layers)
    dtype: Any = jnp.float32  # computation dtype, e.g. jnp.bfloat16; param_dtype stores the parameters
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None  # mapped/sharded axis over which to average BatchNorm statistics
    depthwise_impl: str = "auto"  # 'auto' (per backend), 'xla', 'shift' or 'ffi'; the parameters are the same
    folded: bool = False  # the inference form: BatchNorm folded into convolution biases (models.fold)
    # Inference on the C++ kernels: each depthwise conv's BatchNorm and ReLU/ReLU6 applied inside its call.
    # False keeps every BatchNorm a call of its own (for code that intercepts BatchNorm inputs).
    fuse_batchnorm: bool = True

    def network(self) -> table.Network:
        raise NotImplementedError(f"{type(self).__name__} does not describe its architecture table.")

    def with_network(self, network: table.Network) -> MobileNetBase:
        raise NotImplementedError(f"{type(self).__name__} cannot take a resized architecture table.")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        return forward(self, self.network(), x, train, return_features, getattr(self, "dropout_rate", 0.0))


def forward(
    model: nn.Module, network: table.Network, x: jax.Array, train: bool, return_features: bool, dropout_rate=0.0
):
    """The body every MobileNet's ``__call__`` runs: stem, blocks and head conv of ``network``, then the head.

    ``features['stride_S']`` is the last feature map at stride S, ``features['pre_logits']`` the pooled vector.
    """
    check_images(x, type(model).__name__)
    make = layer_factories(model, train)
    convs = network.convs()
    blocks = network.blocks
    # The conv each layer's output feeds alone (a residual block's input is also its shortcut): the stem's
    # feeds block 0's first, block i's block i + 1's first, the last block's the head conv (if any).
    feeds = [None if b.residual else b.convs("")[0] for b in blocks]
    feeds.append(network.head_conv() if network.head_channels else None)
    x = conv_bn(make, convs[0], x, feeds[0])
    stride = convs[0].stride
    features = {f"stride_{stride}": x}
    for i, block in enumerate(blocks):
        x = TableBlock(block, make, feeds[i + 1], name=f"block_{i}")(x)
        stride *= block.stride
        features[f"stride_{stride}"] = x
    if network.head_channels:
        features[f"stride_{stride}"] = x = conv_bn(make, network.head_conv(), x)
    x, features = head(model, layers.materialize(x), features, train, dropout_rate, network.head_fc(), make)
    if not return_features:
        return x
    return x, {name: layers.materialize(value) for name, value in features.items()}


def head(
    model: nn.Module, x: jax.Array, features: dict, train: bool, dropout_rate: float = 0.0,
    fc: table.Conv | None = None, make: Layers | None = None,
) -> tuple[jax.Array, dict]:  # fmt: skip
    """Global average pool, the table's ``head_fc`` if any (``features['pre_logits']``), dropout and the ``classifier``.

    With ``model.num_classes=None`` the features before the classifier are the output.
    """
    x = jnp.mean(x, axis=(1, 2))
    if fc is not None:  # the dense layer after the pooling: a bias (MobileNetV3) or BatchNorm (MobileNetV4)
        bias = not fc.norm or model.folded
        dense = nn.Dense(fc.out_channels, use_bias=bias, dtype=model.dtype, param_dtype=model.param_dtype, name=fc.path)
        x = dense(x)
        if fc.norm:
            x = make.norm(name=fc.norm_name)(x)
        x = activation(fc.activation)(x)
    features["pre_logits"] = x
    if model.num_classes is not None:
        if dropout_rate:
            x = nn.Dropout(dropout_rate, deterministic=not train)(x)
        x = classifier(model.num_classes, model.dtype, model.param_dtype)(x)
    return x, features


def classifier(num_classes: int, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> nn.Dense:
    return nn.Dense(
        num_classes, dtype=dtype, param_dtype=param_dtype, kernel_init=layers.dense_kernel_init, name="classifier"
    )


def reset_classifier(
    model: nn.Module, variables: dict, num_classes: int | None, rng: jax.Array | None = None
) -> tuple[nn.Module, dict]:
    """``model`` with ``num_classes`` outputs and ``variables`` with a fresh classifier (or none).

    Every other variable is kept as it is. The new classifier is initialised as the
    models initialise theirs (weights ~ N(0, 0.01), bias 0); ``num_classes=None``
    removes it, leaving a backbone that returns the pooled features::

        model, variables = convert.from_torch("mobilenet_v2.pth")          # 1000 classes
        model, variables = reset_classifier(model, variables, num_classes=10)
    """
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}.")
    if "params" not in variables or "stem_conv" not in variables["params"]:
        raise ValueError("reset_classifier expects MobileNet variables ({'params': {'stem_conv': ...}, ...}).")
    params = {k: v for k, v in variables["params"].items() if k != "classifier"}
    if num_classes is not None:
        features = _pooled_features(model, params)
        dense = classifier(num_classes, param_dtype=model.param_dtype)
        rng = jax.random.key(0) if rng is None else rng
        params["classifier"] = dense.init(rng, jnp.zeros((1, features), model.param_dtype))["params"]
    return model.clone(num_classes=num_classes), {**variables, "params": params}


def _pooled_features(model: nn.Module, params: dict) -> int:
    """Width of the pooled feature vector, traced from the backbone itself (nothing is computed)."""
    backbone = model.clone(num_classes=None)
    images = jax.ShapeDtypeStruct((1, 32, 32, params["stem_conv"]["kernel"].shape[2]), jnp.float32)
    return jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x)[0], images).shape[-1]
