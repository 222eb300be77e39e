"""The compiled steps: a synchronous data-parallel train step, an eval step, and evaluation over a split.

The steps run under ``jax.shard_map`` over the data-parallel mesh of
:mod:`mobilenet_jax.training.distributed`: each device computes gradients on its shard of the
global batch, ``lax.pmean`` averages them over all devices of all processes, and
every replica applies the same optax update. ``train.py``, the evaluation CLI and
the benchmarks all build their steps here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax import lax
from jax.sharding import PartitionSpec as P

from mobilenet_jax.compression.distill import Teacher, distillation_loss
from mobilenet_jax.models import registry
from mobilenet_jax.training import distributed
from mobilenet_jax.training.optim import TrainState

BATCH = distributed.BATCH_AXIS


def create_model(config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> nn.Module:
    """The model ``config.model`` describes, computing in the config's precision; ``overrides`` replace fields."""
    runtime = dict(
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
        bn_axis_name=BATCH if config.cross_replica_bn else None,
    )
    return registry.create_model(config.model.to_dict(), num_classes, **{**runtime, **overrides})


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def top_k_hits(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per example, whether the label is the top-1 class and among the top 5 (JAX or NumPy logits)."""
    top5 = lax.top_k(jnp.asarray(logits), min(5, logits.shape[-1]))[1]
    return top5[:, 0] == labels, jnp.any(top5 == labels[:, None], axis=-1)


def _metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array, loss: jax.Array) -> dict:
    top1, top5 = top_k_hits(logits, labels)
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum(top1 * mask),
        "top5": jnp.sum(top5 * mask),
        "count": jnp.sum(mask),
    }


def _gradients(
    state: TrainState,
    batch: dict,
    model: nn.Module,
    label_smoothing: float,
    teacher: Teacher | None = None,
    teacher_variables: dict | None = None,
):
    """Per-device gradients, all-reduced; returns ``(grads, logits, per_example_loss, batch_stats)``."""
    num_devices = lax.psum(1, BATCH)
    count = lax.psum(jnp.sum(batch["mask"]), BATCH)
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(BATCH))
    teacher_logits = None
    if teacher is not None:  # inference mode, outside the differentiated function
        teacher_logits = teacher.model.apply(teacher_variables, teacher.inputs(batch["image"]), train=False)
        teacher_logits = lax.stop_gradient(teacher_logits.astype(jnp.promote_types(teacher_logits.dtype, jnp.float32)))

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
        if teacher is None:
            per_example = optax.softmax_cross_entropy(logits, targets)
        else:
            per_example = distillation_loss(logits, teacher_logits, targets, teacher.temperature, teacher.alpha)
        # Scaled so that the pmean of the per-device gradients is the gradient of the
        # mean over all valid examples of the global batch.
        loss = jnp.sum(per_example * batch["mask"]) * num_devices / jnp.maximum(count, 1.0)
        return loss, (logits, per_example, new_model_state["batch_stats"])

    # Differentiate this device's copy of the parameters ('varying' over the batch
    # axis), then all-reduce explicitly: without the cast, shard_map would already sum
    # the gradients of the replicated parameters over devices in the backward pass.
    local_params = lax.pcast(state.params, BATCH, to="varying")
    grads, (logits, per_example, batch_stats) = jax.grad(loss_fn, has_aux=True)(local_params)
    # Replicas keep one copy of the BN statistics: identical already with cross-replica
    # BN, averaged over the replicas' shards otherwise.
    return lax.pmean(grads, BATCH), logits, per_example, lax.pmean(batch_stats, BATCH)


def train_step(
    state: TrainState,
    batch: dict,
    teacher_variables: dict | None = None,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    label_smoothing: float,
    ema_decay: float,
    skip_nonfinite: bool = False,
    teacher: Teacher | None = None,
) -> tuple[TrainState, dict]:
    """One synchronous step on this device's shard; call it under shard_map over ``'batch'``.

    With a ``teacher``, the loss is :func:`distillation_loss` against its logits on the
    same batch (``teacher_variables``, replicated, are read, never updated).

    ``metrics['finite']`` is 1 when the new state is finite (a finite loss, and finite
    parameters, BatchNorm statistics, EMA and optimizer state; with ``skip_nonfinite``, a
    skipped update counts as finite) and 0 otherwise, so the loop can refuse to save a
    poisoned state.
    """
    grads, logits, per_example, batch_stats = _gradients(
        state, batch, model, label_smoothing, teacher, teacher_variables
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if skip_nonfinite:  # optax.apply_if_finite left the parameters; keep the statistics too
        batch_stats = jax.tree.map(functools.partial(jnp.where, _all_finite(grads)), batch_stats, state.batch_stats)

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
    count = jnp.maximum(sums["count"], 1.0)
    # Everything a checkpoint saves: RMSprop's accumulator can overflow while the loss and
    # the update are still finite, and a resume from such a state cannot train.
    finite = _all_finite(
        (new_state.params, new_state.batch_stats, new_state.opt_state, new_state.ema_params, new_state.ema_batch_stats)
    )
    if not skip_nonfinite:
        finite &= jnp.isfinite(sums["loss"])
    metrics = {
        "loss": sums["loss"] / count,
        "top1": sums["top1"] / count,
        "top5": sums["top5"] / count,
        "skipped": lax.psum(jnp.sum(1.0 - batch["mask"]), BATCH),
        "learning_rate": learning_rate_fn(state.step),
        "finite": finite.astype(jnp.float32),
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


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    mesh: jax.sharding.Mesh,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    teacher: tuple[Teacher, dict] | None = None,
):
    """The jitted, sharded train step of ``config``: ``(state, global_batch) -> (state, metrics)``.

    The state is donated: the caller keeps only the returned one. ``teacher`` (from
    :func:`mobilenet_jax.compression.distill.load_teacher`) makes it a distillation step; the teacher's variables are
    placed on every device once and passed to each call, not baked into the program.
    """
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        learning_rate_fn=learning_rate_fn,
        label_smoothing=config.label_smoothing,
        ema_decay=config.ema_decay,
        skip_nonfinite=config.get("max_consecutive_nonfinite_skips", 0) > 0,
        teacher=None if teacher is None else teacher[0],
    )
    if teacher is None:
        sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(BATCH)), out_specs=(P(), P()))
        return jax.jit(sharded, donate_argnums=0)
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(BATCH), P()), out_specs=(P(), P()))
    jitted = jax.jit(sharded, donate_argnums=0)
    # Through the host: a process's local arrays cannot be moved onto other processes' devices.
    teacher_variables = jax.device_put(jax.device_get(teacher[1]), distributed.replicated(mesh))
    return lambda state, batch: jitted(state, batch, teacher_variables)


def make_eval_step(mesh: jax.sharding.Mesh, model: nn.Module):
    """The jitted, sharded eval step: ``(variables, global_batch) -> sums``; BN uses running statistics."""
    model = model.clone(bn_axis_name=None)
    step = jax.shard_map(functools.partial(eval_step, model=model), mesh=mesh, in_specs=(P(), P(BATCH)), out_specs=P())
    return jax.jit(step)


def evaluate(eval_fn, variables: dict, dataset, mesh, total_examples: int | None = None) -> dict:
    """Runs ``eval_fn`` over a finite dataset and returns loss/top1/top5 over the valid examples."""
    totals = None
    for batch in dataset:
        sums = eval_fn(variables, distributed.global_batch(distributed.as_numpy(batch), mesh))
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


def format_results(results: dict, prefix: str) -> str:
    """``'PREFIX | validation: top-1 ..% , top-5 ..%, loss .. (N images) | ...'``."""
    parts = [
        f"{split}: top-1 {100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}%, loss {r['loss']:.4f} "
        f"({r['examples']} images{', ' + str(r['skipped']) + ' undecodable skipped' if r.get('skipped') else ''})"
        for split, r in results.items()
    ]
    return prefix + " | " + " | ".join(parts)
