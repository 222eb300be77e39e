"""Optimisation: learning-rate schedule, weight-decay mask, TF-style RMSprop and the train state.

The recipe is TF-slim's for the released MobileNets: RMSprop with decay 0.9,
momentum 0.9 and epsilon 1.0 inside the square root (the accumulator starts at 1),
L2 weight decay 4e-5 on convolution and classifier kernels (not on depthwise kernels,
BatchNorm or biases), a staircase exponential decay after a linear warmup, and an
exponential moving average of the weights (kept in the state, applied by the step).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array  # raw uint32 key: dropout keys are folded from it and the step


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
    root, and momentum accumulates the learning-rate-scaled step. With
    ``config.max_consecutive_nonfinite_skips > 0`` the whole update is wrapped in
    ``optax.apply_if_finite``: a step whose gradients are not finite leaves the
    parameters and optimizer state as they were, up to that many steps in a row.
    """
    tx = optax.chain(
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
    skips = config.get("max_consecutive_nonfinite_skips", 0)
    return optax.apply_if_finite(tx, max_consecutive_errors=skips) if skips > 0 else tx


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


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, image_size: int) -> TrainState:
    """Shapes and dtypes of a train state, without computing one (for restoring checkpoints)."""
    return jax.eval_shape(lambda: create_train_state(jax.random.PRNGKey(0), model, tx, image_size))
