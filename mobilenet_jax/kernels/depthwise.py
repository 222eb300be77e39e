"""Depthwise convolution through the C++ CPU kernels of ``depthwise.cc`` (``jax.ffi`` custom calls).

:func:`depthwise_conv` computes what ``lax.conv_general_dilated(..., feature_group_count=C)``
computes, for NHWC float32/float64 inputs and a ``(k, k, 1, C)`` kernel with symmetric zero
padding, with a ``custom_vjp`` whose backward pass is one more custom call (input and kernel
gradients). Under ``vmap`` the calls run once per mapped element. The kernels exist for the
CPU only: :func:`available` says whether they are built and registered here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mobilenet_jax.kernels import build, shard

FORWARD = "mobilenet_depthwise_forward"
BACKWARD = "mobilenet_depthwise_backward"
DTYPES = (jnp.float32, jnp.float64)


def available() -> bool:
    """True when the kernels are compiled and registered with XLA:CPU (built on the first call)."""
    return build.register()


def supports(x: jax.Array) -> bool:
    """Whether the kernels take ``x``'s dtype (float32 and float64; other dtypes use another implementation)."""
    return any(x.dtype == dtype for dtype in DTYPES)


def _out_size(size: int, k: int, strides: int, padding: int) -> int:
    return (size + 2 * padding - k) // strides + 1


def _forward_call(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    k = kernel.shape[0]
    n, h, w, c = x.shape
    out = shard.result_like(x, (n, _out_size(h, k, strides, padding), _out_size(w, k, strides, padding), c))
    call = jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")
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
