"""Depthwise convolution through the C++ CPU kernels of ``depthwise.cc`` (``jax.ffi`` custom calls).

:func:`depthwise_conv` computes what ``lax.conv_general_dilated(..., feature_group_count=C)``
computes, for NHWC float32/float64 inputs and a ``(k, k, 1, C)`` kernel with symmetric zero
padding, with a ``custom_vjp`` whose backward pass is one more custom call (input and kernel
gradients). :func:`depthwise_conv_affine` is the same forward pass with per-channel maps (a
BatchNorm and its ReLU/ReLU6) on its input, applied as each input row is first read, and/or on
its output, applied before each output is stored: the BatchNorms on either side of the
convolution then never write their outputs. Under ``vmap`` the calls run once per mapped element. The kernels exist
for the CPU only: :func:`available` says whether they are built and registered here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mobilenet_jax.kernels import batchnorm, build, shard

FORWARD = "mobilenet_depthwise_forward"
FORWARD_AFFINE = "mobilenet_depthwise_forward_affine"
BACKWARD = "mobilenet_depthwise_backward"
BACKWARD_PROLOGUE = "mobilenet_depthwise_backward_prologue"
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


def depthwise_conv_affine(
    x: jax.Array,
    kernel: jax.Array,
    strides: int,
    padding: int,
    prologue: tuple | None = None,
    epilogue: tuple | None = None,
) -> jax.Array:
    """``post(depthwise_conv(pre(x), kernel))`` as one custom call, where ``pre`` and ``post`` are per-channel maps.

    ``prologue`` and ``epilogue`` are None (no map) or ``(center, scale, offset, activation)``: the map
    ``activation((v - center) * scale + offset)`` with (C,) arrays and ``activation`` None, 'relu' or
    'relu6'. A BatchNorm is ``(mean, scale * rsqrt(var + epsilon), bias)``, flax's own formula (with the
    batch statistics in training, the running ones in inference). The prologue is applied to each input
    row as the kernel first reads it, so ``pre(x)`` is never written to memory nor kept for the
    backward pass, which recomputes it row by row; the epilogue is applied before each output is
    stored. Differentiable in every array argument.
    """
    for name, affine in (("prologue", prologue), ("epilogue", epilogue)):
        if affine is not None and (len(affine) != 4 or affine[3] not in ACTIVATIONS):
            raise ValueError(
                f"{name} must be (center, scale, offset, activation) with activation one of "
                f"{sorted(a for a in ACTIVATIONS if a)} or None."
            )
    if prologue is None and epilogue is None:
        return depthwise_conv(x, kernel, strides, padding)
    maps = (*(prologue or _unused(x))[:3], *(epilogue or _unused(x))[:3])
    x, kernel, *maps = shard.same_varying_axes(x, kernel, *(v.astype(x.dtype) for v in maps))
    activations = (None if prologue is None else prologue[3], None if epilogue is None else epilogue[3])
    if epilogue is None:
        return _depthwise_prologue(x, kernel, *maps[:3], strides, padding, activations[0])
    present = (prologue is not None, True)
    return _depthwise_affine(x, kernel, *maps, strides, padding, activations, present)


def _unused(x: jax.Array) -> tuple:
    """Stand-ins for an absent map's (C,) arrays (the call's signature is fixed; the kernel ignores them)."""
    zeros = jnp.zeros(x.shape[-1], x.dtype)
    return zeros, zeros, zeros


def _code(activation: str | None, present: bool = True) -> np.int64:
    """The map's activation as depthwise.cc numbers it; -1 for no map."""
    return np.int64(ACTIVATIONS[activation][0] if present else -1)


def _affine_call(x, kernel, maps, strides, padding, activations, present):
    call = jax.ffi.ffi_call(FORWARD_AFFINE, _output_like(x, kernel, strides, padding), vmap_method="sequential")
    return call(
        x,
        kernel,
        *maps,
        stride=np.int64(strides),
        padding=np.int64(padding),
        prologue=_code(activations[0], present[0]),
        epilogue=_code(activations[1], present[1]),
    )


def _apply(v: jax.Array, center, scale, offset, activation: str | None) -> jax.Array:
    return ACTIVATIONS[activation][1]((v - center) * scale + offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _depthwise_prologue(x, kernel, center, scale, offset, strides, padding, activation):
    maps = (center, scale, offset, *_unused(x))
    return _affine_call(x, kernel, maps, strides, padding, (activation, None), (True, False))


def _prologue_forward(x, kernel, center, scale, offset, strides, padding, activation):
    y = _depthwise_prologue(x, kernel, center, scale, offset, strides, padding, activation)
    return y, (x, kernel, center, scale, offset)


def _prologue_backward(strides, padding, activation, residuals, dy):
    """The convolution's gradients with respect to the mapped input ``z`` and the kernel (``z`` recomputed
    row by row in the call), then the map's: ``g = dz`` where the activation passes it, and its sums."""
    x, kernel, center, scale, offset = residuals
    outputs = (shard.result_like(x, x.shape), shard.result_like(kernel, kernel.shape))
    call = jax.ffi.ffi_call(BACKWARD_PROLOGUE, outputs, vmap_method="sequential")
    dz, dkernel = call(
        x,
        kernel,
        dy.astype(x.dtype),
        center,
        scale,
        offset,
        stride=np.int64(strides),
        padding=np.int64(padding),
        prologue=_code(activation),
    )
    if activation is None:
        g = dz
        g_sum, g_centered = batchnorm.channel_sums(dz, x, center)
    else:
        upper = batchnorm.UPPER[activation]
        g_sum, g_centered = batchnorm.masked_channel_sums(dz, x, center, scale, offset, upper)
        pre = (x - center) * scale + offset
        g = jnp.where((pre > 0) & (pre < upper), dz, 0.0)
    return g * scale, dkernel, -g_sum * scale, g_centered, g_sum


_depthwise_prologue.defvjp(_prologue_forward, _prologue_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _depthwise_affine(x, kernel, c_in, s_in, o_in, c_out, s_out, o_out, strides, padding, activations, present):
    maps = (c_in, s_in, o_in, c_out, s_out, o_out)
    return _affine_call(x, kernel, maps, strides, padding, activations, present)


def _affine_forward(x, kernel, c_in, s_in, o_in, c_out, s_out, o_out, strides, padding, activations, present):
    arrays = (x, kernel, c_in, s_in, o_in, c_out, s_out, o_out)
    return _depthwise_affine(*arrays, strides, padding, activations, present), arrays


def _affine_backward(strides, padding, activations, present, residuals, dy):
    """Differentiates the composition, whose convolution (with the prologue, if any) is recomputed."""

    def composition(x, kernel, c_in, s_in, o_in, c_out, s_out, o_out):
        if present[0]:
            y = _depthwise_prologue(x, kernel, c_in, s_in, o_in, strides, padding, activations[0])
        else:
            y = _depthwise(x, kernel, strides, padding)
        return _apply(y, c_out, s_out, o_out, activations[1])

    return jax.vjp(composition, *residuals)[1](dy)


_depthwise_affine.defvjp(_affine_forward, _affine_backward)


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
    """``activation((depthwise_conv(x, kernel) - center) * scale + offset)``: :func:`depthwise_conv_affine`
    with that epilogue (an inference-mode BatchNorm and its ReLU/ReLU6 applied before each output is stored)."""
    return depthwise_conv_affine(x, kernel, strides, padding, epilogue=(center, scale, offset, activation))
