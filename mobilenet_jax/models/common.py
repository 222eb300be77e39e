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

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mobilenet_jax.models import layers


class Layers(NamedTuple):
    """Layer constructors with a model's dtype, BatchNorm and depthwise settings bound."""

    conv: Callable[..., nn.Module]  # k x k convolution without bias (the stem)
    norm: Callable[..., nn.Module]  # BatchNorm in the model's train/eval mode
    pointwise: Callable[..., nn.Module]  # 1x1 convolution as one matrix product
    depthwise: Callable[..., nn.Module]  # per-channel 3x3 convolution


def layer_factories(model: nn.Module, train: bool) -> Layers:
    """The constructors every block of ``model`` uses; ``model`` has the MobileNet runtime fields."""
    precision = dict(dtype=model.dtype, param_dtype=model.param_dtype)
    return Layers(
        conv=functools.partial(nn.Conv, use_bias=False, kernel_init=layers.conv_kernel_init, **precision),
        norm=functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=model.bn_momentum,
            epsilon=model.bn_epsilon,
            axis_name=model.bn_axis_name,
            **precision,
        ),
        pointwise=functools.partial(layers.PointwiseConv, **precision),
        depthwise=functools.partial(
            layers.DepthwiseConv, implementation=model.depthwise_impl, padding=model.padding, **precision
        ),
    )


def check_images(x: jax.Array, architecture: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{architecture} expects NHWC images of rank 4, got shape {x.shape}.")


def stem(make: Layers, x: jax.Array, channels: int, activation: Callable, padding: str = "torch") -> jax.Array:
    """3x3 stride-2 convolution, BatchNorm and ``activation`` (``stem_conv``, ``stem_bn``)."""
    pads = tuple(layers.pad_amounts(n, 3, 2, padding) for n in x.shape[1:3])
    x = make.conv(channels, (3, 3), strides=2, padding=pads, name="stem_conv")(x)
    return activation(make.norm(name="stem_bn")(x))


ACTIVATIONS: dict[str, Callable] = {"relu": nn.relu, "relu6": nn.relu6}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}.")
    return ACTIVATIONS[name]


def head(
    model: nn.Module, x: jax.Array, features: dict, train: bool, dropout_rate: float = 0.0
) -> tuple[jax.Array, dict]:
    """Global average pool (``features['pre_logits']``), optional dropout and the ``classifier``.

    With ``model.num_classes=None`` the pooled features are the output.
    """
    x = jnp.mean(x, axis=(1, 2))
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
