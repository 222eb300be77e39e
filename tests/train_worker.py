"""One training run in a fresh process, for the device-count, multi-process and resume tests.

Usage: python -m tests.train_worker '{"devices": 2, "workdir": ..., "overrides": {...}}'
Writes WORKDIR/final_params.npz (the flattened parameters and EMA parameters) when training
completes.
"""

import json
import os
import sys

args = json.loads(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.get('devices', 1)}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

if args.get("cache_dir"):
    jax.config.update("jax_compilation_cache_dir", args["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

import functools  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from configs import v1  # noqa: E402
from mobilenet_jax.compression import distill  # noqa: E402
from mobilenet_jax.training import distributed, steps  # noqa: E402
from mobilenet_jax.training import loop as training  # noqa: E402

if args.get("float64"):
    # Float64 end to end, so that runs which differ only in how the work is split
    # over devices must agree to ~1e-12 instead of float32 rounding noise amplified
    # by training.
    jax.config.update("jax_enable_x64", True)
    steps.create_model = functools.partial(steps.create_model, dtype=jnp.float64, param_dtype=jnp.float64)
    distill.load_teacher = functools.partial(distill.load_teacher, dtype=jnp.float64, param_dtype=jnp.float64)

if args.get("step_delay"):
    # Slow steps, so that a test's signal lands while training is still running.
    import time

    make_step = steps.make_train_step

    def slow_step(*a, **k):
        step = make_step(*a, **k)

        def run(*x):
            time.sleep(args["step_delay"])
            return step(*x)

        return run

    steps.make_train_step = slow_step

if "process_id" in args:
    distributed.initialize(args["coordinator"], args["num_processes"], args["process_id"])

config = v1.get_config(args.get("config_arg"))
for key, value in args.get("overrides", {}).items():
    node, _, field = key.rpartition(".")
    setattr(config[node] if node else config, field, tuple(value) if isinstance(value, list) else value)
state, results = training.train_and_evaluate(config, args["workdir"])
if "preempted_at_step" in results:
    print(f"PREEMPTED {results['preempted_at_step']}", flush=True)
elif jax.process_index() == 0:
    # Not the BatchNorm statistics: flax creates them in float32 whatever param_dtype is, so in these
    # float64 runs a restore (to the initial dtype) rounds them, which float32 training never sees.
    weights = {"params": state.params, "ema_params": state.ema_params}
    flat = jax.tree_util.tree_flatten_with_path(distributed.to_host(weights))[0]
    np.savez(
        os.path.join(args["workdir"], "final_params.npz"),
        **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat},
    )
    with open(os.path.join(args["workdir"], "results.json"), "w") as f:
        json.dump(results, f)
