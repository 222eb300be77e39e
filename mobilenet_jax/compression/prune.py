"""Channel pruning of MobileNets as AMC does it: rank, slice the coupled tensors, refit by least squares.

    python -m mobilenet_jax.prune SOURCE OUT_DIR --profile 0.5flops [--config configs/v1.py:quickstart]
    python -m mobilenet_jax.prune WORKDIR OUT_DIR --macs 0.5   # the workdir's config.json feeds the refit
    python -m mobilenet_jax.prune SOURCE OUT_DIR --channels "24,48,(96,2),80,..." [--no_refit]
    python -m mobilenet_jax.prune V2_DIR OUT_DIR --channels "32,(64,16),72,(96,24),..."  # V2: hidden or (hidden, out)

SOURCE is a training workdir or a model directory; OUT_DIR is a model directory that
evaluation, export, ``--config.init_from`` and ``convert.to_torch`` read. The refit's
images come from ``--config``'s training split, or from the dataset a workdir was
trained on (its ``config.json``).

Which tensors prune together is derived from the model's architecture table, for any
MobileNet (:func:`mobilenet_jax.models.table.channel_groups`, what Torch-Pruning's
dependency graph does for PyTorch): a *channel group* is the output channels of the
layers that produce them (a residual add joins the producers of a block's input and
output), the depthwise layers they pass through, and the layers that read them. Its
channels are ranked by the summed L1 norm of their weights in every reader (He et al.,
2018, AMC; ``criterion='bn'``: the producers' BatchNorm scales), and one slice cuts
the producers' kernels and BatchNorms, the depthwise kernels and BatchNorms, and the
readers' inputs. Then, as AMC does, each pruned pointwise kernel is refitted in order
by least squares, so that on features of a few hundred training images the pruned
network reproduces the unpruned layer's outputs, and the classifier the unpruned logits.

MobileNetV1's groups are the stem's and each block's outputs (and a head conv's);
MobileNetV2's the stem's, each expansion's, each residual group's and the last conv's.
The notations: MobileNetV1 ``(stem, blocks)`` as the design notes write it (recorded
as the pruned model's ``profile``), MobileNetV2 ``hidden`` or ``(hidden, out)`` per
block (recorded as ``block_channels``, with ``stem_channels`` and ``last_channels``),
and ``--groups``, one width per channel group, for any model. ``--macs`` keeps one
ratio in every group a non-linear layer produces except the head conv's.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobilenet_jax import errors
from mobilenet_jax.models import V1_PROFILES, MobileNetV1, MobileNetV2, table
from mobilenet_jax.models.layers import PointwiseConv
from mobilenet_jax.summary import summarize

CRITERIA = ("l1", "bn")
MIN_CHANNELS = 8


def _check_model(model: nn.Module) -> None:
    if not hasattr(model, "network") or not hasattr(model, "with_network"):
        raise errors.UserError(f"Pruning handles MobileNets (an architecture table), not {type(model).__name__}.")


def groups(model: nn.Module) -> tuple[table.Group, ...]:
    """The channel groups of ``model`` (:func:`mobilenet_jax.models.table.channel_groups`)."""
    _check_model(model)
    return table.channel_groups(model.network(), classifier=model.num_classes is not None)


def group_widths(model: nn.Module) -> tuple[int, ...]:
    return tuple(group.channels for group in groups(model))


def parse_channels(text: str, model: nn.Module | None = None) -> tuple:
    """The ``--channels`` text as the channel list of ``model`` (MobileNetV1 when None).

    MobileNetV1: ``'24,48,(96,2),80'`` (the design notes' notation, stem first) ->
    ``(24, (48, (96, 2), 80))``. MobileNetV2: one entry per block, ``hidden`` or
    ``(hidden, out)``: ``'16,96,(144,24),...'`` -> ``(16, 96, (144, 24), ...)``.
    """
    values = parse_list(text, "--channels", "'24,48,(96,2)'")
    if len(values) < 2:
        raise errors.UserError("--channels needs one entry per layer, e.g. '24,48,(96,2),...'.")
    if isinstance(model, MobileNetV2):
        return tuple(values)
    return values[0], tuple(values[1:])


def parse_list(text: str, flag: str, example: str) -> list:
    """``text`` as a Python list literal's items, or one sentence naming ``flag`` and an ``example``."""
    try:
        return ast.literal_eval(f"[{text}]")
    except (ValueError, SyntaxError):
        raise errors.UserError(f"{flag} must be a comma-separated list like {example}, got {text!r}.") from None


def _v1_target(model: MobileNetV1, channels) -> nn.Module:
    """MobileNetV1's notation: ``(stem, (c or (c, stride), ...))`` with the model's strides."""
    strides = [block.stride for block in model.network().blocks]
    stem, entries = channels
    if len(entries) != len(strides):
        raise errors.UserError(f"The channel list has {len(entries)} blocks; the model has {len(strides)}.")
    counts = [stem]
    for i, (entry, stride) in enumerate(zip(entries, strides, strict=True)):
        count, given_stride = (entry, 1) if not isinstance(entry, (tuple, list)) else tuple(entry)
        if given_stride != stride:
            raise errors.UserError(f"Block {i} has stride {stride}; the channel list says {given_stride}.")
        counts.append(count)
    for name, count in zip(["stem"] + [f"block {i}" for i in range(len(strides))], counts, strict=True):
        _check_count(name, count, None)
    profile = (stem, tuple(c if s == 1 else (c, s) for c, s in zip(counts[1:], strides, strict=True)))
    return model.clone(profile=profile, width=1.0)


def _v2_target(model: MobileNetV2, channels) -> nn.Module:
    """MobileNetV2's notation: one entry per block, ``hidden`` or ``(hidden, out)``."""
    blocks = model.network().blocks
    if len(channels) != len(blocks):
        raise errors.UserError(f"The channel list has {len(channels)} blocks; the model has {len(blocks)}.")
    pairs = []
    for i, (entry, block) in enumerate(zip(channels, blocks, strict=True)):
        if isinstance(entry, (tuple, list)) and len(entry) != 2:
            raise errors.UserError(f"Block {i}'s entry must be hidden or (hidden, out), got {entry!r}.")
        hidden, out = tuple(entry) if isinstance(entry, (tuple, list)) else (entry, block.out)
        hidden = _check_count(f"block {i} hidden layer", hidden, None, minimum=1)
        pairs.append((hidden, _check_count(f"block {i} output", out, None, minimum=1)))
    return model.clone(block_channels=tuple(pairs))


def target_model(model: nn.Module, channels) -> nn.Module:
    """The pruned architecture ``channels`` describes, checked against ``model``.

    ``channels`` is a model of the same class (e.g. from :func:`resize`), one width per
    channel group (any table-built model), or the architecture's own notation:
    MobileNetV1 ``(stem, blocks)`` (``c`` for a stride-1 block, ``(c, 2)`` for a
    stride-2 one) and MobileNetV2 one entry per block, ``hidden`` or ``(hidden, out)``.
    """
    _check_model(model)
    if isinstance(channels, nn.Module):
        target = channels
    elif isinstance(model, MobileNetV1):
        target = _v1_target(model, channels)
    elif isinstance(model, MobileNetV2):
        target = _v2_target(model, channels)
    else:
        target = resize(model, channels)
    try:
        new = group_widths(target)
    except ValueError as error:  # the architecture refuses the counts (e.g. a residual group split)
        raise errors.UserError(str(error)) from None
    old = group_widths(model)
    if type(target) is not type(model) or len(new) != len(old):
        raise errors.UserError(f"The pruned model must have the {len(old)} channel groups of the model it prunes.")
    for group, count, have in zip(groups(model), new, old, strict=True):
        _check_count(describe_group(group), count, have)
    return target


def resize(model: nn.Module, widths) -> nn.Module:
    """``model`` with one width per channel group (:func:`groups`), e.g. a searched ratio per layer."""
    _check_model(model)
    try:
        return model.with_network(table.resize(model.network(), widths))
    except ValueError as error:
        raise errors.UserError(str(error)) from None


def describe_group(group: table.Group) -> str:
    """``'stem'`` or ``'group of block_3/conv_pwl, block_4/conv_pwl'`` (the layers producing its channels)."""
    paths = ", ".join(conv.path for conv in group.producers)
    return "stem" if paths == "stem_conv" else f"group of {paths}"


def _check_count(name: str, count, have: int | None, minimum: int = MIN_CHANNELS) -> int:
    """``count`` if it is a positive integer, at most ``have`` and at least ``minimum`` (or ``have``)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise errors.UserError(f"The {name} needs a positive channel count, got {count!r}.")
    if have is not None and count > have:
        raise errors.UserError(f"The {name} has {have} channels; it cannot keep {count}.")
    if count < min(minimum, have or minimum):
        raise errors.UserError(f"The {name} would keep {count} channels; pruning keeps at least {minimum} per layer.")
    return count


# ----------------------------------------------------------------------------- ranking and slicing


def _l1_of_inputs(kernel) -> np.ndarray:
    """L1 norm of each input channel's weights in a conv (HWIO) or dense (IO) kernel."""
    kernel = np.abs(np.asarray(kernel))
    return kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1]).sum(axis=(0, 2))


def _importance(params: dict, group: table.Group, criterion: str) -> np.ndarray:
    """AMC's rank of a group's channels: the summed L1 norm of their weights in every layer that reads them.

    ``criterion='bn'`` (or a group nothing reads: a backbone's last layer) sums the
    BatchNorm scales of the layers that produce them instead.
    """
    if criterion == "bn" or not group.readers:
        return sum(np.abs(np.asarray(table.at(params, c.norm)["scale"])) for c in group.producers if c.norm)
    return sum(_l1_of_inputs(table.at(params, reader)["kernel"]) for reader in group.readers)


def _top(importance: np.ndarray, count: int) -> np.ndarray:
    return np.sort(np.argsort(-importance, kind="stable")[:count])


def keep_indices(model: nn.Module, variables: dict, channels, criterion: str = "l1") -> list[np.ndarray]:
    """Sorted indices of the kept channels, one array per channel group (:func:`groups`)."""
    if criterion not in CRITERIA:
        raise errors.UserError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    widths = group_widths(target_model(model, channels))
    return [
        _top(_importance(variables["params"], group, criterion), width)
        for group, width in zip(groups(model), widths, strict=True)
    ]


def slice_model(model: nn.Module, variables: dict, keeps: Sequence[np.ndarray]) -> tuple[nn.Module, dict]:
    """The pruned model and its variables: every tensor of each channel group sliced to its kept channels.

    Producers lose output channels (kernel's last axis, BatchNorm or a squeeze-excitation's bias), depthwise layers
    the same channels (kernel's last axis, BatchNorm), readers input channels (a
    conv kernel's third axis, a dense layer's rows).
    """
    params = jax.tree.map(np.array, flax.core.unfreeze(variables["params"]))
    stats = jax.tree.map(np.array, flax.core.unfreeze(variables["batch_stats"]))
    for group, keep in zip(groups(model), keeps, strict=True):
        for conv in group.producers + group.passes:
            layer = table.at(params, conv.path)
            layer["kernel"] = layer["kernel"][..., keep]
            if not conv.norm:  # a squeeze-excitation conv: its bias
                layer["bias"] = layer["bias"][keep]
                continue
            for tree in (params, stats):
                norm = table.at(tree, conv.norm)
                norm.update({k: v[keep] for k, v in norm.items()})
        for reader in group.readers:
            layer = table.at(params, reader)
            layer["kernel"] = layer["kernel"][..., keep, :]  # the input axis of a conv or dense kernel
    pruned = resize(model, [len(keep) for keep in keeps])
    return pruned, {"params": jax.tree.map(jnp.asarray, params), "batch_stats": jax.tree.map(jnp.asarray, stats)}


def _refit_outputs(model: nn.Module, keeps: Sequence) -> dict[str, np.ndarray]:
    """The pointwise convs a refit may change, in order, with the indices of their kept outputs."""
    kept = {conv.path: keep for group, keep in zip(groups(model), keeps, strict=True) for conv in group.producers}
    return {conv.path: kept[conv.path] for conv in model.network().convs() if conv.kind == "pointwise"}


def pointwise_io(
    model: nn.Module, variables: dict, images: jax.Array, max_rows: int = 50_000, layers: Sequence[str] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'block_i/conv_pw': (inputs, outputs)}`` of every pointwise conv (or ``layers``), as (pixels, channels) rows.

    Layers with more than ``max_rows`` pixels over all images keep a fixed random
    sample of them (AMC samples points of each feature map likewise); the sample
    depends only on the number of rows, so two models see the same pixels.
    """
    seen = {}
    arrays = _pointwise_arrays(model, variables, images)
    for path, (x, y) in arrays.items() if layers is None else ((layer, arrays[layer]) for layer in layers):
        x, y = np.asarray(x).reshape(-1, x.shape[-1]), np.asarray(y).reshape(-1, y.shape[-1])
        if x.shape[0] > max_rows:
            rows = np.sort(np.random.default_rng(x.shape[0]).choice(x.shape[0], max_rows, replace=False))
            x, y = x[rows], y[rows]
        seen[path] = (x, y)
    return seen


@functools.partial(jax.jit, static_argnums=0)
def _pointwise_arrays(model: nn.Module, variables: dict, images: jax.Array) -> dict[str, tuple]:
    """The inputs and outputs of every pointwise conv in one compiled forward pass (a refit runs it per layer)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, PointwiseConv) and context.method_name == "__call__":
            seen["/".join(context.module.scope.path)] = (args[0], out)
        return out

    with nn.intercept_methods(record):
        model.apply(variables, images, train=False)
    return seen


@functools.partial(jax.jit, static_argnums=0)
def logits(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    """``model``'s inference logits, compiled once per model and shape (applied eagerly, each operation compiles)."""
    return model.apply(variables, images, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _pre_logits(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False, return_features=True)[1]["pre_logits"]


def refit(
    model: nn.Module, variables: dict, pruned: nn.Module, pruned_variables: dict, keeps, images: jax.Array
) -> tuple[dict, dict[str, tuple[float, float]]]:
    """Least-squares refit of each pruned pointwise conv, in order (AMC), then of the classifier.

    Each conv whose kernel was sliced gets the kernel that best maps the pruned
    network's inputs to that layer onto the unpruned layer's (kept) outputs on
    ``images``; a classifier that reads pruned channels gets the kernel and bias that
    best reproduce the unpruned logits. Returns the new variables and, per layer, the relative reconstruction
    error before and after. A layer with fewer than twice as many feature rows as
    input channels is left as sliced (least squares would fit these images exactly).
    """
    reference = pointwise_io(model, variables, images)
    params = jax.tree.map(np.array, dict(pruned_variables["params"]))
    original = variables["params"]
    report = {}
    for layer, keep_out in _refit_outputs(model, keeps).items():
        path = layer.split("/")
        node, old_node = params, original
        for key in path:
            node, old_node = node.get(key) if isinstance(node, dict) else None, old_node.get(key)
        if node is None or node["kernel"].shape == old_node["kernel"].shape:
            continue  # no expansion conv in this block, or nothing sliced
        current = pointwise_io(pruned, {**pruned_variables, "params": params}, images)
        x = current[layer][0].astype(np.float64)
        target = reference[layer][1]
        target = (target if keep_out is None else target[:, keep_out]).astype(np.float64)
        weights, report[layer] = _least_squares(x, target, node["kernel"][0, 0])
        if weights is not None:
            node["kernel"] = weights.astype(node["kernel"].dtype)[None, None]
    _refit_classifier(model, variables, pruned, {**pruned_variables, "params": params}, images, report)
    return {**pruned_variables, "params": jax.tree.map(jnp.asarray, params)}, report


def _refit_classifier(model, variables, pruned, pruned_variables, images, report) -> None:
    """The classifier reads the last pruned layer: refit its kernel and bias to the unpruned logits.

    Without it, what the dropped channels contributed to the logits is simply lost
    (the convs before it are refit to their kept outputs, which the classifier then reads).
    """
    params = pruned_variables["params"]
    old = variables["params"].get("classifier")
    if old is None or params["classifier"]["kernel"].shape == old["kernel"].shape:
        return  # a backbone, or the classifier's inputs were not pruned
    target = np.asarray(logits(model, variables, images), np.float64)
    x = np.asarray(_pre_logits(pruned, pruned_variables, images), np.float64)
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)  # the bias as one more input
    node = params["classifier"]
    current = np.concatenate([np.asarray(node["kernel"]), np.asarray(node["bias"])[None]])
    weights, report["classifier"] = _least_squares(x, target, current)
    if weights is not None:
        node["kernel"] = weights[:-1].astype(node["kernel"].dtype)
        node["bias"] = weights[-1].astype(node["bias"].dtype)


def _least_squares(x: np.ndarray, target: np.ndarray, current) -> tuple[np.ndarray | None, tuple[float, float]]:
    """``(weights or None, (error before, error after))`` of the least-squares fit ``x @ weights ~ target``.

    Errors are relative to ``target``'s norm. None (and the error unchanged) when ``x`` has
    fewer than twice as many rows as columns: the fit would reproduce these rows exactly.
    """
    scale = max(np.linalg.norm(target), 1e-12)
    before = np.linalg.norm(x @ np.asarray(current, np.float64) - target) / scale
    if x.shape[0] < 2 * x.shape[1]:
        return None, (before, before)
    weights, *_ = np.linalg.lstsq(x, target, rcond=None)
    return weights, (before, np.linalg.norm(x @ weights - target) / scale)


class Reference(NamedTuple):
    """What a refit reproduces: the unpruned pointwise convs' inputs and outputs and the logits, on the refit images."""

    pointwise: dict[str, tuple[np.ndarray, np.ndarray]]
    logits: np.ndarray | None


def reference(model: nn.Module, variables: dict, images: jax.Array) -> Reference:
    outputs = np.asarray(logits(model, variables, images)) if model.num_classes is not None else None
    return Reference(pointwise_io(model, variables, images), outputs)


def zeroed(model: nn.Module, variables: dict, keeps: Sequence[np.ndarray], images=None, target=None) -> dict:
    """The pruned network at the unpruned shapes: every dropped channel gets zero weight in the layers that read it.

    It computes what :func:`slice_model` (and, given ``images``, :func:`refit` on them)
    gives, but every candidate has the same shapes, so one compiled forward pass
    serves them all (AMC's search evaluates pruned networks this way). The refit
    changes the same layers as :func:`refit`, in the same order, on the kept inputs
    and outputs; ``target`` (:func:`reference` on ``images``) saves recomputing the
    unpruned network's features.
    """
    all_groups = groups(model)
    params = jax.tree.map(np.array, flax.core.unfreeze(variables["params"]))
    pruned = [len(keep) < group.channels for group, keep in zip(all_groups, keeps, strict=True)]
    reads = {reader: i for i, group in enumerate(all_groups) for reader in group.readers}
    writes = {conv.path: i for i, group in enumerate(all_groups) for conv in group.producers}
    for reader, i in reads.items():
        dropped = np.setdiff1d(np.arange(all_groups[i].channels), keeps[i])
        layer = table.at(params, reader)
        layer["kernel"][..., dropped, :] = 0.0  # the input axis of a conv or dense kernel
    if images is None:
        return {**variables, "params": params}
    target = target or reference(model, variables, images)
    for conv in model.network().convs():
        if conv.kind != "pointwise" or not (pruned[reads[conv.path]] or pruned[writes[conv.path]]):
            continue
        keep_in, keep_out = keeps[reads[conv.path]], keeps[writes[conv.path]]
        x = pointwise_io(model, {**variables, "params": params}, images, layers=[conv.path])[conv.path][0]
        y = target.pointwise[conv.path][1][:, keep_out]
        kernel = table.at(params, conv.path)["kernel"]
        current = kernel[0, 0][np.ix_(keep_in, keep_out)]
        weights, _ = _least_squares(x[:, keep_in].astype(np.float64), y.astype(np.float64), current)
        if weights is not None:
            kernel[0, 0][np.ix_(keep_in, keep_out)] = weights
    last = reads.get("classifier")
    if last is not None and pruned[last]:
        x = np.asarray(_pre_logits(model, {**variables, "params": params}, images), np.float64)[:, keeps[last]]
        node = params["classifier"]
        current = np.concatenate([node["kernel"][keeps[last]], node["bias"][None]])
        x = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # the bias as one more input
        weights, _ = _least_squares(x, target.logits.astype(np.float64), current)
        if weights is not None:
            node["kernel"][keeps[last]], node["bias"][:] = weights[:-1], weights[-1]
    return {**variables, "params": params}


def round_channels(c: int, keep: float, divisor: int = 8) -> int:
    """``keep`` of ``c`` channels in multiples of ``divisor`` (at least ``divisor``, at most ``c``)."""
    return min(c, max(divisor, int(round(c * keep / divisor)) * divisor))


def macs_groups(model: nn.Module) -> list[bool]:
    """Which channel groups ``--macs`` prunes: those a non-linear layer produces, except the head conv's.

    MobileNetV1: the stem and every block's outputs. MobileNetV2: the stem and every
    expansion; the linear bottlenecks (which residual adds join) and the last conv stay whole.
    """
    head = model.network().head_conv().path if model.network().head_channels else None
    return [all(c.activation is not None and c.path != head for c in g.producers) for g in groups(model)]


def channels_for_macs(model: nn.Module, ratio: float, image_size: int, divisor: int = 8) -> nn.Module:
    """The pruned model within 2% of ``ratio`` times ``model``'s multiply-adds.

    Every group of :func:`macs_groups` keeps one fraction of its channels, rounded to
    multiples of ``divisor``; the fraction is bisected.
    """
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise errors.UserError(f"--macs must be in (0, 1], got {ratio!r}.")
    _check_model(model)
    full = summarize(model, image_size).macs
    widths, prunable = group_widths(model), macs_groups(model)

    def plan(keep: float) -> nn.Module:
        kept = [round_channels(w, keep, divisor) if p else w for w, p in zip(widths, prunable, strict=True)]
        return resize(model, kept)

    # MACs grow with the keep fraction: bisect it, remembering the closest model seen.
    low, high, best, best_error = 0.0, 1.0, None, float("inf")
    for _ in range(14):
        middle = (low + high) / 2
        candidate = plan(middle)
        difference = summarize(candidate, image_size).macs / full - ratio
        if abs(difference) < best_error:
            best, best_error = candidate, abs(difference)
        low, high = (middle, high) if difference < 0 else (low, middle)
    if best_error > 0.02:
        raise errors.UserError(
            f"No channel list with multiples of {divisor} comes within 2% of {ratio} x the MACs "
            f"(closest: {ratio + best_error:.3f}); choose another ratio or use --channels."
        )
    return best


def profile_channels(model: nn.Module, name: str) -> tuple:
    """A named profile (e.g. AMC's ``0.5flops``) as a channel list for ``model``."""
    if not isinstance(model, MobileNetV1):
        raise errors.UserError("Named profiles are MobileNetV1 channel lists; for this model use --macs or --channels.")
    if name not in V1_PROFILES:
        raise errors.UserError(f"Unknown profile {name!r}; known: {sorted(V1_PROFILES)}.")
    return V1_PROFILES[name]


def prune(
    model: nn.Module,
    variables: dict,
    channels: tuple,
    *,
    criterion: str = "l1",
    refit_images: jax.Array | None = None,
) -> tuple[nn.Module, dict, dict]:
    """``(pruned_model, pruned_variables, refit_report)``; refits when ``refit_images`` are given."""
    keeps = keep_indices(model, variables, channels, criterion)
    pruned, pruned_variables = slice_model(model, variables, keeps)
    report = {}
    if refit_images is not None:
        pruned_variables, report = refit(model, variables, pruned, pruned_variables, keeps, refit_images)
    return pruned, pruned_variables, report
