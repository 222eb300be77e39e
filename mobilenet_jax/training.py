"""Training and evaluation: model and optimizer from a config, the steps, and the loop.

The steps run under ``jax.shard_map`` over the data-parallel mesh of
:mod:`mobilenet_jax.distributed`: each device computes gradients on its shard of the
global batch, ``lax.pmean`` averages them over all devices of all processes, and
every replica applies the same optax update.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import struct
from jax import lax
from jax.sharding import PartitionSpec as P

from mobilenet_jax import checkpoint, distributed, input_pipeline
from mobilenet_jax.metrics import MetricWriter, ProgressBar
from mobilenet_jax.models import ARCHITECTURES

BATCH = distributed.BATCH_AXIS


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array  # raw uint32 key: dropout keys are folded from it and the step


# ----------------------------------------------------------------------------- config -> objects


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError with one sentence for values that cannot work."""
    checks = [
        (config.model in ARCHITECTURES, f"model must be one of {sorted(ARCHITECTURES)}, got {config.model!r}"),
        (config.batch_size > 0, f"batch_size must be positive, got {config.batch_size}"),
        (config.image_size >= 8, f"image_size must be at least 8 pixels, got {config.image_size}"),
        (config.width > 0, f"width must be positive, got {config.width}"),
        (config.learning_rate > 0, f"learning_rate must be positive, got {config.learning_rate}"),
        (config.lr_batch_size > 0, f"lr_batch_size must be positive, got {config.lr_batch_size}"),
        (config.num_epochs > 0 or config.num_train_steps > 0, "set num_epochs or num_train_steps to a positive value"),
        (0 <= config.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {config.label_smoothing}"),
        (0 <= config.ema_decay < 1, f"ema_decay must be in [0, 1), got {config.ema_decay}"),
        (config.weight_decay >= 0, f"weight_decay must be non-negative, got {config.weight_decay}"),
        (0 < config.lr_decay_factor <= 1, f"lr_decay_factor must be in (0, 1], got {config.lr_decay_factor}"),
        (config.lr_decay_epochs > 0, f"lr_decay_epochs must be positive, got {config.lr_decay_epochs}"),
        (config.warmup_epochs >= 0, f"warmup_epochs must be non-negative, got {config.warmup_epochs}"),
        (
            0 < config.crop_area_range[0] <= config.crop_area_range[1] <= 1,
            f"crop_area_range must satisfy 0 < min <= max <= 1, got {tuple(config.crop_area_range)}",
        ),
        (config.log_every_steps > 0, f"log_every_steps must be positive, got {config.log_every_steps}"),
        (
            config.checkpoint_every_steps > 0,
            f"checkpoint_every_steps must be positive, got {config.checkpoint_every_steps}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"Bad config: {message}.")


def create_model(config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> nn.Module:
    """The model a config describes; ``overrides`` replace architecture fields."""
    fields = dict(
        num_classes=num_classes,
        width=config.width,
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
        bn_momentum=config.bn_momentum,
        bn_epsilon=config.bn_epsilon,
        bn_axis_name=BATCH if config.cross_replica_bn else None,
        depthwise_impl=config.depthwise_impl,
        **config.model_args.to_dict(),
    )
    fields.update(overrides)
    try:
        return ARCHITECTURES[config.model](**fields)
    except TypeError as error:
        raise ConfigError(f"Bad config: {config.model} does not take these arguments ({error}).") from None


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``learning_rate`` per ``lr_batch_size`` images, scaled linearly to ``batch_size``."""
    return config.learning_rate * config.batch_size / config.lr_batch_size


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup to the peak rate, then ``lr_decay_factor`` every ``lr_decay_epochs`` (staircase)."""
    peak = peak_learning_rate(config)
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    decay = optax.exponential_decay(
        peak,
        transition_steps=max(1, int(round(config.lr_decay_epochs * steps_per_epoch))),
        decay_rate=config.lr_decay_factor,
        staircase=True,
    )
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
    """True for convolution and classifier kernels, False for depthwise kernels, BN and biases."""

    def decays(path, _):
        names = [getattr(p, "key", str(p)) for p in path]
        return names[-1] == "kernel" and "conv_dw" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """L2 weight decay on the masked kernels, then RMSprop as TensorFlow defines it.

    TF's RMSProp: the mean square starts at 1, epsilon is added inside the square
    root, and momentum accumulates the learning-rate-scaled step.
    """
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
        optax.rmsprop(
            learning_rate_fn,
            decay=config.rmsprop_decay,
            eps=config.rmsprop_epsilon,
            initial_scale=1.0,
            eps_in_sqrt=True,
            momentum=config.rmsprop_momentum,
        ),
    )


def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(rng, images)


def create_train_state(
    rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation, image_size: int, variables: dict | None = None
) -> TrainState:
    """A fresh state from ``rng``, or around given ``variables`` (e.g. converted weights)."""
    init_rng, dropout_rng = jax.random.split(rng)
    if variables is None:
        variables = init_variables(model, init_rng, image_size)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        # Copies: the step donates the state, and one buffer cannot be donated twice.
        ema_params=jax.tree.map(jnp.copy, params),
        ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        rng=dropout_rng,
    )


# ----------------------------------------------------------------------------- steps


def _metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array, loss: jax.Array) -> dict:
    top5 = lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    label_smoothing: float,
    ema_decay: float,
) -> tuple[TrainState, dict]:
    """One synchronous step on this device's shard; call it under shard_map over ``'batch'``."""
    num_devices = lax.psum(1, BATCH)
    count = lax.psum(jnp.sum(batch["mask"]), BATCH)
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(BATCH))

    def loss_fn(params):
        logits, new_model_state = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bfloat16 -> float32
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
        # Scaled so that the pmean of the per-device gradients is the gradient of the
        # mean over all valid examples of the global batch.
        loss = jnp.sum(per_example * batch["mask"]) * num_devices / jnp.maximum(count, 1.0)
        return loss, (logits, per_example, new_model_state["batch_stats"])

    # Differentiate this device's copy of the parameters ('varying' over the batch
    # axis), then all-reduce explicitly: without the cast, shard_map would already sum
    # the gradients of the replicated parameters over devices in the backward pass.
    local_params = lax.pcast(state.params, BATCH, to="varying")
    grads, (logits, per_example, batch_stats) = jax.grad(loss_fn, has_aux=True)(local_params)
    grads = lax.pmean(grads, BATCH)
    # Replicas keep one copy of the BN statistics: identical already with cross-replica
    # BN, averaged over the replicas' shards otherwise.
    batch_stats = lax.pmean(batch_stats, BATCH)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # TF's ExponentialMovingAverage with num_updates: a short memory early in training.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = functools.partial(jax.tree.map, lambda e, p: decay * e + (1.0 - decay) * p)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema(state.ema_params, params),
        ema_batch_stats=ema(state.ema_batch_stats, batch_stats),
    )
    sums = lax.psum(_metrics(logits, batch["label"], batch["mask"], per_example), BATCH)
    metrics = {
        "loss": sums["loss"] / jnp.maximum(sums["count"], 1.0),
        "top1": sums["top1"] / jnp.maximum(sums["count"], 1.0),
        "top5": sums["top5"] / jnp.maximum(sums["count"], 1.0),
        "skipped": lax.psum(jnp.sum(1.0 - batch["mask"]), BATCH),
        "learning_rate": learning_rate_fn(state.step),
    }
    return new_state, metrics


def eval_step(variables: dict, batch: dict, *, model: nn.Module) -> dict:
    """Sums of loss, top-1/top-5 hits and valid examples over the global batch."""
    logits = model.apply(variables, batch["image"], train=False)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    sums = _metrics(logits, batch["label"], batch["mask"], per_example)
    sums["skipped"] = jnp.sum(1.0 - batch["mask"])
    return lax.psum(sums, BATCH)


def sharded_train_step(mesh, **kwargs):
    step = jax.shard_map(
        functools.partial(train_step, **kwargs), mesh=mesh, in_specs=(P(), P(BATCH)), out_specs=(P(), P())
    )
    return jax.jit(step, donate_argnums=0)


def sharded_eval_step(mesh, model: nn.Module):
    step = jax.shard_map(functools.partial(eval_step, model=model), mesh=mesh, in_specs=(P(), P(BATCH)), out_specs=P())
    return jax.jit(step)


def evaluate(eval_fn, variables: dict, dataset, mesh, total_examples: int | None = None) -> dict:
    """Runs ``eval_fn`` over a finite dataset and returns loss/top1/top5 over the valid examples."""
    totals = None
    for batch in dataset:
        sums = eval_fn(variables, distributed.global_batch(input_pipeline.as_numpy(batch), mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = distributed.to_host(totals)
    count = max(float(totals["count"]), 1.0)
    result = {
        "loss": float(totals["loss"]) / count,
        "top1": float(totals["top1"]) / count,
        "top5": float(totals["top5"]) / count,
        "examples": int(totals["count"]),
    }
    if total_examples is not None:
        result["skipped"] = total_examples - int(totals["count"])  # undecodable images
    return result


# ----------------------------------------------------------------------------- the loop


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _initial_variables(config, model, num_classes: int, image_size: int, rng) -> dict | None:
    """Variables from ``config.init_from`` (a converted model directory), with a new head if needed."""
    if not config.init_from:
        return None
    source_model, source = checkpoint.load_model(config.init_from)
    fresh = init_variables(model, rng, image_size)
    expected = jax.tree.map(lambda a: a.shape, fresh)
    if source_model.num_classes != num_classes:
        logging.info("init_from: %d classes -> %d, new classifier.", source_model.num_classes or 0, num_classes)
        source["params"] = {**source["params"], "classifier": fresh["params"]["classifier"]}
    got = jax.tree.map(lambda a: a.shape, source)
    if got != expected:
        raise ConfigError(
            f"Bad config: init_from={config.init_from!r} holds a different architecture than the config "
            "(compare its model.json with config.model, width and model_args)."
        )
    return source


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, dict]:
    """Trains, checkpoints and evaluates as ``config`` says; returns the state and the final evaluation.

    A workdir that holds checkpoints resumes from the latest one; after SIGTERM the
    current step is saved and the results are ``{'preempted_at_step': step}``.
    """
    validate_config(config)
    workdir = os.path.abspath(workdir)
    checkpoint.check_workdir(workdir)
    mesh = distributed.make_mesh()
    distributed.check_batch_size(config.batch_size, mesh)
    process_index, process_count = jax.process_index(), jax.process_count()

    info = input_pipeline.get_dataset(config.dataset, config.data_dir, config.manual_dir)
    train_examples = input_pipeline.num_examples(info, config.train_split)
    steps_per_epoch = max(1, train_examples // config.batch_size)
    num_steps = (
        config.num_train_steps if config.num_train_steps > 0 else int(math.ceil(config.num_epochs * steps_per_epoch))
    )
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch

    model = create_model(config, info.num_classes)
    learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
    tx = create_optimizer(config, learning_rate_fn)
    rng = jax.random.PRNGKey(config.seed)
    image_size = config.image_size

    def fresh_state():
        variables = _initial_variables(config, model, info.num_classes, image_size, rng)
        return create_train_state(rng, model, tx, image_size, variables)

    manager = checkpoint.TrainCheckpoints(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    abstract = jax.eval_shape(lambda: create_train_state(rng, model, tx, image_size))
    state = manager.restore_latest(abstract, distributed.replicated(mesh))
    if state is None:
        # Through host memory: every process holds the same values (same seed), and each
        # places its own replicas.
        state = jax.device_put(jax.device_get(fresh_state()), distributed.replicated(mesh))
        if process_index == 0:
            checkpoint.write_model_record(workdir, model)
    start_step = int(distributed.to_host(state.step))
    if process_index == 0:
        print(
            f"Training {config.model} (width {config.width}) on {config.dataset} at {image_size} px, "
            f"{jax.device_count()} devices, steps {start_step} -> {num_steps}, workdir {workdir}",
            flush=True,
        )

    train_fn = sharded_train_step(
        mesh,
        model=model,
        tx=tx,
        learning_rate_fn=learning_rate_fn,
        label_smoothing=config.label_smoothing,
        ema_decay=config.ema_decay,
    )
    eval_fn = sharded_eval_step(mesh, model.clone(bn_axis_name=None))
    train_ds = input_pipeline.create_train_dataset(
        info,
        config.train_split,
        global_batch_size=config.batch_size,
        image_size=image_size,
        seed=config.seed,
        start_step=start_step,
        area_range=tuple(config.crop_area_range),
        shuffle_buffer_size=config.shuffle_buffer_size,
        cache=config.cache,
        process_index=process_index,
        process_count=process_count,
    )
    eval_examples = input_pipeline.num_examples(info, config.eval_split)

    eval_ds = input_pipeline.create_eval_dataset(
        info,
        config.eval_split,
        global_batch_size=config.batch_size,
        image_size=image_size,
        method=config.eval_preprocessing,
        cache=config.cache,
        process_index=process_index,
        process_count=process_count,
    )

    def run_eval(step: int) -> dict:
        live = {"params": state.params, "batch_stats": state.batch_stats}
        results = {"validation": evaluate(eval_fn, live, eval_ds, mesh, eval_examples)}
        if config.ema_decay > 0:
            ema = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
            results["validation_ema"] = evaluate(eval_fn, ema, eval_ds, mesh, eval_examples)
        for split, values in results.items():
            writer.write(step, split, values)
        return results

    writer = MetricWriter(workdir, enabled=process_index == 0)
    progress = ProgressBar(num_steps, start_step, config.batch_size, enabled=process_index == 0 and config.progress_bar)
    pending, window_start, window_steps = [], time.perf_counter(), 0
    results = {}
    train_iter = iter(train_ds)
    with _Preemption() as preemption:
        for step in range(start_step + 1, num_steps + 1):
            local = next(train_iter)
            state, metrics = train_fn(state, distributed.global_batch(input_pipeline.as_numpy(local), mesh))
            pending.append(metrics)
            window_steps += 1
            if step % config.log_every_steps == 0 or step == num_steps:
                logged = distributed.to_host(pending)
                summary = {k: float(np.mean([m[k] for m in logged])) for k in logged[0]}
                if not math.isfinite(summary["loss"]):
                    raise FloatingPointError(
                        f"Training loss became {summary['loss']} at step {step}; lower the learning rate."
                    )
                elapsed = time.perf_counter() - window_start
                summary["images_per_sec"] = window_steps * config.batch_size / max(elapsed, 1e-9)
                summary["skipped"] = float(np.sum([m["skipped"] for m in logged]))
                writer.write(step, "train", summary)
                progress.update(step, summary)
                pending, window_start, window_steps = [], time.perf_counter(), 0
            if step % config.checkpoint_every_steps == 0 or step == num_steps:
                manager.save(step, state)
            if preemption.requested:
                manager.save(step, state, force=True)
                manager.wait()
                logging.warning("SIGTERM: saved step %d to %s; rerun the same command to resume.", step, workdir)
                progress.close()
                writer.close()
                return state, {"preempted_at_step": step}
            if step % eval_every == 0 and step != num_steps:
                results = run_eval(step)
                progress.write(_format_results(step, results))
    progress.close()
    manager.wait()
    results = run_eval(num_steps)
    writer.close()
    manager.close()
    if process_index == 0:
        print(_format_results(num_steps, results, final=True), flush=True)
    return state, results


def _format_results(step: int, results: dict, final: bool = False) -> str:
    parts = [
        f"{split}: top-1 {100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}%, loss {r['loss']:.4f} "
        f"({r['examples']} images{', ' + str(r['skipped']) + ' undecodable skipped' if r.get('skipped') else ''})"
        for split, r in results.items()
    ]
    return ("Final evaluation" if final else f"Step {step}") + " | " + " | ".join(parts)
