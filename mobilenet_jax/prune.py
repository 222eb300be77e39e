"""Channel pruning of MobileNets as AMC does it: rank, slice the coupled tensors, refit by least squares.

    python -m mobilenet_jax.prune SOURCE OUT_DIR --profile 0.5flops [--config configs/v1.py:quickstart]
    python -m mobilenet_jax.prune WORKDIR OUT_DIR --macs 0.5   # the workdir's config.json feeds the refit
    python -m mobilenet_jax.prune SOURCE OUT_DIR --channels "24,48,(96,2),80,..." [--no_refit]
    python -m mobilenet_jax.prune V2_DIR OUT_DIR --channels "32,(64,16),72,(96,24),..."  # V2: hidden or (hidden, out)

SOURCE is a training workdir or a model directory; OUT_DIR is a model directory that
evaluation, export, ``--config.init_from`` and ``convert.to_torch`` read. The refit's
images come from ``--config``'s training split, or from the dataset a workdir was
trained on (its ``config.json``).

MobileNetV1: every layer that produces channels (the stem and each block's pointwise conv) keeps
the channels whose weights in the *next* pointwise conv (or the classifier, after the
last block) have the largest L1 norm (He et al., 2018, AMC; ``criterion='bn'`` ranks
by the producer's BatchNorm scale instead). Slicing one producer's output slices,
together, its BatchNorm, the next block's depthwise kernel and BatchNorm, and the
next pointwise conv's input. Then, as AMC does, each pruned block's pointwise kernel
is refitted in order by least squares, so that on features of a few hundred
training images the pruned network reproduces the unpruned layer's outputs.

MobileNetV2: each block's expansion (hidden) channels are ranked by their L1 norm in
the block's projection and sliced through the expansion conv, the depthwise conv and
their BatchNorms; they couple nothing outside the block. A block's outputs can be
pruned only together with the blocks its shortcut joins (a residual group), ranked by
the summed L1 norms of every layer that reads them. The pruned model records the
counts as ``block_channels``. ``--macs`` prunes the hidden channels at one ratio.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobilenet_jax import errors
from mobilenet_jax.models import V1_PROFILES, MobileNetV1, MobileNetV2, mobilenet_v2, v1_architecture
from mobilenet_jax.models.layers import PointwiseConv
from mobilenet_jax.summary import summarize

CRITERIA = ("l1", "bn")


def _architecture(model: nn.Module) -> tuple[int, tuple[tuple[int, int], ...]]:
    if not isinstance(model, MobileNetV1):
        raise errors.UserError(f"This step handles MobileNetV1, not {type(model).__name__}.")
    return v1_architecture(model.profile, model.width)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, (MobileNetV1, MobileNetV2)):
        raise errors.UserError(f"Pruning handles MobileNetV1 and MobileNetV2, not {type(model).__name__}.")


def parse_channels(text: str, model: nn.Module | None = None) -> tuple:
    """The ``--channels`` text as the channel list of ``model`` (MobileNetV1 when None).

    MobileNetV1: ``'24,48,(96,2),80'`` (the design notes' notation, stem first) ->
    ``(24, (48, (96, 2), 80))``. MobileNetV2: one entry per block, ``hidden`` or
    ``(hidden, out)``: ``'16,96,(144,24),...'`` -> ``(16, 96, (144, 24), ...)``.
    """
    try:
        values = ast.literal_eval(f"[{text}]")
    except (ValueError, SyntaxError):
        raise errors.UserError(
            f"--channels must be a comma-separated list like '24,48,(96,2)', got {text!r}."
        ) from None
    if len(values) < 2:
        raise errors.UserError("--channels needs one entry per layer, e.g. '24,48,(96,2),...'.")
    if isinstance(model, MobileNetV2):
        return tuple(values)
    return values[0], tuple(values[1:])


def _count(name: str, count, have: int, minimum: int = 8) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise errors.UserError(f"The {name} needs a positive channel count, got {count!r}.")
    if count > have:
        raise errors.UserError(f"The {name} has {have} channels; it cannot keep {count}.")
    if count < min(minimum, have):
        raise errors.UserError(f"The {name} would keep {count} channels; pruning keeps at least {minimum} per layer.")
    return count


def residual_groups(model: nn.Module) -> list[list[int]]:
    """MobileNetV2 blocks whose outputs are added together, as lists of block indices.

    A group starts at a block without a shortcut; the blocks after it with a shortcut
    add their output to it, so they all keep one output width. A group that begins
    with a shortcut block is joined to the stem (torchvision's 0.25 width) and is left whole.
    """
    _, blocks, _ = mobilenet_v2.model_architecture(model)
    groups: list[list[int]] = []
    for i, block in enumerate(blocks):
        if block.residual and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _v2_targets(model: nn.Module, channels: tuple) -> tuple[tuple[int, int], ...]:
    """Checks a MobileNetV2 channel list (``hidden`` or ``(hidden, out)`` per block); returns the pairs."""
    _, blocks, _ = mobilenet_v2.model_architecture(model)
    if len(channels) != len(blocks):
        raise errors.UserError(f"The channel list has {len(channels)} blocks; the model has {len(blocks)}.")
    pairs = []
    for i, (entry, block) in enumerate(zip(channels, blocks, strict=True)):
        if isinstance(entry, (tuple, list)) and len(entry) != 2:
            raise errors.UserError(f"Block {i}'s entry must be hidden or (hidden, out), got {entry!r}.")
        hidden, out = tuple(entry) if isinstance(entry, (tuple, list)) else (entry, block.out)
        if not block.expand and hidden != block.hidden:
            raise errors.UserError(
                f"Block {i} has no expansion conv: its hidden channels are its inputs ({block.hidden}); "
                f"give {block.hidden}, not {hidden!r}."
            )
        pairs.append(
            (_count(f"block {i} hidden layer", hidden, block.hidden), _count(f"block {i} output", out, block.out))
        )
    for group in residual_groups(model):
        widths = [pairs[i][1] for i in group]
        first = blocks[group[0]]
        if first.residual and widths[0] != first.out:
            raise errors.UserError(
                f"Block {group[0]}'s output is added to the stem's, which pruning keeps; keep its {first.out}."
            )
        if len(set(widths)) > 1:
            raise errors.UserError(
                f"Blocks {group[0]}-{group[-1]} form a residual group (their outputs are added), so they must keep "
                f"one output width; the list gives {', '.join(map(str, widths))}."
            )
    return tuple(pairs)


def target_channels(model: nn.Module, channels: tuple) -> tuple:
    """Checks a channel list against ``model``.

    MobileNetV1: ``(stem, blocks)`` in the model's profile notation (``c`` for a
    stride-1 block, ``(c, 2)`` for a stride-2 one, strides as the model's); returns
    the stem and per-block output counts. MobileNetV2: one entry per block, ``hidden``
    (keep the block's outputs) or ``(hidden, out)``; returns ``(hidden, out)`` pairs.
    """
    _check_model(model)
    if isinstance(model, MobileNetV2):
        return _v2_targets(model, tuple(channels))
    stem, blocks = _architecture(model)
    new_stem, new_blocks = channels
    if len(new_blocks) != len(blocks):
        raise errors.UserError(f"The channel list has {len(new_blocks)} blocks; the model has {len(blocks)}.")
    counts = []
    for i, (entry, (_, stride)) in enumerate(zip(new_blocks, blocks, strict=True)):
        count, given_stride = (entry, 1) if not isinstance(entry, (tuple, list)) else tuple(entry)
        if given_stride != stride:
            raise errors.UserError(f"Block {i} has stride {stride}; the channel list says {given_stride}.")
        counts.append(count)
    new_stem = _count("stem", new_stem, stem)
    counts = [_count(f"block {i}", c, b[0]) for i, (c, b) in enumerate(zip(counts, blocks, strict=True))]
    return new_stem, tuple(counts)


def _l1_of_inputs(kernel) -> np.ndarray:
    """L1 norm of each input channel's weights in a 1x1 conv (HWIO) or dense (IO) kernel."""
    kernel = np.abs(np.asarray(kernel))
    return kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1]).sum(axis=(0, 2))


def _importance(params: dict, producer: int, num_blocks: int, criterion: str) -> np.ndarray:
    """Importance of the output channels of MobileNetV1 producer ``producer`` (-1: the stem, i: block i)."""
    if criterion == "bn":
        bn = params["stem_bn"] if producer < 0 else params[f"block_{producer}"]["bn_pw"]
        return np.abs(np.asarray(bn["scale"]))
    if producer + 1 < num_blocks:  # the next block's pointwise conv reads these channels
        return _l1_of_inputs(params[f"block_{producer + 1}"]["conv_pw"]["kernel"])
    if "head_conv" in params:  # timm's mobilenetv1_100h: a 1x1 head conv before the pooling
        return _l1_of_inputs(params["head_conv"]["kernel"])
    return _l1_of_inputs(params["classifier"]["kernel"])


def _top(importance: np.ndarray, count: int) -> np.ndarray:
    return np.sort(np.argsort(-importance, kind="stable")[:count])


def _v2_keeps(model: nn.Module, params: dict, pairs, criterion: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(kept hidden, kept outputs)`` indices per MobileNetV2 block."""
    _, blocks, _ = mobilenet_v2.model_architecture(model)
    outputs = {}
    for group in residual_groups(model):
        # Every layer that reads the group's channels: the later blocks' expansions and
        # the first conv after the group (the next block's expansion or the last conv).
        after = group[-1] + 1
        readers = [params[f"block_{i}"].get("conv_pw") for i in group[1:]]
        readers.append(params[f"block_{after}"].get("conv_pw") if after < len(blocks) else params["last_conv"])
        readers = [layer["kernel"] for layer in readers if layer is not None]  # a block without expansion: skip
        if criterion == "bn" or not readers:
            importance = sum(np.abs(np.asarray(params[f"block_{i}"]["bn_pwl"]["scale"])) for i in group)
        else:
            importance = sum(_l1_of_inputs(kernel) for kernel in readers)
        for i in group:
            outputs[i] = _top(importance, pairs[i][1])
    keeps = []
    for i, block in enumerate(blocks):
        if not block.expand:  # the hidden channels are the inputs: kept as the previous layer keeps them
            hidden = keeps[-1][1] if keeps else np.arange(block.hidden)
        elif criterion == "bn":
            hidden = _top(np.abs(np.asarray(params[f"block_{i}"]["bn_dw"]["scale"])), pairs[i][0])
        else:
            hidden = _top(_l1_of_inputs(params[f"block_{i}"]["conv_pwl"]["kernel"]), pairs[i][0])
        keeps.append((hidden, outputs[i]))
    return keeps


def keep_indices(model: nn.Module, variables: dict, channels: tuple, criterion: str = "l1") -> list:
    """Sorted indices of the kept channels.

    MobileNetV1: one array per producer (the stem, then every block's outputs).
    MobileNetV2: one ``(hidden, outputs)`` pair of arrays per block.
    """
    if criterion not in CRITERIA:
        raise errors.UserError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    targets = target_channels(model, channels)
    params = variables["params"]
    if isinstance(model, MobileNetV2):
        return _v2_keeps(model, params, targets, criterion)
    stem, counts = targets
    return [
        _top(_importance(params, producer, len(counts), criterion), count)
        for producer, count in enumerate((stem, *counts), start=-1)
    ]


def _slice_bn(params: dict, stats: dict, keep: np.ndarray) -> tuple[dict, dict]:
    return {k: v[keep] for k, v in params.items()}, {k: v[keep] for k, v in stats.items()}


def _to_jax(params: dict, stats: dict) -> dict:
    return {"params": jax.tree.map(jnp.asarray, params), "batch_stats": jax.tree.map(jnp.asarray, stats)}


def slice_v1(model: nn.Module, variables: dict, keeps: Sequence[np.ndarray]) -> tuple[nn.Module, dict]:
    """The pruned model and its variables: every coupled tensor sliced to the kept channels."""
    _, blocks = _architecture(model)
    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    new_params, new_stats = {}, {}
    new_params["stem_conv"] = {"kernel": params["stem_conv"]["kernel"][..., keeps[0]]}
    new_params["stem_bn"], new_stats["stem_bn"] = _slice_bn(params["stem_bn"], stats["stem_bn"], keeps[0])
    for i in range(len(blocks)):
        name, keep_in, keep_out = f"block_{i}", keeps[i], keeps[i + 1]
        block, block_stats = params[name], stats[name]
        bn_dw, bn_dw_stats = _slice_bn(block["bn_dw"], block_stats["bn_dw"], keep_in)
        bn_pw, bn_pw_stats = _slice_bn(block["bn_pw"], block_stats["bn_pw"], keep_out)
        new_params[name] = {
            "conv_dw": {"kernel": block["conv_dw"]["kernel"][..., keep_in]},
            "bn_dw": bn_dw,
            "conv_pw": {"kernel": block["conv_pw"]["kernel"][:, :, keep_in][..., keep_out]},
            "bn_pw": bn_pw,
        }
        new_stats[name] = {"bn_dw": bn_dw_stats, "bn_pw": bn_pw_stats}
    if "head_conv" in params:
        new_params["head_conv"] = {"kernel": params["head_conv"]["kernel"][:, :, keeps[-1]]}
        new_params["head_bn"], new_stats["head_bn"] = params["head_bn"], stats["head_bn"]
        if "classifier" in params:
            new_params["classifier"] = params["classifier"]
    elif "classifier" in params:
        new_params["classifier"] = {
            "kernel": params["classifier"]["kernel"][keeps[-1]],
            "bias": params["classifier"]["bias"],
        }
    profile = (
        len(keeps[0]),
        tuple(len(k) if s == 1 else (len(k), s) for k, (_, s) in zip(keeps[1:], blocks, strict=True)),
    )
    pruned = model.clone(profile=profile, width=1.0)  # activation, head, padding, BatchNorm settings kept
    return pruned, _to_jax(new_params, new_stats)


def slice_v2(
    model: nn.Module, variables: dict, keeps: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[nn.Module, dict]:
    """The pruned MobileNetV2 (``block_channels`` set) and its sliced variables."""
    params = jax.tree.map(np.array, dict(variables["params"]))
    stats = jax.tree.map(np.array, dict(variables["batch_stats"]))
    keep_in = np.arange(params["stem_bn"]["scale"].shape[0])
    for i, (hidden, out) in enumerate(keeps):
        block, block_stats = params[f"block_{i}"], stats[f"block_{i}"]
        if "conv_pw" in block:
            block["conv_pw"]["kernel"] = block["conv_pw"]["kernel"][:, :, keep_in][..., hidden]
            block["bn_pw"], block_stats["bn_pw"] = _slice_bn(block["bn_pw"], block_stats["bn_pw"], hidden)
        block["conv_dw"]["kernel"] = block["conv_dw"]["kernel"][..., hidden]
        block["bn_dw"], block_stats["bn_dw"] = _slice_bn(block["bn_dw"], block_stats["bn_dw"], hidden)
        block["conv_pwl"]["kernel"] = block["conv_pwl"]["kernel"][:, :, hidden][..., out]
        block["bn_pwl"], block_stats["bn_pwl"] = _slice_bn(block["bn_pwl"], block_stats["bn_pwl"], out)
        keep_in = out
    params["last_conv"]["kernel"] = params["last_conv"]["kernel"][:, :, keep_in]
    pruned = model.clone(block_channels=tuple((len(hidden), len(out)) for hidden, out in keeps))
    return pruned, _to_jax(params, stats)


def slice_model(model: nn.Module, variables: dict, keeps: Sequence) -> tuple[nn.Module, dict]:
    """:func:`slice_v1` or :func:`slice_v2`, as ``model`` is."""
    return (slice_v2 if isinstance(model, MobileNetV2) else slice_v1)(model, variables, keeps)


def _refit_outputs(model: nn.Module, keeps: Sequence) -> dict[str, np.ndarray | None]:
    """The pointwise convs a refit may change, in order, with the indices of their kept outputs (None: all)."""
    if isinstance(model, MobileNetV2):
        layers = {}
        for i, (hidden, out) in enumerate(keeps):
            layers[f"block_{i}/conv_pw"] = hidden
            layers[f"block_{i}/conv_pwl"] = out
        return {**layers, "last_conv": None}
    return {**{f"block_{i}/conv_pw": keep for i, keep in enumerate(keeps[1:])}, "head_conv": None}


def pointwise_io(
    model: nn.Module, variables: dict, images: jax.Array, max_rows: int = 50_000
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'block_i/conv_pw': (inputs, outputs)}`` of every pointwise conv, as (pixels, channels) rows.

    Layers with more than ``max_rows`` pixels over all images keep a fixed random
    sample of them (AMC samples points of each feature map likewise); the sample
    depends only on the number of rows, so two models see the same pixels.
    """
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, PointwiseConv) and context.method_name == "__call__":
            x = np.asarray(args[0]).reshape(-1, args[0].shape[-1])
            y = np.asarray(out).reshape(-1, out.shape[-1])
            if x.shape[0] > max_rows:
                rows = np.sort(np.random.default_rng(x.shape[0]).choice(x.shape[0], max_rows, replace=False))
                x, y = x[rows], y[rows]
            seen["/".join(context.module.scope.path)] = (x, y)
        return out

    with nn.intercept_methods(record):
        model.apply(variables, images, train=False)
    return seen


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
    target = np.asarray(model.apply(variables, images, train=False), np.float64)
    _, features = pruned.apply(pruned_variables, images, train=False, return_features=True)
    x = np.asarray(features["pre_logits"], np.float64)
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


def _round(c: int, keep: float, divisor: int) -> int:
    return min(c, max(divisor, int(round(c * keep / divisor)) * divisor))


def channels_for_macs(model: nn.Module, ratio: float, image_size: int, divisor: int = 8) -> tuple:
    """A channel list within 2% of ``ratio`` times the model's multiply-adds.

    Every prunable layer keeps one fraction of its channels, rounded to multiples of
    ``divisor``: for MobileNetV1 the stem and every block's outputs; for MobileNetV2
    every block's expansion (hidden) channels, the narrow block outputs kept whole.
    """
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise errors.UserError(f"--macs must be in (0, 1], got {ratio!r}.")
    _check_model(model)
    full = summarize(model, image_size).macs

    if isinstance(model, MobileNetV2):
        _, blocks, _ = mobilenet_v2.model_architecture(model)

        def plan(keep: float) -> tuple:
            return tuple((_round(b.hidden, keep, divisor) if b.expand else b.hidden, b.out) for b in blocks)

        def candidate_model(candidate):
            return model.clone(block_channels=candidate)
    else:
        stem, v1_blocks = _architecture(model)

        def plan(keep: float) -> tuple:
            count = lambda c: _round(c, keep, divisor)  # noqa: E731
            return count(stem), tuple(count(c) if s == 1 else (count(c), s) for c, s in v1_blocks)

        def candidate_model(candidate):
            return model.clone(profile=candidate, width=1.0)

    # MACs grow with the keep fraction: bisect it, remembering the closest list seen.
    low, high, best, best_error = 0.0, 1.0, None, float("inf")
    for _ in range(14):
        middle = (low + high) / 2
        candidate = plan(middle)
        difference = summarize(candidate_model(candidate), image_size).macs / full - ratio
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


def _describe(model: nn.Module) -> str:
    if isinstance(model, MobileNetV2):
        return "block (hidden, out) channels " + ",".join(f"({h},{o})" for h, o in model.block_channels)
    return f"profile {model.profile}"


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


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mobilenet_jax.prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="training workdir or model directory")
    parser.add_argument("out_dir", help="new model directory")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--channels", help="stem,block,... in the design notes' notation, e.g. '24,48,(96,2),...'")
    target.add_argument("--profile", help="a named MobileNetV1 profile, e.g. 0.5flops")
    target.add_argument("--macs", type=float, help="fraction of the model's multiply-adds to keep, in (0, 1]")
    parser.add_argument("--criterion", choices=CRITERIA, default="l1", help="l1 (AMC) or bn (BatchNorm scale)")
    parser.add_argument("--no_refit", action="store_true", help="skip the least-squares refit")
    parser.add_argument(
        "--config",
        help="training config whose training images feed the refit (path[:options]; default: a workdir's config.json)",
    )
    parser.add_argument("--refit_images", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=None, help="for --macs (default: the config's, else 224)")
    parser.add_argument("--weights", choices=("ema", "live"), default="ema")
    args = parser.parse_args(argv)

    def run() -> None:
        from mobilenet_jax import checkpoint, export

        model, variables = checkpoint.load_any(args.source, weights=args.weights)
        config = errors.load_config(args.config) if args.config else checkpoint.read_config(args.source)
        image_size = args.image_size or (config.image_size if config is not None else 224)
        if args.channels:
            channels = parse_channels(args.channels, model)
        elif args.profile:
            channels = profile_channels(model, args.profile)
        else:
            channels = channels_for_macs(model, args.macs, image_size)
        images = None
        if not args.no_refit:
            if config is None:
                raise errors.UserError("The refit needs --config naming the training dataset (or pass --no_refit).")
            rgb = np.concatenate(export.calibration_images(config, args.refit_images))
            images = jnp.asarray((rgb - export.MEAN_RGB) / export.STDDEV_RGB)
        pruned, pruned_variables, report = prune(
            model, variables, channels, criterion=args.criterion, refit_images=images
        )
        checkpoint.save_model(args.out_dir, pruned, pruned_variables)
        before, after = summarize(model, image_size), summarize(pruned, image_size)
        print(
            f"Wrote {args.out_dir}: {_describe(pruned)}; {after.macs / 1e6:.1f}M MACs "
            f"({after.macs / before.macs:.3f} of {before.macs / 1e6:.1f}M) at {image_size} px, "
            f"{after.params / 1e6:.3f}M parameters"
        )
        for block, (old, new) in report.items():
            print(f"  refit {block}: relative reconstruction error {old:.4f} -> {new:.4f}")

    errors.run(run)


if __name__ == "__main__":
    main()
