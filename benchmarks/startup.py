"""Time to the first training step, cold and with the persistent compilation cache.

    python benchmarks/startup.py                       # the quickstart config (configs/v1.py:quickstart)
    python benchmarks/startup.py --config configs/v2.py --batch 32 --json startup.json

Each measurement is a fresh Python process that builds the config's model, train
state and train step exactly as ``train.py`` does and runs one step on a random
batch; it reports seconds for the imports, the parameter initialisation and the
first step (tracing + XLA compilation + execution). The first run uses an empty
cache directory, the second the same directory, as a second ``train.py`` start with
``config.compilation_cache_dir`` would.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(config_path: str, batch: int | None, cache_dir: str) -> dict:
    """Runs in the measured process: everything up to the first step's result."""
    start = time.perf_counter()
    sys.path.insert(0, REPO)
    import jax
    import numpy as np

    from mobilenet_jax import host
    from mobilenet_jax.training import distributed, optim, steps

    host.keep_freed_memory()
    host.enable_compilation_cache(cache_dir or None)
    path, _, arg = config_path.partition(":")
    module = importlib.import_module("configs." + os.path.splitext(os.path.basename(path))[0])
    config = module.get_config(arg or None)
    if batch:
        config.batch_size = batch
    imported = time.perf_counter()

    model = steps.create_model(config, num_classes=10)
    lr = optim.create_learning_rate_fn(config, steps_per_epoch=100)
    tx = optim.create_optimizer(config, lr)
    mesh = distributed.make_mesh()
    state = optim.create_train_state(jax.random.key(config.seed), model, tx, config.image_size)
    jax.block_until_ready(state)
    initialised = time.perf_counter()

    step = steps.make_train_step(config, model, mesh, tx, lr)
    rng = np.random.default_rng(0)
    size = config.image_size
    batch_arrays = distributed.global_batch(
        {
            "image": rng.standard_normal((config.batch_size, size, size, 3), np.float32),
            "label": rng.integers(0, 10, config.batch_size).astype(np.int32),
            "mask": np.ones(config.batch_size, np.float32),
        },
        mesh,
    )
    state, metrics = step(state, batch_arrays)
    jax.block_until_ready(metrics)
    done = time.perf_counter()
    return {
        "imports_s": imported - start,
        "init_s": initialised - imported,
        "first_step_s": done - initialised,
        "init_and_first_step_s": done - imported,
    }


def measure(config_path: str, batch: int | None, cache_dir: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--config", config_path, "--cache_dir", cache_dir]
    if batch:
        command += ["--batch", str(batch)]
    start = time.perf_counter()
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the measured process failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/v1.py:quickstart")
    parser.add_argument("--batch", type=int, default=None, help="override the config's batch size")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.config, args.batch, args.cache_dir)))
        return

    with tempfile.TemporaryDirectory() as cache:
        runs = {
            "no cache": measure(args.config, args.batch, ""),
            "cold cache (first start)": measure(args.config, args.batch, cache),
            "warm cache (second start)": measure(args.config, args.batch, cache),
        }
    print(f"\n{args.config}{f', batch {args.batch}' if args.batch else ''}: seconds")
    print(f"{'':28s} {'imports':>8s} {'init':>8s} {'first step':>11s} {'init+step':>10s} {'process':>8s}")
    for name, r in runs.items():
        print(
            f"{name:28s} {r['imports_s']:8.1f} {r['init_s']:8.1f} {r['first_step_s']:11.1f} "
            f"{r['init_and_first_step_s']:10.1f} {r['process_s']:8.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "batch": args.batch, "runs": runs}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
