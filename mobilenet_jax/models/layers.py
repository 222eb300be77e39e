"""Building blocks shared by MobileNetV1 and MobileNetV2.

Every layer pads as PyTorch does (``padding=k // 2`` on each side) rather than
TensorFlow's 'SAME', which pads stride-2 layers asymmetrically: with symmetric
padding a converted PyTorch checkpoint gives the same logits in Flax.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from jax import lax

Dtype = Any

# He-normal on fan_out, as torchvision and the design notes initialise convolutions
# (std = sqrt(2 / (k * k * out_channels)); for a depthwise kernel out_channels = C).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torchvision and the design notes: classifier weights ~ N(0, 0.01), bias 0.
dense_kernel_init = nn.initializers.normal(stddev=0.01)

DepthwiseImpl = Literal["auto", "xla", "shift"]
DEPTHWISE_IMPLEMENTATIONS = ("auto", "xla", "shift")


def resolve_depthwise_impl(implementation: str, backend: str | None = None) -> str:
    """Returns the concrete depthwise implementation ('xla' or 'shift') for a backend.

    XLA:CPU's grouped convolution is many times slower than nine shifted
    multiply-adds, while on GPU/TPU the native grouped convolution wins, so 'auto'
    picks per backend.
    """
    if implementation not in DEPTHWISE_IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLEMENTATIONS}, got {implementation!r}.")
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    return "shift" if backend == "cpu" else "xla"


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int, implementation: str) -> jax.Array:
    """Per-channel 2-D convolution of NHWC ``x`` with a ``(k, k, 1, C)`` kernel.

    Both implementations compute the same function; they differ only in the XLA ops
    they lower to, so the parameter layout never depends on the backend.
    """
    k = kernel.shape[0]
    if implementation == "xla":
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(strides, strides),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    if implementation != "shift":
        raise ValueError(f"Unknown depthwise implementation {implementation!r}.")
    # Sum of k*k strided slices of the padded input, each scaled per channel.
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h = (x.shape[1] + 2 * padding - k) // strides + 1
    out_w = (x.shape[2] + 2 * padding - k) // strides + 1
    out = None
    for i in range(k):
        for j in range(k):
            window = lax.slice(
                xp,
                (0, i, j, 0),
                (xp.shape[0], i + strides * (out_h - 1) + 1, j + strides * (out_w - 1) + 1, xp.shape[3]),
                (1, strides, strides, 1),
            )
            term = window * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class DepthwiseConv(nn.Module):
    """k x k depthwise convolution without bias.

    The parameter is ``kernel`` of shape ``(k, k, 1, C)``: exactly what
    ``nn.Conv(C, (k, k), feature_group_count=C)`` creates, so checkpoints do not
    depend on ``implementation`` ('auto' = per backend, 'xla' = grouped
    convolution, 'shift' = k*k shifted multiply-adds).
    """

    kernel_size: int = 3
    strides: int = 1
    implementation: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, channels), self.param_dtype
        )
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        return depthwise_conv(
            x, kernel, self.strides, self.kernel_size // 2, resolve_depthwise_impl(self.implementation)
        )


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count to the nearest multiple of ``divisor`` without losing more than 10%.

    Same rule as torchvision's ``_make_divisible`` (from the TF reference), so that
    every torchvision ``width_mult`` gives identical channel counts.
    """
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value
