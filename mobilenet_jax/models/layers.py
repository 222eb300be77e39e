"""Building blocks shared by MobileNetV1 and MobileNetV2.

Padding is a model field (:data:`PADDINGS`): ``'torch'`` (the default) pads as
PyTorch does, ``k // 2`` on each side, so converted PyTorch and timm checkpoints
give the same logits; ``'tf'`` is TensorFlow's 'SAME', which pads a stride-2 layer
on an even input one pixel at the bottom and right only (the TF-slim and
``keras.applications.MobileNetV2`` weights); ``'keras_v1'`` is what
``keras.applications.MobileNet`` does: 'SAME', except that its stride-2 depthwise
layers always pad one pixel at the bottom and right, whatever the input size.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from jax import lax

from mobilenet_jax.kernels import batchnorm as batchnorm_kernels
from mobilenet_jax.kernels import conv as conv_kernels
from mobilenet_jax.kernels import depthwise as depthwise_kernels

Dtype = Any

# He-normal on fan_out, as torchvision and the design notes initialise convolutions
# (std = sqrt(2 / (k * k * out_channels)); for a depthwise kernel out_channels = C).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torchvision and the design notes: classifier weights ~ N(0, 0.01), bias 0.
dense_kernel_init = nn.initializers.normal(stddev=0.01)

DEPTHWISE_IMPLEMENTATIONS = ("auto", "xla", "shift", "ffi")
PADDINGS = ("torch", "tf", "keras_v1")


def check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}.")


def pad_amounts(size: int, k: int, strides: int, padding: str, depthwise: bool = False) -> tuple[int, int]:
    """``(before, after)`` padding of one spatial dimension of ``size`` for a k x k layer."""
    check_padding(padding)
    if padding == "torch":
        return k // 2, k // 2
    if padding == "keras_v1" and depthwise and strides == 2:
        return k // 2 - 1, k // 2  # ZeroPadding2D(((0, 1), (0, 1))) then 'valid', for k = 3
    out = -(-size // strides)  # 'SAME': ceil(size / strides) outputs
    total = max((out - 1) * strides + k - size, 0)
    return total // 2, total - total // 2


def pad_input(x: jax.Array, k: int, strides: int, padding: str, depthwise: bool = False) -> tuple[jax.Array, int]:
    """``(x, symmetric_padding)``: asymmetric padding is applied to ``x`` here, symmetric is left to the conv."""
    (top, bottom), (left, right) = (pad_amounts(n, k, strides, padding, depthwise) for n in x.shape[1:3])
    if top == bottom == left == right:
        return x, top
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))), 0


def resolve_depthwise_impl(implementation: str, backend: str | None = None) -> str:
    """Returns the concrete depthwise implementation ('xla', 'shift' or 'ffi') for a backend.

    On CPU, 'auto' picks 'ffi', the C++ kernels of :mod:`mobilenet_jax.kernels` (built on
    first use), or 'shift' (nine shifted multiply-adds, many times faster than XLA:CPU's
    grouped convolution) where they cannot be built; on GPU/TPU the native grouped
    convolution ('xla') wins.
    """
    if implementation not in DEPTHWISE_IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLEMENTATIONS}, got {implementation!r}.")
    backend = backend or jax.default_backend()
    if implementation == "ffi" and backend != "cpu":
        raise ValueError(f"depthwise_impl='ffi' runs on the CPU only; this backend is {backend!r} (use 'auto').")
    if implementation != "auto":
        return implementation
    if backend != "cpu":
        return "xla"
    return "ffi" if depthwise_kernels.available() else "shift"


def _windows(xp: jax.Array, k: int, strides: int, out_h: int, out_w: int):
    """Yields ``(i, j, xp[:, i::strides, j::strides, :])`` cut to ``out_h x out_w``: the k*k taps."""
    for i in range(k):
        for j in range(k):
            limit = (xp.shape[0], i + strides * (out_h - 1) + 1, j + strides * (out_w - 1) + 1, xp.shape[3])
            yield i, j, lax.slice(xp, (0, i, j, 0), limit, (1, strides, strides, 1))


def _shift_sum(xp: jax.Array, kernel: jax.Array, strides: int, out_h: int, out_w: int) -> jax.Array:
    """Sum over the k*k taps of the padded input's strided windows, each scaled per channel."""
    out = None
    for i, j, window in _windows(xp, kernel.shape[0], strides, out_h, out_w):
        term = window * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


def _pad_hw(x: jax.Array, padding: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _out_size(size: int, k: int, strides: int, padding: int) -> int:
    return (size + 2 * padding - k) // strides + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    k = kernel.shape[0]
    out_h, out_w = (_out_size(n, k, strides, padding) for n in x.shape[1:3])
    return _shift_sum(_pad_hw(x, padding), kernel, strides, out_h, out_w)


def _depthwise_shift_fwd(x, kernel, strides, padding):
    return _depthwise_shift(x, kernel, strides, padding), (x, kernel)


def _depthwise_shift_bwd(strides, padding, residuals, dy):
    """The backward pass written as shifted multiply-adds too.

    Left to autodiff, the forward's k*k strided windows are kept for the kernel
    gradient (k*k copies of the activation), which made the backward pass several
    times slower than the forward on CPU. Here only the input is kept:
      dx = the (zero-dilated, for stride 2) output gradient correlated with the flipped kernel;
      dkernel[i, j] = sum over batch and space of window_ij(x) * dy, per channel.
    """
    x, kernel = residuals
    k = kernel.shape[0]
    height, width = x.shape[1:3]
    out_h, out_w = dy.shape[1:3]
    low = k - 1 - padding
    dy_padded = lax.pad(
        dy,
        jnp.zeros((), dy.dtype),
        (
            (0, 0, 0),
            (low, height + padding - (strides * (out_h - 1) + 1), strides - 1),
            (low, width + padding - (strides * (out_w - 1) + 1), strides - 1),
            (0, 0, 0),
        ),
    )
    dx = _shift_sum(dy_padded, kernel[::-1, ::-1], 1, height, width)
    accumulate = jnp.promote_types(kernel.dtype, jnp.float32)
    x_padded = _pad_hw(x, padding)
    taps = [
        jnp.sum(window * dy, axis=(0, 1, 2), dtype=accumulate)
        for _, _, window in _windows(x_padded, k, strides, out_h, out_w)
    ]
    dkernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    return dx, dkernel


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int, implementation: str) -> jax.Array:
    """Per-channel 2-D convolution of NHWC ``x`` with a ``(k, k, 1, C)`` kernel.

    The implementations compute the same function (and gradients); they differ
    only in what they lower to (a grouped convolution, shifted multiply-adds, or the
    C++ custom calls of :mod:`mobilenet_jax.kernels`), so the parameter layout never
    depends on the backend. 'ffi' takes float32/float64; other dtypes run as 'shift'.
    """
    if implementation == "xla":
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(strides, strides),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    if implementation == "ffi" and depthwise_kernels.supports(x):
        require_kernels()
        return depthwise_kernels.depthwise_conv(x, kernel, strides, padding)
    if implementation not in ("shift", "ffi"):  # 'ffi' on bfloat16/float16: the kernels take float32/float64
        raise ValueError(f"Unknown depthwise implementation {implementation!r}.")
    return _depthwise_shift(x, kernel, strides, padding)


def require_kernels() -> None:
    """Builds and registers the C++ CPU kernels if need be (cached); one sentence where they cannot be built."""
    if not depthwise_kernels.available():
        raise ValueError("depthwise_impl='ffi' needs the CPU kernels, which could not be built (see the warning).")


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution of NHWC ``x`` with a ``(1, 1, C_in, C_out)`` kernel, as one matrix product.

    Same function as ``lax.conv_general_dilated`` with a 1x1 window; on CPU the
    (N*H*W, C_in) x (C_in, C_out) product and its gradients run several times faster.
    """
    n, h, w, c = x.shape
    y = lax.dot_general(x.reshape(n * h * w, c), kernel.reshape(c, kernel.shape[-1]), (((1,), (0,)), ((), ())))
    return y.reshape(n, h, w, kernel.shape[-1])


class Deferred(NamedTuple):
    """A BatchNorm's output not yet computed: ``activation((x - center) * scale + offset)`` per channel.

    What a layer whose BatchNorm feeds a depthwise convolution on the C++ kernels returns instead of
    that output (:func:`~mobilenet_jax.models.common.conv_bn`): the depthwise call applies the map to
    each input row as it reads it, so the BatchNorm's output is neither written nor kept for the
    backward pass. ``(center, scale, offset)`` are the BatchNorm's ``(mean, scale * rsqrt(var + epsilon),
    bias)``, with the batch statistics in training (differentiable) and the running ones in inference.
    Anything else that reads it calls :meth:`materialize`, which is flax's own formula.
    """

    x: jax.Array
    center: jax.Array
    scale: jax.Array
    offset: jax.Array
    activation: str | None  # None, 'relu' or 'relu6'

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def ndim(self) -> int:
        return self.x.ndim

    @property
    def affine(self) -> tuple:
        """``(center, scale, offset, activation)``: the prologue of a depthwise kernel call."""
        return self.center, self.scale, self.offset, self.activation

    def materialize(self) -> jax.Array:
        y = (self.x - self.center) * self.scale + self.offset
        return y if self.activation is None else BATCHNORM_ACTIVATIONS[self.activation](y)


def materialize(x: jax.Array | Deferred) -> jax.Array:
    """``x`` itself, or a :class:`Deferred` BatchNorm output computed."""
    return x.materialize() if isinstance(x, Deferred) else x


class DepthwiseConv(nn.Module):
    """k x k depthwise convolution (without bias unless ``use_bias``).

    The parameter is ``kernel`` of shape ``(k, k, 1, C)``: exactly what
    ``nn.Conv(C, (k, k), feature_group_count=C)`` creates, so checkpoints do not
    depend on ``implementation`` ('auto' = per backend, 'xla' = grouped
    convolution, 'shift' = k*k shifted multiply-adds, 'ffi' = the C++ CPU kernels).
    """

    kernel_size: int = 3
    strides: int = 1
    implementation: str = "auto"
    padding: str = "torch"  # see PADDINGS
    use_bias: bool = False  # the BatchNorm-folded inference form has one
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array | Deferred, batchnorm: tuple | None = None) -> jax.Array:
        """``x``: an array, or a :class:`Deferred` BatchNorm output, whose normalisation and activation the C++
        kernel applies to each input row as it reads it where :meth:`takes_deferred` (else it is applied
        here first). ``batchnorm``: ``(center, scale, offset, activation)`` of the inference-mode BatchNorm
        (and its ReLU/ReLU6 or None) that follows, applied inside the C++ kernel's forward call; only where
        :meth:`uses_kernels` (see :func:`~mobilenet_jax.models.common.conv_bn`)."""
        prologue = None
        if isinstance(x, Deferred):
            x, prologue = (x.x, x.affine) if self.takes_deferred(x) else (x.materialize(), None)
        channels = x.shape[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, channels), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype) if self.use_bias else None
        x, kernel, bias, padding = self._promote_and_pad(x, kernel, bias)
        implementation = resolve_depthwise_impl(self.implementation)
        if batchnorm is not None or prologue is not None:
            if implementation != "ffi" or bias is not None or not depthwise_kernels.supports(x):
                raise ValueError("A BatchNorm is applied inside the depthwise call only on the C++ kernels' path.")
            require_kernels()  # registered here too: this path does not pass through depthwise_conv
            return depthwise_kernels.depthwise_conv_affine(x, kernel, self.strides, padding, prologue, batchnorm)
        y = depthwise_conv(x, kernel, self.strides, padding, implementation)
        return y if bias is None else y + bias

    def takes_deferred(self, x: jax.Array | Deferred) -> bool:
        """Whether this layer applies a :class:`Deferred` input's map inside its kernel call: on the kernels'
        path, with the padding inside the call (zeros around the mapped input, as padding the mapped input)."""
        if not self.uses_kernels(x):
            return False
        pads = {
            amount
            for size in x.shape[1:3]
            for amount in pad_amounts(size, self.kernel_size, self.strides, self.padding, depthwise=True)
        }
        return (
            len(pads) == 1
            and jnp.result_type(x.dtype, self.param_dtype, *([self.dtype] if self.dtype else [])) == x.dtype
        )

    def uses_kernels(self, x: jax.Array) -> bool:
        """Whether this layer runs ``x`` (its unpadded input) through the C++ CPU kernels: the input
        ``__call__`` would hand them (promoted and padded by the same code), shapes only."""
        kernel = jax.ShapeDtypeStruct((self.kernel_size, self.kernel_size, 1, x.shape[-1]), self.param_dtype)
        padded = jax.eval_shape(
            lambda x, kernel: self._promote_and_pad(x, kernel, None)[0], jax.ShapeDtypeStruct(x.shape, x.dtype), kernel
        )
        return (
            not self.use_bias
            and resolve_depthwise_impl(self.implementation) == "ffi"
            and depthwise_kernels.supports(padded)
        )

    def _promote_and_pad(self, x, kernel, bias):
        """``(x, kernel, bias, symmetric padding)`` in the computation dtype, asymmetric padding applied."""
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        x, padding = pad_input(x, self.kernel_size, self.strides, self.padding, depthwise=True)
        return x, kernel, bias, padding


class PointwiseConv(nn.Module):
    """1x1 convolution without bias, computed as one matrix product.

    The parameter is ``kernel`` of shape ``(1, 1, C_in, features)``, initialised
    exactly as ``nn.Conv(features, (1, 1), use_bias=False)`` would, so the two are
    interchangeable in checkpoints.
    """

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        return pointwise_conv(x, kernel)


def conv_as_matmul(x: jax.Array, kernel: jax.Array, strides: int, padding) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, no groups) as one matrix product over k*k*C_in patches.

    ``padding`` is ``((top, bottom), (left, right))``. The patches are the k*k strided windows
    of the padded input, side by side in the kernel's (i, j, c_in) order.
    """
    k, _, c_in, c_out = kernel.shape  # square: Conv._patches_apply checks
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    n, height, width, _ = x.shape
    out_h, out_w = (height - k) // strides + 1, (width - k) // strides + 1
    windows = [window for _, _, window in _windows(x, k, strides, out_h, out_w)]
    patches = jnp.concatenate(windows, axis=-1).reshape(n * out_h * out_w, k * k * c_in)
    y = lax.dot_general(patches, kernel.reshape(k * k * c_in, c_out), (((1,), (0,)), ((), ())))
    return y.reshape(n, out_h, out_w, c_out)


class Conv(nn.Conv):
    """``flax.linen.Conv`` (same fields and parameters) that, on CPU, runs a k x k convolution without
    bias or groups as one matrix product over patches (:func:`conv_as_matmul`), or, with few input
    channels (a stem: k * k * C_in up to ``kernels.conv.MAX_TAPS``), on the C++ kernel, which gathers
    each output row's patches in cache instead of writing them all out.

    XLA:CPU's convolution takes 2-3x longer for the stem (3 input channels; measured at 224 px,
    batch 32: forward 42 -> 22 ms, with the kernel gradient 77 -> 32 ms). ``implementation``
    follows the depthwise one: 'auto' (per backend: on CPU the kernel where it applies), 'xla' is
    flax's code.
    """

    implementation: str = "auto"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not self._patches_apply(inputs):
            return super().__call__(inputs)
        shape = (*self.kernel_size, inputs.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = promote_dtype(inputs, kernel, dtype=self.dtype)
        strides = self.strides if isinstance(self.strides, int) else self.strides[0]
        padding = tuple(tuple(p) for p in self.padding)
        if self._kernel_applies(x, kernel):
            require_kernels()
            return conv_kernels.conv(x, kernel, strides, padding)
        return conv_as_matmul(x, kernel, strides, padding)

    def _kernel_applies(self, x: jax.Array, kernel: jax.Array) -> bool:
        """The C++ kernel where the layer resolves to the kernels ('auto' on CPU, 'ffi') and has few input channels."""
        return resolve_depthwise_impl(self.implementation) == "ffi" and conv_kernels.supports(x, kernel.shape)

    def _patches_apply(self, x: jax.Array) -> bool:
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        explicit_padding = not isinstance(self.padding, str) and all(len(p) == 2 for p in self.padding)
        return (
            resolve_depthwise_impl(self.implementation) != "xla"
            and x.ndim == 4
            and len(self.kernel_size) == 2
            and self.kernel_size[0] == self.kernel_size[1]
            and strides[0] == strides[1]
            and explicit_padding
            and not self.use_bias
            and self.feature_group_count == 1
            and self.input_dilation in (None, 1, (1, 1))
            and self.kernel_dilation in (None, 1, (1, 1))
            and self.mask is None
        )


# Activations a BatchNorm can apply itself (their masks recomputed by the kernel path's backward).
BATCHNORM_ACTIVATIONS = {"relu": nn.relu, "relu6": nn.relu6}


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` (same fields, variables and function) that, with ``implementation='ffi'``,
    computes its training-mode statistics and their gradients with the C++ CPU kernels.

    The kernels take the common case (last-axis features, scale and bias, float32 or float64,
    no mask, no ``axis_index_groups``); everything else, inference mode and ``init`` run
    flax's own code. Checkpoints do not depend on ``implementation``. ``activation``
    ('relu' or 'relu6', applied to the output) lets the kernel path take the activation
    into its ``custom_vjp``, so that its mask is recomputed instead of stored.
    """

    # 'xla' (flax's code), 'ffi', or 'auto' (the same as 'ffi': where the kernels are built)
    implementation: str = "xla"
    activation: str | None = None  # None, or one of BATCHNORM_ACTIVATIONS applied after the normalisation

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        if self.activation is not None and self.activation not in BATCHNORM_ACTIVATIONS:
            raise ValueError(f"BatchNorm's activation must be one of {sorted(BATCHNORM_ACTIVATIONS)} or None.")
        running = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if running or mask is not None or self.is_initializing() or not self._kernel_applies(x):
            y = super().__call__(x, use_running_average, mask=mask)
            return y if self.activation is None else BATCHNORM_ACTIVATIONS[self.activation](y)
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        if self.activation is None:
            y, mean, var = batchnorm_kernels.batch_norm_train(x, scale, bias, self.epsilon, self.axis_name)
        else:
            y, mean, var = batchnorm_kernels.batch_norm_activation_train(
                x, scale, bias, self.epsilon, self.axis_name, self.activation
            )
        self._update_running_averages(mean, var)
        return y

    def _update_running_averages(self, mean: jax.Array, var: jax.Array) -> None:
        """The running averages, as flax's BatchNorm updates them in training (no gradient flows into them)."""
        for name, value in (("mean", mean), ("var", var)):
            running = self.get_variable("batch_stats", name)
            self.put_variable(
                "batch_stats", name, self.momentum * running + (1 - self.momentum) * lax.stop_gradient(value)
            )

    def inference_affine(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """``(mean, scale * rsqrt(var + epsilon), bias)``: what this BatchNorm, in inference mode, normalises its
        input ``x`` with (flax's formula, ``(x - mean) * that + bias``); None in training, during ``init`` and
        for options other than flax's defaults (then only calling it applies it)."""
        if not self.use_running_average or self.is_initializing() or not self._flax_defaults(x):
            return None
        mean = self.get_variable("batch_stats", "mean")
        var = self.get_variable("batch_stats", "var")
        scale = lax.rsqrt(var + self.epsilon) * self.get_variable("params", "scale")
        return mean, scale, self.get_variable("params", "bias")

    def deferred(self, x: jax.Array) -> Deferred | None:
        """This BatchNorm and its activation on ``x``, left to the layer that reads the result (a depthwise
        kernel call's prologue): in inference with the running statistics, in training with the batch
        statistics (the running averages updated here, as ``__call__`` does). None where only calling it
        applies it: during ``init``, for other options than flax's defaults, or without the kernels."""
        activation = self.activation
        if self.use_running_average:
            affine = self.inference_affine(x)
            return None if affine is None else Deferred(x, *affine, activation)
        if self.is_initializing() or not self._kernel_applies(x):
            return None
        mean, var = batchnorm_kernels.batch_statistics(x, self.axis_name)
        self._update_running_averages(mean, var)
        scale, bias = self.get_variable("params", "scale"), self.get_variable("params", "bias")
        return Deferred(x, mean, lax.rsqrt(var + self.epsilon) * scale, bias, activation)

    def _flax_defaults(self, x: jax.Array) -> bool:
        """Last-axis features, scale and bias, no groups, x's dtype throughout: what the kernel paths take."""
        same_dtype = jnp.result_type(x, self.param_dtype, *([self.dtype] if self.dtype else [])) == x.dtype
        return (
            self.axis in (-1, x.ndim - 1)
            and self.axis_index_groups is None
            and self.use_bias
            and self.use_scale
            and self.use_fast_variance
            and self.force_float32_reductions
            and same_dtype
        )

    def _kernel_applies(self, x: jax.Array) -> bool:
        return (
            self.implementation in ("ffi", "auto")
            and self._flax_defaults(x)
            and batchnorm_kernels.supports(x)
            and batchnorm_kernels.available()
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
