"""``mobilenet-jax prune SOURCE OUT_DIR``: the command of :mod:`mobilenet_jax.compression.prune` and, with
``--search amc``, of :mod:`mobilenet_jax.compression.amc`.

    python -m mobilenet_jax.prune WORKDIR OUT_DIR --macs 0.5                # one keep ratio in every layer
    python -m mobilenet_jax.prune WORKDIR OUT_DIR --macs 0.5 --search amc   # AMC's searched ratio per layer
    python -m mobilenet_jax.prune SOURCE OUT_DIR --profile 0.5flops | --channels ... | --groups ...

A search writes ``search.jsonl`` (one line per episode, flushed as it goes, so an
interrupted search keeps what it did), then ``search.json`` (the result, the uniform
pruning of the same budget and their rewards) and ``keep_ratios.svg`` (searched
against uniform, per layer) into OUT_DIR beside the pruned model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobilenet_jax import cli, errors
from mobilenet_jax.compression import amc
from mobilenet_jax.compression.prune import (
    channels_for_macs,
    describe_group,
    group_widths,
    groups,
    parse_channels,
    parse_list,
    profile_channels,
    prune,
    resize,
)
from mobilenet_jax.data.preprocessing import IMAGENET
from mobilenet_jax.deployment import latency
from mobilenet_jax.summary import summarize

TARGETS = ("channels", "profile", "macs", "latency", "groups", "list_groups")
REFIT_NEEDS_DATA = "The refit needs --config naming the training dataset (or pass --no_refit)."


def _requested_channels(flags, model: nn.Module, image_size: int):
    """The pruned architecture the command line asks for (--groups, --channels, --profile or --macs)."""
    if flags.groups:
        return resize(model, parse_list(flags.groups, "--groups", "'16,32,96,...'"))
    if flags.channels:
        return parse_channels(flags.channels, model)
    if flags.profile:
        return profile_channels(model, flags.profile)
    return channels_for_macs(model, flags.macs, image_size)


def _examples(config, count: int, missing: str) -> tuple[jnp.ndarray, np.ndarray]:
    """``count`` training images (normalized) and labels for the refit and the search; ``missing``: the error."""
    from mobilenet_jax.deployment import export

    if config is None:
        raise errors.UserError(missing)
    rgb, labels = export.training_examples(config, count)
    return jnp.asarray(IMAGENET.normalize(rgb)), labels


def search(model, variables, config, out_dir: str, flags, image_size: int) -> tuple[nn.Module, jnp.ndarray]:
    """AMC's search for ``--macs`` or ``--latency``: the searched architecture and the refit images.

    Writes the search's files into ``out_dir``; under a latency budget also the
    predicted and measured LiteRT latencies of the searched, uniform and unpruned networks.
    """
    budget = flags.macs or getattr(flags, "latency", None)
    if not budget:
        raise errors.UserError("--search amc needs a budget: --macs R or --latency R with R in (0, 1).")
    amc.check_budget(budget)
    if not flags.macs:
        latency.litert_version()  # the export extra, before any work
    if os.path.exists(os.path.join(out_dir, "model.json")):
        raise errors.UserError(f"{out_dir} already holds a model; choose an empty directory.")
    images, labels = _examples(
        config,
        flags.refit_images + flags.reward_images,
        "The search needs --config naming the training dataset: it scores on held-out training images.",
    )
    if len(images) <= flags.refit_images:
        raise errors.UserError(
            f"The search scores on training images after the {flags.refit_images} refit images; the training split "
            f"has only {len(images)} (lower --refit_images)."
        )
    settings = amc.SearchSettings(episodes=flags.episodes, warmup=flags.warmup, seed=flags.seed)
    if flags.macs:
        cost = amc.MacCounter(model, image_size)
    else:
        print(f"Timing LiteRT {flags.latency_kind} networks of random widths for the latency model (cached)...")
        cost = latency.fit(model, image_size, flags.latency_kind, flags.threads)
    env = amc.Environment(
        model, variables, cost=cost, budget=budget,
        refit_images=images[: flags.refit_images], images=images[flags.refit_images :],
        labels=labels[flags.refit_images :], settings=settings,
    )  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    result = amc.search(env, os.path.join(out_dir, "search.jsonl"))
    uniform = group_widths(channels_for_macs(model, budget, image_size)) if flags.macs else amc.uniform_widths(env)
    _report(env, result, uniform, out_dir, flags, image_size, time.time() - start)
    return resize(model, result.widths), images[: flags.refit_images]


def _report(env: amc.Environment, result: amc.SearchResult, uniform, out_dir: str, flags, image_size, seconds) -> None:
    """``search.json``, ``keep_ratios.svg`` and the summary lines of a search."""
    model, settings = env.model, env.settings
    uniform_reward = env.reward(uniform)
    names = [describe_group(groups(model)[i]).removeprefix("group of ") for i in env.layers]
    keep = {name: [w[i] / env.full[i] for i in env.layers] for name, w in (("searched", result.widths),
                                                                          ("uniform", uniform))}  # fmt: skip
    amc.keep_ratio_svg(os.path.join(out_dir, "keep_ratios.svg"), names, keep)
    record = {
        "budget": flags.macs or flags.latency, "image_size": image_size,
        "budget_kind": "macs" if flags.macs else f"latency ({flags.latency_kind})",
        "settings": dataclasses.asdict(settings), "seconds": round(seconds, 1),
        "held_out_images": len(env.labels), "layers": names,
        "searched": {"widths": result.widths, "reward": result.reward, "cost": result.cost},
        "uniform": {"widths": uniform, "reward": uniform_reward, "cost": env.cost(uniform) / env.cost(env.full)},
    }  # fmt: skip
    if not flags.macs:
        plans = {"full": env.full, "searched": result.widths, "uniform": uniform}
        record["latency_ms"] = _latencies(model, env.cost, plans, image_size, flags)
    with open(os.path.join(out_dir, "search.json"), "w") as file:
        json.dump(record, file, indent=1)
    what = "the MACs" if flags.macs else "the predicted latency"
    print(
        f"Searched {settings.warmup + settings.episodes} episodes in {seconds:.0f} s: held-out top-1 before "
        f"fine-tuning {100 * result.reward:.2f}% at {result.cost:.3f} of {what} (uniform: "
        f"{100 * uniform_reward:.2f}% at {record['uniform']['cost']:.3f})"
    )
    for name, times in record.get("latency_ms", {}).items():
        print(f"  {name}: LiteRT {flags.latency_kind} latency predicted {times[0]:.3f} ms, measured {times[1]:.3f} ms")


def _latencies(model, predict, plans: dict, image_size: int, flags) -> dict[str, tuple[float, float]]:
    """``{name: (predicted ms, measured ms)}`` of each plan's network (timed now, random weights)."""
    return {
        name: (predict(widths), latency.measure(resize(model, widths), image_size, flags.latency_kind, flags.threads))
        for name, widths in plans.items()
    }


def main(argv: list[str]) -> None:
    """``python -m mobilenet_jax.prune SOURCE OUT_DIR (--macs R [--search amc] | --channels L | --groups L | ...)``."""
    from absl import flags

    args = flags.FLAGS
    cli.quiet_logging()
    given = [name for name in TARGETS if args[name].present]
    if len(given) != 1:
        cli.exit_with("give exactly one of --macs, --latency, --channels, --groups, --profile and --list_groups.", 2)
    if args.latency is not None and args.search == "none":
        cli.exit_with("--latency is a budget for the search: add --search amc (or prune by --macs).", 2)
    if len(argv) != (2 if args.list_groups else 3):
        cli.exit_with("usage: python -m mobilenet_jax.prune SOURCE OUT_DIR (--macs R | --channels ... | ...).", 2)

    def run() -> None:
        from mobilenet_jax.weights import checkpoint

        source = argv[1]
        model, variables = checkpoint.load_any(source, weights=args.weights)
        config = cli.load_config(args.config) if args.config else checkpoint.read_config(source)
        image_size = args.image_size or (config.image_size if config is not None else 224)
        if args.list_groups:
            for i, group in enumerate(groups(model)):
                print(f"{i}: {group.channels} channels, {describe_group(group)}; read by {', '.join(group.readers)}")
            return
        images = None
        if args.search == "amc":
            channels, images = search(model, variables, config, argv[2], args, image_size)
        else:
            channels = _requested_channels(args, model, image_size)
            if not args.no_refit:
                images = _examples(config, args.refit_images, REFIT_NEEDS_DATA)[0]
        pruned, pruned_variables, report = prune(
            model, variables, channels, criterion=args.criterion, refit_images=images
        )
        checkpoint.save_model(argv[2], pruned, pruned_variables)
        before, after = summarize(model, image_size), summarize(pruned, image_size)
        print(
            f"Wrote {argv[2]}: channel groups {','.join(map(str, group_widths(pruned)))}; {after.macs / 1e6:.1f}M MACs "
            f"({after.macs / before.macs:.3f} of {before.macs / 1e6:.1f}M) at {image_size} px, "
            f"{after.params / 1e6:.3f}M parameters"
        )
        for block, (old, new) in report.items():
            print(f"  refit {block}: relative reconstruction error {old:.4f} -> {new:.4f}")

    cli.run(run)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("channels", None, "Channel list in the model's notation, e.g. '24,48,(96,2),...' (V1).")
    flags.DEFINE_string("profile", None, "A named MobileNetV1 profile, e.g. 0.5flops.")
    flags.DEFINE_float("macs", None, "Fraction of the model's multiply-adds to keep, in (0, 1].")
    flags.DEFINE_float("latency", None, "With --search amc: fraction of the LiteRT latency to keep, in (0, 1).")
    flags.DEFINE_enum("latency_kind", "int8", ["int8", "float32"], "The LiteRT file a latency budget times.")
    flags.DEFINE_integer("threads", 1, "LiteRT threads for a latency budget.")
    flags.DEFINE_string("groups", None, "One width per channel group, in order (any model; see --list_groups).")
    flags.DEFINE_bool("list_groups", False, "Print the model's channel groups and exit (no OUT_DIR).")
    flags.DEFINE_enum("criterion", "l1", ["l1", "bn"], "l1 (AMC) or bn (BatchNorm scale).")
    flags.DEFINE_bool("no_refit", False, "Skip the least-squares refit.")
    flags.DEFINE_string(
        "config", None, "Training config whose training images feed the refit (default: a workdir's config.json)."
    )
    flags.DEFINE_integer("refit_images", 256, "Training images for the refit.")
    flags.DEFINE_integer("image_size", None, "For --macs (default: the config's, else 224).")
    flags.DEFINE_enum("weights", "ema", ["ema", "live"], "Which weights of a training checkpoint to prune.")
    flags.DEFINE_enum("search", "none", ["none", "amc"], "amc: AMC's DDPG search of one keep ratio per layer.")
    flags.DEFINE_integer("episodes", amc.SearchSettings.episodes, "The search's learning episodes after the warm-up.")
    flags.DEFINE_integer("warmup", amc.SearchSettings.warmup, "The search's random warm-up episodes.")
    flags.DEFINE_integer("seed", amc.SearchSettings.seed, "The search's seed.")
    flags.DEFINE_integer("reward_images", 1000, "Training images after the refit's on which the search scores.")


def run_command() -> None:
    """``mobilenet-jax prune`` and ``python -m`` this module: its flags, then :func:`main`."""
    cli.run_absl(_define_flags, main)


if __name__ == "__main__":
    run_command()
