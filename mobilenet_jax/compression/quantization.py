"""int8 as LiteRT computes it: the quantization points of a MobileNet, their ranges, and fake quantization.

LiteRT's full-integer models store each activation tensor as int8 with one scale and
zero point per tensor, and each convolution's weights as int8 with one scale per output
channel (symmetric, -127..127). :func:`graph` runs the BatchNorm-folded network (the
export's inference form, :mod:`mobilenet_jax.models.fold`) with a hook at every tensor
the converter quantizes, named by the architecture table:

* ``'input'`` (RGB 0..255) and ``'normalized'`` (after the preprocessing's affine map);
* each convolution's path (``'block_3/conv_dw'``) for its output after the activation
  (LiteRT fuses bias and ReLU/ReLU6 into the convolution);
* ``'block_i/se/pool'``, ``'block_i/se/conv_reduce'``, ``'block_i/se/conv_expand'``,
  ``'block_i/se'`` (the scaled output) for a squeeze-excitation; ``'block_i/add'`` for a
  residual sum;
* ``'pool'`` (the global average) and ``'logits'``.

With :func:`observe` the hook records each point's values over calibration images;
:func:`choose_range` turns them into a range (min/max, a percentile, or the clip with
the least mean-squared quantization error); :func:`simulate` then runs the network with
every point and every weight fake-quantized exactly as the int8 kernels round (TF's
``FakeQuantWithMinMaxVars`` nudging of the range to an integer zero point). The same
fake quantization with a straight-through gradient is what quantization-aware training
uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax import lax

from mobilenet_jax.data.preprocessing import Preprocessing
from mobilenet_jax.models import common, layers, table

RANGE_METHODS = ("minmax", "percentile", "mse")
LABEL_WEIGHT = 0.1  # synthetic images: weight of the cross-entropy with random classes
QMIN, QMAX = -128, 127  # int8 activations
WMAX = 127  # int8 weights are symmetric: -127..127

Hook = Callable[[str, jax.Array], jax.Array]


def _keep(point: str, x: jax.Array) -> jax.Array:
    return x


# ----------------------------------------------------------------------------- the folded network, point by point


def convolution(conv: table.Conv, kernel: jax.Array, x: jax.Array, padding: str) -> jax.Array:
    """``conv``'s convolution of ``x`` with ``kernel`` alone: no bias, no activation."""
    if conv.kind == "depthwise":
        x, pad = layers.pad_input(x, conv.kernel, conv.stride, padding, depthwise=True)
        return layers.depthwise_conv(x, kernel, conv.stride, pad, "xla")
    if conv.kind == "pointwise":
        return layers.pointwise_conv(x, kernel)
    pads = tuple(layers.pad_amounts(n, conv.kernel, conv.stride, padding) for n in x.shape[1:3])
    return lax.conv_general_dilated(x, kernel, (conv.stride,) * 2, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def graph(
    network: table.Network,
    params: Mapping,
    images: jax.Array,
    preprocessing: Preprocessing,
    padding: str = "torch",
    hook: Hook = _keep,
    weights: Callable[[str, jax.Array], jax.Array] | None = None,
    conv_inputs: Callable[[table.Conv, jax.Array], None] | None = None,
    convolve: Callable[[table.Conv, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Logits of the folded network on RGB 0..255 ``images``, ``hook(point, x)`` applied at every quantization
    point (see the module docstring) and ``weights(path, kernel)`` to every kernel (the classifier's too);
    ``conv_inputs(conv, x)`` sees each convolution's input. ``convolve(conv, x)``, if given, computes each
    convolution that has a BatchNorm up to its activation from ``params`` of the unfolded network (what
    quantization-aware training folds as it goes); the other layers read ``params`` as folded."""

    def layer(conv: table.Conv, x: jax.Array) -> jax.Array:
        if conv_inputs is not None:
            conv_inputs(conv, x)
        if convolve is not None and conv.norm:
            y = convolve(conv, x)
        else:
            entry = table.at(params, conv.path)
            kernel = entry["kernel"] if weights is None else weights(conv.path, entry["kernel"])
            y = convolution(conv, kernel, x, padding) + entry["bias"]
        return hook(conv.path, common.activation(conv.activation)(y))

    x = hook("input", images.astype(jnp.float32))
    x = hook("normalized", preprocessing.normalize(x))
    convs = network.convs()
    x = layer(convs[0], x)
    for i, block in enumerate(network.blocks):
        shortcut = x
        for conv in block.convs(f"block_{i}"):
            x = layer(conv, x)
            if conv.kind == "depthwise" and block.se_channels:
                scale = hook(f"block_{i}/se/pool", jnp.mean(x, axis=(1, 2), keepdims=True))
                for se_conv in block.se_convs(f"block_{i}"):
                    scale = layer(se_conv, scale)
                x = hook(f"block_{i}/se", x * scale)
        if block.residual:
            x = hook(f"block_{i}/add", x + shortcut)
    if network.head_channels:
        x = layer(network.head_conv(), x)
    x = hook("pool", jnp.mean(x, axis=(1, 2)))
    fc = network.head_fc()
    if fc is not None:  # the dense layer after the pooling (MobileNetV3/V4), its BatchNorm folded
        entry = table.at(params, fc.path)
        kernel = entry["kernel"] if weights is None else weights(fc.path, entry["kernel"])
        x = hook(fc.path, common.activation(fc.activation)(x @ kernel + entry["bias"]))
    kernel = params["classifier"]["kernel"]
    if weights is not None:
        kernel = weights("classifier", kernel)
    return hook("logits", x @ kernel + params["classifier"]["bias"])


def points(network: table.Network) -> list[str]:
    """The quantization points of ``network`` in the order :func:`graph` meets them."""
    names = ["input", "normalized", network.convs()[0].path]
    for i, block in enumerate(network.blocks):
        for conv in block.convs(f"block_{i}"):
            names.append(conv.path)
            if conv.kind == "depthwise" and block.se_channels:
                se = [c.path for c in block.se_convs(f"block_{i}")]
                names += [f"block_{i}/se/pool", *se, f"block_{i}/se"]
        if block.residual:
            names.append(f"block_{i}/add")
    if network.head_channels:
        names.append(network.head_conv().path)
    return [*names, "pool", *([network.head_fc().path] if network.head_hidden else []), "logits"]


# ----------------------------------------------------------------------------- fake quantization


def nudged_range(lo, hi):
    """``(scale, zero_point)`` of int8 for the float range ``[lo, hi]`` widened to hold 0, the zero point an
    integer (TF's ``FakeQuantWithMinMaxVars``; LiteRT's activation scheme)."""
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = jnp.maximum(hi - lo, 1e-8) / (QMAX - QMIN)
    zero_point = jnp.clip(jnp.round(QMIN - lo / scale), QMIN, QMAX)
    return scale, zero_point


def fake_quant(x: jax.Array, lo, hi) -> jax.Array:
    """``x`` rounded to the int8 grid of ``[lo, hi]`` and clipped to it, back in float.

    The gradient is the straight-through estimator: 1 inside the range, 0 where clipped.
    """
    scale, zero_point = nudged_range(lo, hi)
    low, high = (QMIN - zero_point) * scale, (QMAX - zero_point) * scale
    clipped = jnp.clip(x, low, high)
    rounded = jnp.round(clipped / scale) * scale
    return clipped + lax.stop_gradient(rounded - clipped)


def fake_quant_weights(kernel: jax.Array) -> jax.Array:
    """``kernel`` rounded to symmetric int8 with one scale per output channel (the last axis), straight-through."""
    axes = tuple(range(kernel.ndim - 1))
    scale = jnp.maximum(jnp.max(jnp.abs(kernel), axis=axes, keepdims=True), 1e-12) / WMAX
    rounded = jnp.round(kernel / lax.stop_gradient(scale)) * lax.stop_gradient(scale)
    return kernel + lax.stop_gradient(rounded - kernel)


def simulate(
    network: table.Network,
    params: Mapping,
    images: jax.Array,
    preprocessing: Preprocessing,
    ranges: Mapping[str, tuple[float, float]],
    padding: str = "torch",
    quantize_weights: bool = True,
) -> jax.Array:
    """Logits with every point in ``ranges`` fake-quantized to int8 and every kernel to per-channel int8."""

    def hook(point, x):
        return fake_quant(x, *ranges[point]) if point in ranges else x

    weights = (lambda path, kernel: fake_quant_weights(kernel)) if quantize_weights else None
    return graph(network, params, images, preprocessing, padding, hook, weights)


def point_errors(
    network: table.Network,
    params: Mapping,
    batches: Iterable[np.ndarray],
    preprocessing: Preprocessing,
    ranges: Mapping[str, tuple[float, float]],
    padding: str = "torch",
) -> dict[str, dict[str, float]]:
    """Per point, in the order of :func:`points`, two signal-to-quantization-noise ratios in dB over ``batches`` of
    RGB 0..255 images: ``'accumulated'``, the int8 simulation's tensor against the float network's there (every
    error up to that point), and ``'own'``, the float tensor against itself rounded to the point's int8 range
    (that range's rounding and clipping alone; about 48 dB for a signal spread evenly over the range)."""

    @jax.jit
    def run(images):
        floats, quantized = {}, {}

        def keep_float(point, x):
            floats[point] = x
            return x

        def keep_quantized(point, x):
            quantized[point] = fake_quant(x, *ranges[point]) if point in ranges else x
            return quantized[point]

        graph(network, params, images, preprocessing, padding, keep_float)
        graph(network, params, images, preprocessing, padding, keep_quantized, lambda p, k: fake_quant_weights(k))
        sums = {}
        for p, x in floats.items():
            own = fake_quant(x, *ranges[p]) if p in ranges else x
            sums[p] = jnp.stack([jnp.sum(x**2), jnp.sum((quantized[p] - x) ** 2), jnp.sum((own - x) ** 2)])
        return sums

    totals: dict[str, np.ndarray] = {}
    for images in batches:
        for point, sums in run(jnp.asarray(images, jnp.float32)).items():
            totals[point] = totals.get(point, 0.0) + np.asarray(sums, np.float64)

    def decibels(signal, noise):
        return float(10 * np.log10(max(signal, 1e-30) / max(noise, 1e-30)))

    ordered = [p for p in points(network) if p in totals]
    return {p: {"accumulated": decibels(*totals[p][:2]), "own": decibels(totals[p][0], totals[p][2])} for p in ordered}


# ----------------------------------------------------------------------------- calibration


def observe(
    network: table.Network,
    params: Mapping,
    batches: Iterable[np.ndarray],
    preprocessing: Preprocessing,
    padding: str = "torch",
    samples_per_batch: int = 4096,
) -> dict[str, dict]:
    """Per point: ``min``, ``max`` and a fixed random sample of its values over ``batches`` of RGB 0..255 images
    (the float network's, as the converter calibrates)."""

    @jax.jit
    def run(images, key):
        seen = {}

        def hook(point, x):
            flat = x.reshape(-1)
            pick = jax.random.randint(jax.random.fold_in(key, len(seen)), (samples_per_batch,), 0, flat.shape[0])
            seen[point] = (jnp.min(x), jnp.max(x), flat[pick])
            return x

        graph(network, params, images, preprocessing, padding, hook)
        return seen

    stats: dict[str, dict] = {}
    for index, images in enumerate(batches):
        for point, (lo, hi, sample) in run(jnp.asarray(images, jnp.float32), jax.random.key(index)).items():
            entry = stats.setdefault(point, {"min": np.inf, "max": -np.inf, "samples": []})
            entry["min"], entry["max"] = min(entry["min"], float(lo)), max(entry["max"], float(hi))
            entry["samples"].append(np.asarray(sample))
    for entry in stats.values():
        entry["samples"] = np.concatenate(entry["samples"])
    return stats


def choose_range(stat: Mapping, method: str = "minmax", percentile: float = 99.99) -> tuple[float, float]:
    """A point's int8 range from :func:`observe`'s record: ``'minmax'``, ``'percentile'`` (each tail cut at
    ``100 - percentile``) or ``'mse'`` (the symmetric-in-steps clip of the observed range with the least
    mean-squared error of fake quantization on the sample)."""
    if method not in RANGE_METHODS:
        raise ValueError(f"The range method must be one of {RANGE_METHODS}, got {method!r}.")
    lo, hi = float(stat["min"]), float(stat["max"])
    if method == "minmax" or hi <= lo:
        return lo, hi
    sample = np.asarray(stat["samples"], np.float64)
    if method == "percentile":
        return float(min(np.percentile(sample, 100 - percentile), 0.0) if lo < 0 else lo), float(
            np.percentile(sample, percentile)
        )
    best, best_error = (lo, hi), np.inf
    for fraction in np.linspace(0.3, 1.0, 36):
        candidate = (lo * fraction, hi * fraction)
        error = float(np.mean((np.asarray(fake_quant(jnp.asarray(sample), *candidate)) - sample) ** 2))
        if error < best_error:
            best, best_error = candidate, error
    return best


# ----------------------------------------------------------------------------- bias correction


def bias_correction(
    network: table.Network,
    params: Mapping,
    batches: Iterable[np.ndarray],
    preprocessing: Preprocessing,
    padding: str = "torch",
) -> dict:
    """``params`` with each convolution's bias corrected for the mean shift its int8 weights cause (Nagel et al.
    2019, empirical form): ``bias -= E[conv(x, quantized kernel) - conv(x, kernel)]`` over the images' float
    inputs ``x`` to that layer, per output channel, before the activation."""

    @jax.jit
    def shifts(images):
        found = {}

        def see(conv, x):
            entry = table.at(params, conv.path)
            error = fake_quant_weights(entry["kernel"]) - entry["kernel"]
            found[conv.path] = jnp.mean(convolution(conv, error, x, padding), axis=tuple(range(x.ndim - 1)))

        graph(network, params, images, preprocessing, padding, conv_inputs=see)
        return found

    total, count = None, 0
    for images in batches:
        found = shifts(jnp.asarray(images, jnp.float32))
        total = found if total is None else jax.tree.map(jnp.add, total, found)
        count += 1
    if total is None:
        raise ValueError("Bias correction needs at least one batch of images.")
    corrected = dict(params)
    for path, shift in total.items():
        entry = table.at(corrected, path)
        corrected = table.replace_at(corrected, path, {**entry, "bias": entry["bias"] - shift / count})
    return corrected


# ----------------------------------------------------------------------------- synthetic calibration images


def batchnorm_targets(model: nn.Module, variables: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{norm path: (running mean, running std)}``: what each BatchNorm expects its input to look like."""
    stats = variables["batch_stats"]
    targets = {}
    for conv in model.network().convs():
        running = table.at(stats, conv.norm)
        targets[conv.norm] = (jnp.asarray(running["mean"]), jnp.sqrt(jnp.asarray(running["var"]) + model.bn_epsilon))
    return targets


def batchnorm_inputs(model: nn.Module, variables: dict, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(logits, {norm path: input})``: the input of every BatchNorm of ``model`` (inference mode) on normalized
    images ``x``."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            seen["/".join(context.module.scope.path)] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # every BatchNorm called (none applied inside a depthwise kernel call)
        unfused = model.clone(fuse_batchnorm=False) if hasattr(model, "fuse_batchnorm") else model
        logits = unfused.apply(variables, x, train=False)
    return logits, seen


def statistics_loss(
    model: nn.Module, variables: dict, x: jax.Array, targets: Mapping, labels: jax.Array | None = None
) -> jax.Array:
    """ZeroQ's objective: over every BatchNorm, the distance of the batch's per-channel mean and standard deviation
    of its input from the running ones, each relative to the running standard deviation; with ``labels``, plus
    the cross-entropy of the logits with them (as DeepInversion and GDFQ add, so that the images carry classes)."""
    logits, seen = batchnorm_inputs(model, variables, x)
    loss = 0.0
    for path, inputs in seen.items():
        mean, std = targets[path]
        axes = tuple(range(inputs.ndim - 1))
        batch_mean = jnp.mean(inputs, axis=axes)
        batch_std = jnp.sqrt(jnp.var(inputs, axis=axes) + 1e-5)
        loss += jnp.sqrt(jnp.mean(((batch_mean - mean) / std) ** 2))
        loss += jnp.sqrt(jnp.mean(((batch_std - std) / std) ** 2))
    loss = loss / len(targets)
    if labels is not None:
        loss += LABEL_WEIGHT * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return loss


def synthetic_images(
    model: nn.Module,
    variables: dict,
    preprocessing: Preprocessing,
    count: int = 32,
    image_size: int = 224,
    steps: int = 200,
    batch_size: int = 16,
    learning_rate: float = 0.1,
    seed: int = 0,
    labels: bool = True,
) -> np.ndarray:
    """``count`` RGB 0..255 images whose activations match ``model``'s BatchNorm statistics (ZeroQ, Cai et al.
    2020): Gaussian noise in the model's input space, moved by Adam to minimize :func:`statistics_loss`."""
    targets = batchnorm_targets(model, variables)
    model = model.clone(dtype=jnp.float32)
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(x, state, classes):
        loss, grad = jax.value_and_grad(statistics_loss, argnums=2)(model, variables, x, targets, classes)
        updates, state = optimizer.update(grad, state, x)
        return optax.apply_updates(x, updates), state, loss

    low, high = preprocessing.normalize(np.zeros(3, np.float32)), preprocessing.normalize(np.full(3, 255, np.float32))
    images = []
    for start in range(0, count, batch_size):
        key = jax.random.key(seed * 100_003 + start)
        shape = (min(batch_size, count - start), image_size, image_size, model.network().in_channels)
        x = jax.random.normal(key, shape)
        state = optimizer.init(x)
        classes = None
        if labels and model.num_classes:
            classes = jax.random.randint(jax.random.fold_in(key, 1), (shape[0],), 0, model.num_classes)
        for _ in range(steps):
            x, state, _ = step(x, state, classes)
            x = jnp.clip(x, low, high)  # stay a picture: RGB within 0..255
        images.append(np.clip(np.round(preprocessing.denormalize(np.asarray(x))), 0, 255))  # 8-bit pictures
    return np.concatenate(images)


# ----------------------------------------------------------------------------- cross-layer equalization


def _channel_range(kernel: np.ndarray, axis: int) -> np.ndarray:
    """Largest absolute weight per channel along ``axis`` of a kernel (HWIO; depthwise (k, k, 1, C))."""
    other = tuple(a for a in range(kernel.ndim) if a != axis % kernel.ndim)
    return np.max(np.abs(kernel), axis=other)


def equalization_pairs(network: table.Network) -> list[tuple[table.Conv, table.Conv]]:
    """Consecutive convolutions ``(first, second)`` where ``second`` alone reads ``first``'s channels: in each
    channel group with one producer, no squeeze-excitation and one convolution reading it, the producer, the
    depthwise layers it passes through, and the reader, pair by pair."""
    by_path = {conv.path: conv for conv in network.convs()}  # squeeze-excitation convs are not in it
    pairs = []
    for group in table.channel_groups(network):
        (producer, *others), readers = group.producers, group.readers
        if others or len(readers) != 1 or readers[0] not in by_path or producer.path not in by_path:
            continue
        chain = [producer, *group.passes, by_path[readers[0]]]
        pairs += list(zip(chain[:-1], chain[1:], strict=True))
    return pairs


def equalize(network: table.Network, params: Mapping, iterations: int = 20) -> tuple[table.Network, dict]:
    """Cross-layer equalization (Nagel et al. 2019) of a folded network: ``(network, params)`` computing the same
    function with each pair of :func:`equalization_pairs` rescaled so that channel ``i``'s weight range is
    ``sqrt(r1_i * r2_i)`` in both layers (``first``'s output channel ``i`` divided by ``s_i``, ``second``'s input
    channel ``i`` multiplied by it).

    Scaling passes through an activation only if it is positively homogeneous, so every ReLU6 becomes a ReLU
    first, as DFQ does: the returned network is that ReLU network, which the equalized parameters reproduce.
    """
    network = network._replace(
        activation="relu", blocks=tuple(block._replace(activation="relu") for block in network.blocks)
    )
    params = jax.tree.map(lambda x: np.array(x, np.float64), dict(params))
    pairs = equalization_pairs(network)
    for _ in range(iterations):
        for first, second in pairs:
            one, two = table.at(params, first.path), table.at(params, second.path)
            second_axis = -1 if second.kind == "depthwise" else -2
            r1, r2 = _channel_range(one["kernel"], -1), _channel_range(two["kernel"], second_axis)
            scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0)
            one["kernel"] = one["kernel"] / scale
            one["bias"] = one["bias"] / scale
            shape = [1] * two["kernel"].ndim
            shape[second_axis] = -1
            two["kernel"] = two["kernel"] * scale.reshape(shape)
    return network, jax.tree.map(lambda x: np.asarray(x, np.float32), params)
