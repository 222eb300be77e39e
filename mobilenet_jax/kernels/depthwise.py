"""Depthwise convolution through the C++ CPU kernels of ``depthwise.cc`` (``jax.ffi`` custom calls).

:func:`depthwise_conv` computes what ``lax.conv_general_dilated(..., feature_group_count=C)``
computes, for NHWC float32/float64 inputs and a ``(k, k, 1, C)`` kernel with symmetric zero
padding, with a ``custom_vjp`` whose backward pass is one more custom call (input and kernel
gradients). :func:`depthwise_conv_batchnorm` is the same forward pass with an inference-mode
BatchNorm and ReLU/ReLU6 applied before each output is stored (one pass over the output
instead of three). Under ``vmap`` the calls run once per mapped element. The kernels exist
for the CPU only: :func:`available` says whether they are built and registered here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mobilenet_jax.kernels import build, shard

FORWARD = "mobilenet_depthwise_forward"
FORWARD_BATCHNORM = "mobilenet_depthwise_forward_bn"
BACKWARD = "mobilenet_depthwise_backward"
DTYPES = (jnp.float32, jnp.float64)
# The activations the forward call can apply, as depthwise.cc numbers them.
ACTIVATIONS = {None: (0, lambda v: v), "relu": (1, jax.nn.relu), "relu6": (2, jax.nn.relu6)}


def available() -> bool:
    """True when the kernels are compiled and registered with XLA:CPU (built on the first call)."""
    return build.register()


def supports(x: jax.Array) -> bool:
    """Whether the kernels take ``x``'s dtype (float32 and float64; other dtypes use another implementation)."""
    return any(x.dtype == dtype for dtype in DTYPES)


def _out_size(size: int, k: int, strides: int, padding: int) -> int:
    return (size + 2 * padding - k) // strides + 1


def _output_like(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.ShapeDtypeStruct:
    """The forward calls' result: (N, out_h, out_w, C) in x's dtype (and, under shard_map, its varying axes)."""
    k = kernel.shape[0]
    n, h, w, c = x.shape
    return shard.result_like(x, (n, _out_size(h, k, strides, padding), _out_size(w, k, strides, padding), c))


def _forward_call(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    call = jax.ffi.ffi_call(FORWARD, _output_like(x, kernel, strides, padding), vmap_method="sequential")
    return call(x, kernel, stride=np.int64(strides), padding=np.int64(padding))


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    """NHWC ``x`` (N, H, W, C) with a (k, k, 1, C) kernel, stride ``strides``, ``padding`` zeros on every side."""
    x, kernel = shard.same_varying_axes(x, kernel)  # under shard_map: a replicated kernel, a per-device batch
    return _depthwise(x, kernel, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    return _forward_call(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
    return _forward_call(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
    x, kernel = residuals
    outputs = (shard.result_like(x, x.shape), shard.result_like(kernel, kernel.shape))
    call = jax.ffi.ffi_call(BACKWARD, outputs, vmap_method="sequential")
    dx, dkernel = call(x, kernel, dy.astype(x.dtype), stride=np.int64(strides), padding=np.int64(padding))
    return dx, dkernel


_depthwise.defvjp(_forward, _backward)


def depthwise_conv_batchnorm(
    x: jax.Array,
    kernel: jax.Array,
    strides: int,
    padding: int,
    center: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    activation: str | None = None,
) -> jax.Array:
    """``activation((depthwise_conv(x, kernel) - center) * scale + offset)`` as one custom call.

    ``center``, ``scale`` and ``offset`` are per-channel (C,) arrays: an inference-mode BatchNorm
    is ``(running mean, scale * rsqrt(running var + epsilon), bias)``, flax's own formula.
    ``activation`` is None, 'relu' or 'relu6'. Differentiable: the backward pass recomputes the
    convolution and differentiates the composition.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(a for a in ACTIVATIONS if a)} or None.")
    x, kernel, center, scale, offset = shard.same_varying_axes(x, kernel, center, scale, offset)
    return _depthwise_batchnorm(x, kernel, center, scale, offset, strides, padding, activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _depthwise_batchnorm(x, kernel, center, scale, offset, strides, padding, activation):
    out = _output_like(x, kernel, strides, padding)
    call = jax.ffi.ffi_call(FORWARD_BATCHNORM, out, vmap_method="sequential")
    return call(
        x,
        kernel,
        *(v.astype(x.dtype) for v in (center, scale, offset)),
        stride=np.int64(strides),
        padding=np.int64(padding),
        activation=np.int64(ACTIVATIONS[activation][0]),
    )


def _composition(x, kernel, center, scale, offset, strides, padding, activation):
    """What the forward call computes, from the differentiable convolution: its backward pass."""
    return ACTIVATIONS[activation][1]((_depthwise(x, kernel, strides, padding) - center) * scale + offset)


def _batchnorm_forward(x, kernel, center, scale, offset, strides, padding, activation):
    y = _depthwise_batchnorm(x, kernel, center, scale, offset, strides, padding, activation)
    return y, (x, kernel, center, scale, offset)


def _batchnorm_backward(strides, padding, activation, residuals, dy):
    composition = functools.partial(_composition, strides=strides, padding=padding, activation=activation)
    return jax.vjp(composition, *residuals)[1](dy)


_depthwise_batchnorm.defvjp(_batchnorm_forward, _batchnorm_backward)
