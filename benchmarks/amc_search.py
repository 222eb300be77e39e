"""AMC's searched pruning against uniform pruning and the width multiplier, on the hard shapes task.

    python benchmarks/amc_search.py --base /tmp/hard --out /tmp/amc [--budgets 0.5,0.35] [--seeds 0,1,2]
        [--finetune_epochs 4] [--width_baseline] [--update_readme]

``--base`` is a MobileNetV1 trained with ``configs/v1.py:hard`` (trained into OUT/base
when not given). For each MAC budget:
1. *uniform*: one keep ratio in every layer (``prune --macs R``), least-squares refit;
2. *searched*: ``prune --search amc --macs R`` with each seed (AMC's DDPG, 100 warm-up
   and 300 learning episodes, reward = top-1 on 1,000 held-out training images);
3. with ``--finetune_epochs``: each pruned model fine-tuned while distilling from the
   unpruned one (``--config.init_from`` and ``--config.teacher``), with each seed;
4. with ``--width_baseline``: MobileNetV1 trained from scratch with the full recipe at
   the width whose MACs come closest to the budget, with each seed.
Every top-1 is on the whole validation split (4,000 images), EMA weights where trained.
Writes ``OUT/amc.json``, ``benchmarks/results/cpu_amc_hard.json``, the keep-ratio plot
(``--plot``, matplotlib: the ``bench`` extra) and, with ``--update_readme``, the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mobilenet_jax import host  # noqa: E402

host.import_torch_before_tensorflow()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from compression_curve import v1_config  # noqa: E402  (benchmarks/ is the script's directory)

from mobilenet_jax import MobileNetV1, evaluate, summarize  # noqa: E402
from mobilenet_jax.compression import amc, prune  # noqa: E402
from mobilenet_jax.data.preprocessing import IMAGENET  # noqa: E402
from mobilenet_jax.deployment import export  # noqa: E402
from mobilenet_jax.training import loop as training  # noqa: E402
from mobilenet_jax.weights import checkpoint  # noqa: E402

README_START, README_END = "<!-- amc-search:start -->", "<!-- amc-search:end -->"
REFIT_IMAGES, REWARD_IMAGES = 256, 1000


def hard(**overrides):
    return v1_config("hard", **overrides)


def train(config, workdir: str) -> float:
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        print(f"  reusing {workdir}", flush=True)
    _, results = training.train_and_evaluate(config, workdir)
    return results["validation_ema"]["top1"]


def width_for_macs(target_macs: float, image_size: int, num_classes: int) -> float:
    widths = np.round(np.arange(0.1, 1.0, 0.01), 2)
    macs = [summarize(MobileNetV1(num_classes=num_classes, width=float(w)), image_size).macs for w in widths]
    return float(widths[int(np.argmin(np.abs(np.array(macs) - target_macs)))])


def pruned_dir(args, model, variables, widths, images, name: str) -> str:
    directory = os.path.join(args.out, name)
    if not os.path.isdir(directory):
        pruned, pruned_variables, _ = prune.prune(model, variables, prune.resize(model, widths), refit_images=images)
        checkpoint.save_model(directory, pruned, pruned_variables)
    return directory


def run_budget(args, budget: float, model, variables, config, data) -> list[dict]:
    """The rows of one budget: uniform, searched per seed, and the fine-tuned and width-multiplier ones."""
    images, labels = data
    size, rows = config.image_size, []
    env_args = dict(cost=amc.MacCounter(model, size), budget=budget, refit_images=images[:REFIT_IMAGES],
                    images=images[REFIT_IMAGES:], labels=labels[REFIT_IMAGES:])  # fmt: skip
    uniform = prune.group_widths(prune.channels_for_macs(model, budget, size))
    candidates = [("uniform", None, uniform, amc.Environment(model, variables, **env_args).reward(uniform), 0.0)]
    for seed in args.seeds:
        env = amc.Environment(model, variables, settings=amc.SearchSettings(seed=seed), **env_args)
        start = time.time()
        log = os.path.join(args.out, f"search_{budget}_s{seed}.jsonl")
        result = amc.search(env, log, progress=False)
        candidates.append(("searched", seed, result.widths, result.reward, time.time() - start))
        print(f"  budget {budget} seed {seed}: searched {result.reward:.4f} in {time.time() - start:.0f} s", flush=True)
    base_macs = summarize(model, size).macs
    for method, seed, widths, reward, seconds in candidates:
        name = f"{method}_{budget}" + ("" if seed is None else f"_s{seed}")
        directory = pruned_dir(args, model, variables, widths, images[:REFIT_IMAGES], name)
        pruned, _ = checkpoint.load_model(directory)
        row = {"method": method, "budget": budget, "seed": seed, "widths": list(widths), "held_out_reward": reward,
               "search_seconds": round(seconds, 1), "mac_ratio": summarize(pruned, size).macs / base_macs,
               "top1": evaluate.run(config, model_dir=directory)["top1"]}  # fmt: skip
        for s in args.seeds if args.finetune_epochs else ():
            if seed is not None and s != seed:
                continue
            tuned = hard(init_from=directory, teacher=args.base, num_epochs=args.finetune_epochs,
                         learning_rate=args.finetune_lr, warmup_epochs=0.5, seed=s)  # fmt: skip
            row.setdefault("distilled_top1", []).append(train(tuned, os.path.join(args.out, f"{name}_ft_s{s}")))
        rows.append(row)
    if args.width_baseline:
        width = width_for_macs(budget * base_macs, size, model.num_classes)
        runs = [train(hard(seed=s, **{"model.width": width}), os.path.join(args.out, f"width_{width}_s{s}"))
                for s in args.seeds]  # fmt: skip
        rows.append({"method": f"width {width} from scratch", "budget": budget, "top1_runs": runs,
                     "mac_ratio": summarize(MobileNetV1(num_classes=model.num_classes, width=width), size).macs
                     / base_macs})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| budget | method | MACs (of unpruned) | held-out reward | top-1, no fine-tuning | "
        "top-1, distilled | search time |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tuned = r.get("distilled_top1") or r.get("top1_runs") or []
        tuned_text = ", ".join(f"{100 * t:.2f}%" for t in tuned) or "-"
        before = f"{100 * r['top1']:.2f}%" if "top1" in r else "-"
        reward = f"{100 * r['held_out_reward']:.2f}%" if "held_out_reward" in r else "-"
        seed = f" (seed {r['seed']})" if r.get("seed") is not None else ""
        seconds = f"{r['search_seconds']:.0f} s" if r.get("search_seconds") else "-"
        lines.append(f"| {r['budget']} | {r['method']}{seed} | {r['mac_ratio']:.3f} | {reward} | {before} | "
                     f"{tuned_text} | {seconds} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], layers: list[str], full: list[int], searched_layers: list[int], path: str) -> None:
    """AMC's figure: the keep ratio per layer, searched (each seed) against uniform, at each budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    figure, axes = plt.subplots(len(budgets), 1, figsize=(7.5, 2.6 * len(budgets)), dpi=120, squeeze=False, sharex=True)
    for axis, budget in zip(axes[:, 0], budgets, strict=True):
        for r in (r for r in rows if r["budget"] == budget and "widths" in r):
            keep = [r["widths"][i] / full[i] for i in searched_layers]
            style = ("k--", 2.0) if r["method"] == "uniform" else ("o-", 1.0)
            label = "uniform" if r["method"] == "uniform" else f"searched, seed {r['seed']}"
            axis.plot(range(len(keep)), keep, style[0], linewidth=style[1], label=label, markersize=3)
        axis.set_title(f"{budget} of the MACs", fontsize=9)
        axis.set_ylim(0, 1.05)
        axis.set_ylabel("keep ratio")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", help="a finished configs/v1.py:hard workdir (default: train one in OUT/base)")
    parser.add_argument("--budgets", default="0.5,0.35", type=lambda s: [float(v) for v in s.split(",")])
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--finetune_epochs", type=float, default=0.0)
    parser.add_argument("--finetune_lr", type=float, default=0.02)
    parser.add_argument("--width_baseline", action="store_true")
    parser.add_argument("--plot", default=os.path.join(REPO, "benchmarks", "results", "amc_keep_ratios.png"))
    parser.add_argument("--update_readme", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    args.base = args.base or os.path.join(args.out, "base")
    base_top1 = train(hard(), args.base)
    model, variables = checkpoint.load_any(args.base)
    config = checkpoint.read_config(args.base) or hard()
    rgb, labels = export.training_examples(config, REFIT_IMAGES + REWARD_IMAGES)
    data = (jnp.asarray(IMAGENET.normalize(rgb)), labels)
    rows = [row for budget in args.budgets for row in run_budget(args, budget, model, variables, config, data)]
    record = {"base": args.base, "base_top1": base_top1, "seeds": args.seeds, "finetune_epochs": args.finetune_epochs,
              "seconds": round(time.time() - started), "rows": rows}  # fmt: skip
    for path in (os.path.join(args.out, "amc.json"), os.path.join(REPO, "benchmarks", "results", "cpu_amc_hard.json")):
        with open(path, "w") as file:
            json.dump(record, file, indent=1)
    print(f"unpruned: {100 * base_top1:.2f}%\n{table(rows)}")
    layers = [prune.describe_group(g).removeprefix("group of ") for g in prune.groups(model)]
    searched = [i for i, s in enumerate(prune.macs_groups(model)) if s]
    plot(rows, [layers[i] for i in searched], list(prune.group_widths(model)), searched, args.plot)
    if args.update_readme:
        path = os.path.join(REPO, "README.md")
        text = open(path).read()
        start, end = text.index(README_START) + len(README_START), text.index(README_END)
        body = (f"\n![Keep ratio per layer]({os.path.relpath(args.plot, REPO)})\n\nUnpruned: {100 * base_top1:.2f}% "
                f"top-1.\n\n{table(rows)}\n\nMeasured {time.strftime('%Y-%m-%d')} on a 2-core CPU in "
                f"{record['seconds'] / 60:.0f} min with `python benchmarks/amc_search.py "
                f"--seeds {','.join(map(str, args.seeds))}`.\n")  # fmt: skip
        with open(path, "w") as file:
            file.write(text[:start] + body + text[end:])
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
