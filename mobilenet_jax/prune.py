"""Channel pruning of MobileNetV1 as AMC does it: rank, slice the coupled tensors, refit by least squares.

    python -m mobilenet_jax.prune SOURCE OUT_DIR --profile 0.5flops [--config configs/v1.py:quickstart]
    python -m mobilenet_jax.prune SOURCE OUT_DIR --macs 0.5 --config configs/v1.py:quickstart
    python -m mobilenet_jax.prune SOURCE OUT_DIR --channels "24,48,(96,2),80,..." [--no_refit]

SOURCE is a training workdir or a model directory; OUT_DIR is a model directory that
evaluation, export, ``--config.init_from`` and ``convert.to_torch`` read.

Every layer that produces channels (the stem and each block's pointwise conv) keeps
the channels whose weights in the *next* pointwise conv (or the classifier, after the
last block) have the largest L1 norm (He et al., 2018, AMC; ``criterion='bn'`` ranks
by the producer's BatchNorm scale instead). Slicing one producer's output slices,
together, its BatchNorm, the next block's depthwise kernel and BatchNorm, and the
next pointwise conv's input. Then, as AMC does, each pruned block's pointwise kernel
is refitted in order by least squares, so that on features of a few hundred
training images the pruned network reproduces the unpruned layer's outputs.

Not yet: MobileNetV2 (its expansion channels need a per-block width field in the
model), knowledge distillation and the accuracy-vs-MACs curve (issue 12).
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobilenet_jax import errors
from mobilenet_jax.models import V1_PROFILES, MobileNetV1, v1_architecture
from mobilenet_jax.models.layers import PointwiseConv
from mobilenet_jax.summary import summarize

CRITERIA = ("l1", "bn")


def _architecture(model: nn.Module) -> tuple[int, tuple[tuple[int, int], ...]]:
    if not isinstance(model, MobileNetV1):
        raise errors.UserError(
            f"Pruning handles MobileNetV1 so far, not {type(model).__name__} (MobileNetV2 is not supported yet)."
        )
    return v1_architecture(model.profile, model.width)


def parse_channels(text: str) -> tuple:
    """``'24,48,(96,2),80'`` (the design notes' notation, stem first) -> ``(24, (48, (96, 2), 80))``."""
    try:
        values = ast.literal_eval(f"[{text}]")
    except (ValueError, SyntaxError):
        raise errors.UserError(
            f"--channels must be a comma-separated list like '24,48,(96,2)', got {text!r}."
        ) from None
    if len(values) < 2 or not isinstance(values[0], int):
        raise errors.UserError("--channels needs the stem's channel count followed by one entry per block.")
    return values[0], tuple(values[1:])


def target_channels(model: nn.Module, channels: tuple) -> tuple[int, tuple[int, ...]]:
    """Checks a ``(stem, blocks)`` list against ``model``; returns the stem and per-block output counts.

    Block entries use the model's profile notation: ``c`` for a stride-1 block,
    ``(c, 2)`` for a stride-2 one, and must match the model's strides.
    """
    stem, blocks = _architecture(model)
    new_stem, new_blocks = channels
    if len(new_blocks) != len(blocks):
        raise errors.UserError(f"The channel list has {len(new_blocks)} blocks; the model has {len(blocks)}.")
    counts = []
    for i, (entry, (_, stride)) in enumerate(zip(new_blocks, blocks, strict=True)):
        count, given_stride = (entry, 1) if isinstance(entry, int) else tuple(entry)
        if given_stride != stride:
            raise errors.UserError(f"Block {i} has stride {stride}; the channel list says {given_stride}.")
        counts.append(count)
    for name, count, have in [("stem", new_stem, stem)] + [
        (f"block {i}", c, b[0]) for i, (c, b) in enumerate(zip(counts, blocks, strict=True))
    ]:
        if not isinstance(count, int) or count < 1:
            raise errors.UserError(f"The {name} needs a positive channel count, got {count!r}.")
        if count < 8:
            raise errors.UserError(f"The {name} would keep {count} channels; MobileNetV1 keeps at least 8 per layer.")
        if count > have:
            raise errors.UserError(f"The {name} has {have} channels; it cannot keep {count}.")
    return new_stem, tuple(counts)


def _importance(params: dict, producer: int, num_blocks: int, criterion: str) -> np.ndarray:
    """Importance of the output channels of producer ``producer`` (-1: the stem, i: block i)."""
    if criterion == "bn":
        bn = params["stem_bn"] if producer < 0 else params[f"block_{producer}"]["bn_pw"]
        return np.abs(np.asarray(bn["scale"]))
    if producer + 1 < num_blocks:  # the next block's pointwise conv reads these channels
        kernel = np.asarray(params[f"block_{producer + 1}"]["conv_pw"]["kernel"])[0, 0]
    else:
        kernel = np.asarray(params["classifier"]["kernel"])
    return np.abs(kernel).sum(axis=1)


def keep_indices(model: nn.Module, variables: dict, channels: tuple, criterion: str = "l1") -> list[np.ndarray]:
    """Sorted indices of the kept output channels of the stem and of every block."""
    if criterion not in CRITERIA:
        raise errors.UserError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    stem, counts = target_channels(model, channels)
    params = variables["params"]
    keeps = []
    for producer, count in enumerate((stem, *counts), start=-1):
        order = np.argsort(-_importance(params, producer, len(counts), criterion), kind="stable")
        keeps.append(np.sort(order[:count]))
    return keeps


def _slice_bn(params: dict, stats: dict, keep: np.ndarray) -> tuple[dict, dict]:
    return {k: v[keep] for k, v in params.items()}, {k: v[keep] for k, v in stats.items()}


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
    if "classifier" in params:
        new_params["classifier"] = {
            "kernel": params["classifier"]["kernel"][keeps[-1]],
            "bias": params["classifier"]["bias"],
        }
    profile = (
        len(keeps[0]),
        tuple(len(k) if s == 1 else (len(k), s) for k, (_, s) in zip(keeps[1:], blocks, strict=True)),
    )
    pruned = MobileNetV1(
        num_classes=model.num_classes,
        profile=profile,
        bn_momentum=model.bn_momentum,
        bn_epsilon=model.bn_epsilon,
        dtype=model.dtype,
        param_dtype=model.param_dtype,
        depthwise_impl=model.depthwise_impl,
    )
    to_jax = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    return pruned, {"params": to_jax(new_params), "batch_stats": to_jax(new_stats)}


def pointwise_io(model: nn.Module, variables: dict, images: jax.Array) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'block_i': (inputs, outputs)}`` of every pointwise conv, flattened to (pixels, channels)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, PointwiseConv) and context.method_name == "__call__":
            block = context.module.scope.path[0]
            x = args[0]
            seen[block] = (np.asarray(x).reshape(-1, x.shape[-1]), np.asarray(out).reshape(-1, out.shape[-1]))
        return out

    with nn.intercept_methods(record):
        model.apply(variables, images, train=False)
    return seen


def refit_v1(
    model: nn.Module, variables: dict, pruned: nn.Module, pruned_variables: dict, keeps, images: jax.Array
) -> tuple[dict, dict[str, tuple[float, float]]]:
    """Least-squares refit of each pruned block's pointwise kernel, block by block (AMC).

    Returns the new variables and, per block, the relative reconstruction error of the
    unpruned layer's (kept) outputs before and after the refit. A block with fewer than
    twice as many feature rows as input channels is left as sliced (it would overfit).
    """
    reference = pointwise_io(model, variables, images)
    params = jax.tree.map(np.asarray, pruned_variables["params"])
    report = {}
    for i in range(len(keeps) - 1):
        name = f"block_{i}"
        current = pointwise_io(pruned, {**pruned_variables, "params": params}, images)
        x = current[name][0].astype(np.float64)
        target = reference[name][1][:, keeps[i + 1]].astype(np.float64)
        old = params[name]["conv_pw"]["kernel"][0, 0].astype(np.float64)
        scale = max(np.linalg.norm(target), 1e-12)
        before = np.linalg.norm(x @ old - target) / scale
        if x.shape[0] < 2 * x.shape[1]:
            # Fewer feature rows than twice the unknowns (late layers at low resolution):
            # least squares would fit these images exactly and generalise worse. Keep the slice.
            report[name] = (before, before)
            continue
        weights, *_ = np.linalg.lstsq(x, target, rcond=None)
        report[name] = (before, np.linalg.norm(x @ weights - target) / scale)
        params[name]["conv_pw"]["kernel"] = weights.astype(np.float32)[None, None]
    return {**pruned_variables, "params": jax.tree.map(jnp.asarray, params)}, report


def channels_for_macs(model: nn.Module, ratio: float, image_size: int, divisor: int = 8) -> tuple:
    """A channel list (every layer kept at one ratio, rounded to multiples of ``divisor``) within 2% of
    ``ratio`` times the model's multiply-adds."""
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise errors.UserError(f"--macs must be in (0, 1], got {ratio!r}.")
    stem, blocks = _architecture(model)
    full = summarize(model, image_size).macs

    def plan(keep: float) -> tuple:
        def count(c: int) -> int:
            return min(c, max(divisor, int(round(c * keep / divisor)) * divisor))

        return count(stem), tuple(count(c) if s == 1 else (count(c), s) for c, s in blocks)

    def error(keep: float) -> tuple[float, tuple]:
        candidate = plan(keep)
        return summarize(model.clone(profile=candidate, width=1.0), image_size).macs / full - ratio, candidate

    # MACs grow with the keep fraction: bisect it, remembering the closest list seen.
    low, high, best, best_error = 0.0, 1.0, None, float("inf")
    for _ in range(14):
        middle = (low + high) / 2
        difference, candidate = error(middle)
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
    pruned, pruned_variables = slice_v1(model, variables, keeps)
    report = {}
    if refit_images is not None:
        pruned_variables, report = refit_v1(model, variables, pruned, pruned_variables, keeps, refit_images)
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
    parser.add_argument("--config", help="training config whose training images feed the refit (path[:options])")
    parser.add_argument("--refit_images", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=None, help="for --macs (default: the config's, else 224)")
    parser.add_argument("--weights", choices=("ema", "live"), default="ema")
    args = parser.parse_args(argv)

    def run() -> None:
        from mobilenet_jax import checkpoint, export

        model, variables = checkpoint.load_any(args.source, weights=args.weights)
        config = errors.load_config(args.config) if args.config else None
        image_size = args.image_size or (config.image_size if config is not None else 224)
        if args.channels:
            channels = parse_channels(args.channels)
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
            f"Wrote {args.out_dir}: profile {pruned.profile}; {after.macs / 1e6:.1f}M MACs "
            f"({after.macs / before.macs:.3f} of {before.macs / 1e6:.1f}M) at {image_size} px, "
            f"{after.params / 1e6:.3f}M parameters"
        )
        for block, (old, new) in report.items():
            print(f"  refit {block}: relative reconstruction error {old:.4f} -> {new:.4f}")

    errors.run(run)


if __name__ == "__main__":
    main()
