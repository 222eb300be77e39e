"""BatchNorm in training mode with its per-channel sums in the C++ CPU kernel of ``batchnorm.cc``.

:func:`batch_norm_train` computes what ``flax.linen.BatchNorm`` computes in training mode
(statistics over every axis but the last, ``var = E[x^2] - E[x]^2`` clipped at 0, averaged
over ``axis_name`` when given), with a ``custom_vjp``: the forward statistics are one pass
over ``x``, the backward's sums (``sum dy``, ``sum dy * (x - mean)``) one pass over ``dy`` and
``x``, and the rest elementwise (which XLA fuses with the neighbouring activation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mobilenet_jax.kernels import build, shard

SUMS = "mobilenet_channel_sums"
MASKED_SUMS = "mobilenet_masked_channel_sums"
# The activations a BatchNorm call can take on (jax.nn's, whose gradient is 0 at the kinks): the upper clip.
UPPER = {"relu": float("inf"), "relu6": 6.0}
DTYPES = (jnp.float32, jnp.float64)


def available() -> bool:
    """True when the kernels are compiled and registered with XLA:CPU (built on the first call)."""
    return build.register()


def supports(x: jax.Array) -> bool:
    """Whether the kernel takes ``x``'s dtype (float32 and float64)."""
    return any(x.dtype == dtype for dtype in DTYPES)


def channel_sums(a: jax.Array, b: jax.Array, center: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum a, sum a * (b - center))`` per channel (the last axis), summed over every other axis."""
    channels = a.shape[-1]
    outputs = (shard.result_like(a, (channels,)), shard.result_like(a, (channels,)))
    call = jax.ffi.ffi_call(SUMS, outputs, vmap_method="sequential")
    return call(a, b.astype(a.dtype), center.astype(a.dtype))


def masked_channel_sums(
    dz: jax.Array, x: jax.Array, mean: jax.Array, mul: jax.Array, bias: jax.Array, upper: float
) -> tuple[jax.Array, jax.Array]:
    """:func:`channel_sums` of ``dz`` masked where ``y = (x - mean) * mul + bias`` is not in (0, upper),
    with ``b = x`` and ``center = mean``: the sums of a clipped activation's input gradient."""
    channels = x.shape[-1]
    outputs = (shard.result_like(x, (channels,)), shard.result_like(x, (channels,)))
    call = jax.ffi.ffi_call(MASKED_SUMS, outputs, vmap_method="sequential")
    vectors = (v.astype(x.dtype) for v in (mean, mul, bias))
    return call(dz.astype(x.dtype), x, *vectors, upper=np.float64(upper))


def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, mean, var)``: ``x`` normalised with its batch statistics, scaled and shifted; the statistics
    (for the running averages) carry no gradient."""
    x, scale, bias = shard.same_varying_axes(x, scale, bias)
    y, mean, var = _batch_norm(x, scale, bias, epsilon, axis_name)
    return y, lax.stop_gradient(mean), lax.stop_gradient(var)


def _count(x: jax.Array, axis_name: str | None):
    count = x.size // x.shape[-1]
    return count if axis_name is None else count * lax.psum(1, axis_name)


def _statistics(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    total, squares = channel_sums(x, x, jnp.zeros(x.shape[-1], x.dtype))
    return _statistics_of(total, squares, x, axis_name)


def batch_statistics(x: jax.Array, axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(mean, var)`` of ``x`` per channel (over ``axis_name`` too when given), as :func:`batch_norm_train`
    computes them (one pass of the sums' kernel), differentiable: for a BatchNorm whose normalisation is
    applied elsewhere (a depthwise call's prologue, :func:`~mobilenet_jax.kernels.depthwise.depthwise_conv_affine`).

    The sums' gradient is one elementwise pass (``dsum + 2 x dsquares``); the sum over ``axis_name``
    and the arithmetic to ``(mean, var)`` are JAX's, differentiated as they are.
    """
    (x,) = shard.same_varying_axes(x)
    total, squares = _moments(x)
    return _statistics_of(total, squares, x, axis_name)


def _statistics_of(total, squares, x, axis_name):
    """``(mean, var)`` from this device's sums: summed over ``axis_name``, ``var = E[x^2] - E[x]^2`` clipped at 0."""
    if axis_name is not None:
        total, squares = lax.psum((total, squares), axis_name)
    count = _count(x, axis_name)
    mean = total / count
    return mean, jnp.maximum(0.0, squares / count - mean * mean)


@jax.custom_vjp
def _moments(x):
    return channel_sums(x, x, jnp.zeros(x.shape[-1], x.dtype))


def _moments_forward(x):
    total, squares = _moments(x)
    return (total, squares), (x, total / (x.size // x.shape[-1]))


def _moments_backward(residuals, cotangents):
    """``dsum + 2 x dsquares``, written around this device's mean (``dsum + 2 mean dsquares`` per channel first)."""
    x, mean = residuals
    dtotal, dsquares = cotangents
    return ((dtotal + 2 * mean * dsquares + (x - mean) * (2 * dsquares)).astype(x.dtype),)


_moments.defvjp(_moments_forward, _moments_backward)


def _forward(x, scale, bias, epsilon, axis_name):
    mean, var = _statistics(x, axis_name)
    rstd = lax.rsqrt(var + epsilon)
    y = (x - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, scale, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, scale, bias, epsilon, axis_name):
    return _forward(x, scale, bias, epsilon, axis_name)[0]


def _backward(epsilon, axis_name, residuals, cotangents):
    dy = cotangents[0]  # the statistics' cotangents are zero: batch_norm_train stops their gradient
    x, scale, mean, rstd = residuals
    dbias, centered = channel_sums(dy, x, mean)  # sum dy, sum dy * (x - mean) over this device's batch
    dscale = centered * rstd
    if axis_name is not None:  # the statistics are the whole batch's: so are the sums in dx
        dbias_all, centered_all = lax.psum((dbias, centered), axis_name)
    else:
        dbias_all, centered_all = dbias, centered
    count = _count(x, axis_name)
    dx = (scale * rstd) * (dy - dbias_all / count - (x - mean) * (rstd * rstd) * (centered_all / count))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)  # scale and bias: one param dtype


_batch_norm.defvjp(_forward, _backward)


def batch_norm_activation_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None, activation: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`batch_norm_train` followed by ``activation`` ('relu' or 'relu6'), as one ``custom_vjp``.

    The backward pass recomputes the activation's mask from ``x`` inside the sums' kernel and in
    XLA's elementwise input gradient, so neither the activation's input nor its masked
    gradient is kept or written out.
    """
    x, scale, bias = shard.same_varying_axes(x, scale, bias)
    z, mean, var = _batch_norm_activation(x, scale, bias, epsilon, axis_name, UPPER[activation])
    return z, lax.stop_gradient(mean), lax.stop_gradient(var)


def _clip(y: jax.Array, upper: float) -> jax.Array:
    return jnp.maximum(y, 0.0) if upper == float("inf") else jnp.minimum(jnp.maximum(y, 0.0), upper)


def _activation_forward(x, scale, bias, epsilon, axis_name, upper):
    (y, mean, var), (_, _, _, rstd) = _forward(x, scale, bias, epsilon, axis_name)
    return (_clip(y, upper), mean, var), (x, scale, bias, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_activation(x, scale, bias, epsilon, axis_name, upper):
    return _activation_forward(x, scale, bias, epsilon, axis_name, upper)[0]


def _activation_backward(epsilon, axis_name, upper, residuals, cotangents):
    dz = cotangents[0]  # the statistics' cotangents are zero (stopped)
    x, scale, bias, mean, rstd = residuals
    mul = rstd * scale
    dbias, centered = masked_channel_sums(dz, x, mean, mul, bias, upper)
    dscale = centered * rstd
    if axis_name is not None:
        dbias_all, centered_all = lax.psum((dbias, centered), axis_name)
    else:
        dbias_all, centered_all = dbias, centered
    count = _count(x, axis_name)
    y = (x - mean) * mul + bias
    dy = jnp.where((y > 0) & (y < upper), dz, 0.0)
    dx = mul * (dy - dbias_all / count - (x - mean) * (rstd * rstd) * (centered_all / count))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_batch_norm_activation.defvjp(_activation_forward, _activation_backward)
