"""Dense k x k convolution with few input channels (a stem) through the C++ CPU kernels of ``conv.cc``.

:func:`conv` computes what ``lax.conv_general_dilated`` computes for an NHWC input and an HWIO
kernel without groups, in float32/float64, with a ``custom_vjp``: the kernel gradient is one more
custom call; the input gradient is XLA's (needed only when differentiating with respect to the
images, and dropped by XLA otherwise). Neither pass writes the k*k*C patches that the matrix-product
form (:func:`mobilenet_jax.models.layers.conv_as_matmul`) materialises. Worth it where the patch is
small (:data:`MAX_TAPS`): the product then has a short inner dimension.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mobilenet_jax.kernels import build, shard

FORWARD = "mobilenet_conv_forward"
KERNEL_GRADIENT = "mobilenet_conv_kernel_gradient"
DTYPES = (jnp.float32, jnp.float64)
MAX_TAPS = 32  # k * k * C_in up to this: a 3x3 stem on RGB (27) or on 3 channels plus one


def available() -> bool:
    """True when the kernels are compiled and registered with XLA:CPU (built on the first call)."""
    return build.register()


def supports(x: jax.Array, kernel_shape: tuple[int, ...]) -> bool:
    """Whether the kernel computes this layer: float32/float64 and a patch of at most MAX_TAPS values."""
    k, k2, c_in, _ = kernel_shape
    return k == k2 and k * k * c_in <= MAX_TAPS and any(x.dtype == dtype for dtype in DTYPES)


def conv(x: jax.Array, kernel: jax.Array, strides: int, padding: tuple) -> jax.Array:
    """NHWC ``x`` with a (k, k, C, O) kernel, stride ``strides``, ``padding`` ((top, bottom), (left, right)) zeros."""
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    x, kernel = shard.same_varying_axes(x, kernel)
    return _conv(x, kernel, int(strides), padding)


def _out_shape(x, kernel, strides, padding):
    k = kernel.shape[0]
    (top, bottom), (left, right) = padding
    out_h = (x.shape[1] + top + bottom - k) // strides + 1
    out_w = (x.shape[2] + left + right - k) // strides + 1
    return x.shape[0], out_h, out_w, kernel.shape[-1]


def _attributes(strides, padding) -> dict:
    return dict(stride=np.int64(strides), top=np.int64(padding[0][0]), left=np.int64(padding[1][0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
    out = shard.result_like(x, _out_shape(x, kernel, strides, padding))
    return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(x, kernel, **_attributes(strides, padding))


def _forward(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    call = jax.ffi.ffi_call(KERNEL_GRADIENT, shard.result_like(kernel, kernel.shape), vmap_method="sequential")
    dkernel = call(x, kernel, dy, **_attributes(strides, padding))

    def xla_conv(x):
        dimensions = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, kernel, (strides, strides), padding, dimension_numbers=dimensions)

    (dx,) = jax.vjp(xla_conv, x)[1](dy)
    return dx, dkernel


_conv.defvjp(_forward, _backward)
