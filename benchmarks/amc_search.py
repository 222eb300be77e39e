"""AMC's searched pruning against uniform pruning and the width multiplier, on the hard shapes task.

    python benchmarks/amc_search.py --base /tmp/hard --out /tmp/amc [--budgets 0.5,0.35]
        [--latency_budgets 0.6] [--seeds 0,1,2] [--finetune_epochs 3] [--width_baseline] [--update_readme]

``--base`` is a MobileNetV1 trained with ``configs/v1.py:hard`` (trained into OUT/base
when not given). For each MAC budget, and each budget of LiteRT int8 latency (1 thread,
the search's fitted latency model: ``prune --search amc --latency R``):
1. *uniform*: one keep ratio in every layer (``prune --macs R``; under a latency budget
   the largest one the latency model admits), least-squares refit;
2. *searched*: ``prune --search amc`` with each seed (AMC's DDPG, 100 warm-up and 300
   learning episodes, reward = top-1 on 1,000 held-out training images);
3. with ``--finetune_epochs``: each pruned model fine-tuned while distilling from the
   unpruned one (``--config.init_from`` and ``--config.teacher``), with each seed;
4. with ``--width_baseline``: MobileNetV1 trained from scratch with the full recipe at
   the width whose cost (MACs, or predicted latency) comes closest to the budget, with each seed.
Every top-1 is on the whole validation split (4,000 images), EMA weights where trained;
latency rows also give the measured latency of the network. Searches already in
``OUT/amc.json`` and finished workdirs in OUT are reused, so a run can be extended
(more seeds, another budget) without repeating them. Writes ``OUT/amc.json``,
``benchmarks/results/cpu_amc_hard.json``, the keep-ratio plot (``--plot``, matplotlib:
the ``bench`` extra) and, with ``--update_readme``, the table.
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
from mobilenet_jax.deployment import export, latency  # noqa: E402
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


def width_for_cost(target: float, cost, image_size: int, num_classes: int) -> float:
    """The width multiplier whose MobileNetV1 comes closest to ``target`` by ``cost`` (MACs, or a latency model)."""
    widths = np.round(np.arange(0.1, 1.0, 0.01), 2)
    costs = [cost(MobileNetV1(num_classes=num_classes, width=float(w))) for w in widths]
    return float(widths[int(np.argmin(np.abs(np.array(costs) - target)))])


def pruned_dir(args, model, variables, widths, images, name: str) -> str:
    directory = os.path.join(args.out, name)
    if not os.path.isdir(directory):
        pruned, pruned_variables, _ = prune.prune(model, variables, prune.resize(model, widths), refit_images=images)
        checkpoint.save_model(directory, pruned, pruned_variables)
    return directory


def budget_cost(model, size: int, kind: str):
    """``(cost of group widths, cost of a whole MobileNetV1)`` for a ``macs`` or ``latency`` (LiteRT int8) budget."""
    if kind == "macs":
        return amc.MacCounter(model, size), lambda network: summarize(network, size).macs
    predict = latency.fit(model, size, "int8", threads=1)
    return predict, lambda network: predict(prune.group_widths(network))


def run_budget(args, kind: str, budget: float, model, variables, config, data) -> list[dict]:
    """The rows of one budget: uniform, searched per seed, and the fine-tuned and width-multiplier ones."""
    images, labels = data
    size, rows = config.image_size, []
    cost, network_cost = budget_cost(model, size, kind)
    env_args = dict(cost=cost, budget=budget, refit_images=images[:REFIT_IMAGES],
                    images=images[REFIT_IMAGES:], labels=labels[REFIT_IMAGES:])  # fmt: skip
    env = amc.Environment(model, variables, **env_args)
    if kind == "macs":
        uniform = prune.group_widths(prune.channels_for_macs(model, budget, size))
    else:
        uniform = amc.uniform_widths(env)
    candidates = [("uniform", None, uniform, env.reward(uniform), 0.0)]
    for seed in args.seeds:
        if (kind, budget, seed) in args.previous:  # a search of an earlier run of this script: not repeated
            done = args.previous[kind, budget, seed]
            candidates.append(("searched", seed, done["widths"], done["held_out_reward"], done["search_seconds"]))
            continue
        env = amc.Environment(model, variables, settings=amc.SearchSettings(seed=seed), **env_args)
        start = time.time()
        log = os.path.join(args.out, f"search_{kind}_{budget}_s{seed}.jsonl".replace("macs_", ""))
        result = amc.search(env, log, progress=False)
        candidates.append(("searched", seed, result.widths, result.reward, time.time() - start))
        print(f"  {kind} {budget} seed {seed}: searched {result.reward:.4f} in {time.time() - start:.0f} s", flush=True)
    base_cost = network_cost(model)
    for method, seed, widths, reward, seconds in candidates:
        name = f"{method}_{kind}_{budget}".replace("_macs", "") + ("" if seed is None else f"_s{seed}")
        directory = pruned_dir(args, model, variables, widths, images[:REFIT_IMAGES], name)
        pruned, _ = checkpoint.load_model(directory)
        row = {"method": method, "budget_kind": kind, "budget": budget, "seed": seed, "widths": list(widths),
               "held_out_reward": reward, "search_seconds": round(seconds, 1),
               "cost_ratio": network_cost(pruned) / base_cost, "mac_ratio": mac_ratio(pruned, model, size),
               "top1": evaluate.run(config, model_dir=directory)["top1"]}  # fmt: skip
        if kind == "latency":
            row["measured_ms"] = latency.measure(pruned, size, "int8", threads=1)
        for s in args.seeds if args.finetune_epochs else ():
            if seed is not None and s != seed:
                continue
            tuned = hard(init_from=directory, teacher=args.base, num_epochs=args.finetune_epochs,
                         learning_rate=args.finetune_lr, warmup_epochs=0.5, seed=s)  # fmt: skip
            row.setdefault("distilled_top1", []).append(train(tuned, os.path.join(args.out, f"{name}_ft_s{s}")))
        rows.append(row)
    if args.width_baseline:
        width = width_for_cost(budget * base_cost, network_cost, size, model.num_classes)
        runs = [train(hard(seed=s, **{"model.width": width}), os.path.join(args.out, f"width_{width}_s{s}"))
                for s in args.seeds]  # fmt: skip
        network = MobileNetV1(num_classes=model.num_classes, width=width)
        row = {"method": f"width {width} from scratch", "budget_kind": kind, "budget": budget,
               "top1_runs": runs, "cost_ratio": network_cost(network) / base_cost,
               "mac_ratio": mac_ratio(network, model, size)}  # fmt: skip
        if kind == "latency":
            row["measured_ms"] = latency.measure(network, size, "int8", threads=1)
        rows.append(row)
    return rows


def mac_ratio(network, model, size: int) -> float:
    return summarize(network, size).macs / summarize(model, size).macs


def budget_name(row: dict) -> str:
    return f"{row['budget']} of the " + ("MACs" if row.get("budget_kind", "macs") == "macs" else "int8 latency")


def table(rows: list[dict]) -> str:
    lines = [
        "| budget | method | MACs (of unpruned) | int8 latency, predicted (measured) | held-out reward | "
        "top-1, no fine-tuning | top-1, distilled | search time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tuned = r.get("distilled_top1") or r.get("top1_runs") or []
        tuned_text = ", ".join(f"{100 * t:.2f}%" for t in tuned) or "-"
        before = f"{100 * r['top1']:.2f}%" if "top1" in r else "-"
        reward = f"{100 * r['held_out_reward']:.2f}%" if "held_out_reward" in r else "-"
        seed = f" (seed {r['seed']})" if r.get("seed") is not None else ""
        seconds = f"{r['search_seconds']:.0f} s" if r.get("search_seconds") else "-"
        timing = f"{r['cost_ratio']:.3f} ({r['measured_ms']:.4f} ms)" if "measured_ms" in r else "-"
        lines.append(f"| {budget_name(r)} | {r['method']}{seed} | {r['mac_ratio']:.3f} | {timing} | {reward} | "
                     f"{before} | {tuned_text} | {seconds} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], layers: list[str], full: list[int], searched_layers: list[int], path: str) -> None:
    """AMC's figure: the keep ratio per layer, searched (each seed) against uniform, at each budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(budget_name(r) for r in rows))
    figure, axes = plt.subplots(len(budgets), 1, figsize=(7.5, 2.6 * len(budgets)), dpi=120, squeeze=False, sharex=True)
    for axis, budget in zip(axes[:, 0], budgets, strict=True):
        for r in (r for r in rows if budget_name(r) == budget and "widths" in r):
            keep = [r["widths"][i] / full[i] for i in searched_layers]
            style = ("k--", 2.0) if r["method"] == "uniform" else ("o-", 1.0)
            label = "uniform" if r["method"] == "uniform" else f"searched, seed {r['seed']}"
            axis.plot(range(len(keep)), keep, style[0], linewidth=style[1], label=label, markersize=3)
        axis.set_title(budget, fontsize=9)
        axis.set_ylim(0, 1.05)
        axis.set_ylabel("keep ratio")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def previous_searches(out: str) -> dict:
    """``{(kind, budget, seed): row}`` of the searches an earlier run wrote to ``OUT/amc.json``."""
    path = os.path.join(out, "amc.json")
    if not os.path.exists(path):
        return {}
    with open(path) as file:
        rows = json.load(file)["rows"]
    return {(r.get("budget_kind", "macs"), r["budget"], r["seed"]): r for r in rows if r["method"] == "searched"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", help="a finished configs/v1.py:hard workdir (default: train one in OUT/base)")
    parser.add_argument("--budgets", default="0.5,0.35", type=lambda s: [float(v) for v in s.split(",") if v])
    parser.add_argument("--latency_budgets", default="0.6", type=lambda s: [float(v) for v in s.split(",") if v],
                        help="fractions of LiteRT's int8 latency (1 thread); the fit's timings are cached")  # fmt: skip
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
    args.previous = previous_searches(args.out)
    budgets = [("macs", b) for b in args.budgets] + [("latency", b) for b in args.latency_budgets]
    rows = [row for kind, b in budgets for row in run_budget(args, kind, b, model, variables, config, data)]
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
