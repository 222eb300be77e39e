"""Top-1 against multiply-adds on the quickstart task: pruning, distillation, and the width multiplier.

    python benchmarks/compression_curve.py --out /tmp/curve [--seeds 0,1,2] [--base WORKDIR] [--update_readme]

For each MAC ratio (default 0.75, 0.5, 0.35 of the quickstart MobileNetV1 0.5 at 32 px):
1. prune the trained quickstart model to that ratio (``mobilenet_jax.compression.prune``: L1 ranking,
   least-squares refit on 256 training images) and evaluate it as it is;
2. fine-tune the pruned model with the quickstart recipe shortened to
   ``--finetune_epochs`` at a lower learning rate (``--config.init_from``), once with
   plain cross-entropy and once distilling from the unpruned model (``--config.teacher``);
3. train MobileNetV1 from scratch with the full quickstart recipe at the width whose
   MACs come closest to the same ratio: the width multiplier the paper offers instead.
Every figure is the EMA weights' top-1 on the whole validation split (the quickstart's
headline metric); with ``--seeds 0,1,2`` each seed replicates the whole pipeline (its
own quickstart model, pruned and distilled from itself) and every point is reported as
mean ± std, since on this small task run-to-run differences are as large as the effects. Writes ``OUT/curve.json``,
``--plot`` (a PNG, needs matplotlib: the ``bench`` extra) and, with ``--update_readme``,
the table and plot in README.md.
Takes about 25 minutes per seed on a 2-core CPU.
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

from configs import v1  # noqa: E402
from mobilenet_jax import evaluate, summarize  # noqa: E402
from mobilenet_jax.compression import prune  # noqa: E402
from mobilenet_jax.deployment import export  # noqa: E402
from mobilenet_jax.training import loop as training  # noqa: E402
from mobilenet_jax.weights import checkpoint  # noqa: E402

README_START, README_END = "<!-- compression-curve:start -->", "<!-- compression-curve:end -->"


def v1_config(options: str, **overrides):
    """``configs/v1.py:OPTIONS`` without a progress bar, with ``overrides`` ('model.width': 0.35, ...)."""
    config = v1.get_config(options)
    config.progress_bar = False
    for key, value in overrides.items():
        node, _, field = key.rpartition(".")
        setattr(config[node] if node else config, field, value)
    return config


def quickstart(**overrides):
    return v1_config("quickstart", **overrides)


def finetune_config(args, pruned_dir: str, teacher: str = ""):
    """The quickstart recipe, shorter and gentler, starting from the pruned model."""
    return quickstart(
        init_from=pruned_dir,
        teacher=teacher,
        num_epochs=float(args.finetune_epochs),
        learning_rate=args.finetune_lr,
        warmup_epochs=0.5,
    )


def width_for_macs(target_macs: float, image_size: int) -> float:
    """The MobileNetV1 width (two decimals) whose MACs come closest to ``target_macs``."""
    from mobilenet_jax import MobileNetV1

    widths = np.round(np.arange(0.1, 1.0, 0.01), 2)
    macs = [summarize(MobileNetV1(num_classes=4, width=float(w)), image_size).macs for w in widths]
    return float(widths[int(np.argmin(np.abs(np.array(macs) - target_macs)))])


def row(method: str, ratio: float | None, model, image_size: int, runs: list, base_macs: int, where: list) -> dict:
    stats = summarize(model, image_size)
    return {
        "method": method,
        "target_ratio": ratio,
        "macs": stats.macs,
        "mac_ratio": stats.macs / base_macs,
        "params": stats.params,
        "top1": float(np.mean(runs)),
        "top1_std": float(np.std(runs)),
        "top1_runs": [float(r) for r in runs],
        "directories": [os.path.basename(w) for w in where],
    }


def train(config, workdir: str) -> float:
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        print(f"  reusing {workdir}", flush=True)
    _, results = training.train_and_evaluate(config, workdir)
    return results["validation_ema"]["top1"]


def run(args) -> list[dict]:
    """Every seed replicates the whole pipeline: its own quickstart model, pruned, fine-tuned, distilled from
    itself; and the width-multiplier models from scratch with that seed."""
    config = quickstart()
    size = config.image_size
    rgb = np.concatenate(export.calibration_images(config, 256))
    refit_images = jnp.asarray((rgb - export.MEAN_RGB) / export.STDDEV_RGB)
    results, models, where = {}, {}, {}

    def record(key, model, top1, directory):
        results.setdefault(key, []).append(top1)
        models[key] = model
        where.setdefault(key, []).append(directory)

    base_macs = None
    for seed in args.seeds:
        suffix = "" if seed == 0 else f"_s{seed}"
        base_dir = (args.base if seed == 0 and args.base else None) or os.path.join(args.out, "base" + suffix)
        print(f"== seed {seed}: quickstart MobileNetV1 0.5 at {size} px -> {base_dir}", flush=True)
        base_config = quickstart(seed=seed)
        top1 = train(base_config, base_dir)
        base_model, base_variables = checkpoint.load_any(base_dir)
        base_macs = summarize(base_model, size).macs
        record(("unpruned (quickstart)", 1.0), base_model, top1, base_dir)
        for ratio in args.ratios:
            print(f"== seed {seed}, ratio {ratio}", flush=True)
            pruned_dir = os.path.join(args.out, f"pruned_{ratio}{suffix}")
            if not os.path.isdir(pruned_dir):
                channels = prune.channels_for_macs(base_model, ratio, size)
                pruned, variables, _ = prune.prune(base_model, base_variables, channels, refit_images=refit_images)
                checkpoint.save_model(pruned_dir, pruned, variables)
            pruned, _ = checkpoint.load_model(pruned_dir)
            top1 = evaluate.run(config, model_dir=pruned_dir)["top1"]
            record(("pruned + refit, no fine-tuning", ratio), pruned, top1, pruned_dir)
            for method, teacher in (("pruned + fine-tuned", ""), ("pruned + distilled", base_dir)):
                workdir = os.path.join(args.out, f"{'distilled' if teacher else 'finetuned'}_{ratio}{suffix}")
                tuned = finetune_config(args, pruned_dir, teacher)
                tuned.seed = seed
                record((method, ratio), pruned, train(tuned, workdir), workdir)
            width = width_for_macs(ratio * base_macs, size)
            workdir = os.path.join(args.out, f"width_{width}{suffix}")
            top1 = train(quickstart(seed=seed, **{"model.width": width}), workdir)
            record((f"width {width} from scratch", ratio), checkpoint.read_model_record(workdir), top1, workdir)
    return [
        row(method, ratio, models[(method, ratio)], size, runs, base_macs, where[(method, ratio)])
        for (method, ratio), runs in results.items()
    ]


def table(rows: list[dict]) -> str:
    seeds = max(len(r["top1_runs"]) for r in rows)
    lines = [
        f"| model | MACs (of unpruned) | parameters | top-1 (EMA), mean ± std over {seeds} seed(s) | runs |",
        "|---|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (-r["mac_ratio"], r["method"])):
        spread = f" ± {100 * r['top1_std']:.2f}" if len(r["top1_runs"]) > 1 else ""
        runs = ", ".join(f"{100 * v:.2f}" for v in r["top1_runs"])
        lines.append(
            f"| {r['method']} | {r['macs'] / 1e6:.2f}M ({r['mac_ratio']:.3f}) | {r['params'] / 1e6:.3f}M "
            f"| {100 * r['top1']:.2f}%{spread} | {runs} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {
        "pruned + distilled": ("o-", "tab:red"),
        "pruned + fine-tuned": ("s-", "tab:orange"),
        "pruned + refit, no fine-tuning": ("v:", "tab:gray"),
        "width multiplier, from scratch": ("D--", "tab:blue"),
    }
    base = next(r for r in rows if r["method"].startswith("unpruned"))
    for label, (style, color) in styles.items():
        scratch = label.startswith("width")
        points = [r for r in rows if r["method"] == label or (scratch and r["method"].endswith("from scratch"))]
        points = sorted(points + [base], key=lambda r: r["macs"])
        axes.errorbar(
            [r["macs"] / 1e6 for r in points],
            [100 * r["top1"] for r in points],
            yerr=[100 * r["top1_std"] for r in points],
            fmt=style,
            color=color,
            label=label,
            capsize=3,
        )
    axes.plot([base["macs"] / 1e6], [100 * base["top1"]], "*", color="black", markersize=12, label="unpruned")
    axes.set_xlabel("multiply-adds per image (millions, 32 px)")
    axes.set_ylabel("validation top-1 (%), EMA weights")
    axes.set_title("Quickstart MobileNetV1 0.5: accuracy vs MACs")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def update_readme(rows: list[dict], plot_path: str, args) -> None:
    path = os.path.join(REPO, "README.md")
    text = open(path).read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"README.md has no {README_START} ... {README_END} section to fill.")
    body = (
        f"\n![Top-1 against MACs]({os.path.relpath(plot_path, REPO)})\n\n{table(rows)}\n\n"
        "Each seed replicates the whole pipeline (initialisation and data order): its own quickstart model, "
        "pruned, fine-tuned, and distilled from itself, and the width-multiplier models from scratch. "
        f"Fine-tuning: {args.finetune_epochs:g} epochs of the quickstart recipe at learning rate "
        f"{args.finetune_lr} per 128 images; distillation from the unpruned model with T = 4, alpha = 0.9. "
        "The width-multiplier models train from scratch with the full 24-epoch quickstart recipe. "
        f"Measured {time.strftime('%Y-%m-%d')} on a 2-core CPU with "
        f"`python benchmarks/compression_curve.py --seeds {','.join(map(str, args.seeds))}`.\n"
    )
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    with open(path, "w") as f:
        f.write(text[:start] + body + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the runs and curve.json")
    parser.add_argument("--base", help="a finished quickstart workdir to start from (default: train one in OUT/base)")
    parser.add_argument("--ratios", default="0.75,0.5,0.35", type=lambda s: [float(v) for v in s.split(",")])
    parser.add_argument("--finetune_epochs", type=float, default=8.0)
    parser.add_argument("--finetune_lr", type=float, default=0.02)
    parser.add_argument("--seeds", default="0", type=lambda s: [int(v) for v in s.split(",")], help="e.g. 0,1,2")
    parser.add_argument("--plot", default=os.path.join(REPO, "benchmarks", "results", "compression_curve.png"))
    parser.add_argument("--update_readme", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    rows = run(args)
    with open(os.path.join(args.out, "curve.json"), "w") as f:
        json.dump(rows, f, indent=1)
    settings = {"finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr, "seeds": args.seeds}
    with open(os.path.join(REPO, "benchmarks", "results", "cpu_compression_curve.json"), "w") as f:
        json.dump({**settings, "rows": rows}, f, indent=1)
    print(table(rows))
    plot(rows, args.plot)
    if args.update_readme:
        update_readme(rows, args.plot, args)
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
