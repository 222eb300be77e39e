"""One training run in a fresh process, for the device-count, multi-process and resume tests.

Usage: python -m tests.train_worker '{"devices": 2, "workdir": ..., "overrides": {...}}'
Writes WORKDIR/final_params.npz (the flattened parameters, BatchNorm statistics and their EMAs) when training
completes. Importing the module only defines :func:`make_config`, which the tests share.
"""

import functools
import json
import os
import sys


def tuples(value):
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value


def make_config(overrides, config_arg=None):
    """configs/v1.py with ``{'model.width': 0.25, ...}`` set (JSON lists as tuples). A model field may change type
    (a profile tuple for the 'normal' string): the model section is rebuilt for it."""
    import ml_collections

    from configs import v1

    config = v1.get_config(config_arg)
    for key, value in overrides.items():
        node, _, field = key.rpartition(".")
        if node == "model":
            config.model = ml_collections.ConfigDict({**config.model.to_dict(), field: tuples(value)})
        else:
            setattr(config[node] if node else config, field, tuples(value))
    return config


def in_float64():
    """Float64 end to end, so that runs which differ only in how the work is split over devices must agree to
    ~1e-12 instead of float32 rounding noise amplified by training."""
    import jax
    import jax.numpy as jnp

    from mobilenet_jax.compression import distill
    from mobilenet_jax.training import optim, steps

    jax.config.update("jax_enable_x64", True)
    steps.create_model = functools.partial(steps.create_model, dtype=jnp.float64, param_dtype=jnp.float64)
    distill.load_teacher = functools.partial(distill.load_teacher, dtype=jnp.float64, param_dtype=jnp.float64)
    # Flax creates BatchNorm statistics in float32 whatever param_dtype is, and the float64 step returns them in
    # float64: without this cast the first step compiles the train step twice (once per input dtype).
    create_train_state = optim.create_train_state

    def create_float64_train_state(*a, **k):
        state = create_train_state(*a, **k)
        wider = functools.partial(jax.tree.map, lambda x: jnp.asarray(x, jnp.float64))
        return state.replace(batch_stats=wider(state.batch_stats), ema_batch_stats=wider(state.ema_batch_stats))

    optim.create_train_state = create_float64_train_state


def with_step_delay(seconds):
    """Slow steps, so that a test's signal lands while training is still running."""
    import time

    from mobilenet_jax.training import steps

    make_step = steps.make_train_step

    def slow_step(*a, **k):
        step = make_step(*a, **k)

        def run(*x):
            time.sleep(seconds)
            return step(*x)

        return run

    steps.make_train_step = slow_step


def main(args):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.get('devices', 1)}"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax
    import numpy as np

    from mobilenet_jax.training import distributed
    from mobilenet_jax.training import loop as training

    if args.get("cache_dir"):
        jax.config.update("jax_compilation_cache_dir", args["cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if args.get("float64"):
        in_float64()
    if args.get("step_delay"):
        with_step_delay(args["step_delay"])
    if "process_id" in args:
        distributed.initialize(args["coordinator"], args["num_processes"], args["process_id"])

    config = make_config(args.get("overrides", {}), args.get("config_arg"))
    state, results = training.train_and_evaluate(config, args["workdir"])
    if "preempted_at_step" in results:
        print(f"PREEMPTED {results['preempted_at_step']}", flush=True)
    elif jax.process_index() == 0:
        weights = {k: getattr(state, k) for k in ("params", "ema_params", "batch_stats", "ema_batch_stats")}
        flat = jax.tree_util.tree_flatten_with_path(distributed.to_host(weights))[0]
        np.savez(
            os.path.join(args["workdir"], "final_params.npz"),
            **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat},
        )
        with open(os.path.join(args["workdir"], "results.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
