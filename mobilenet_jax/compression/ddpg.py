"""The DDPG agent of AMC's search (Lillicrap et al., 2016; He et al., 2018), in JAX and optax.

An actor maps a layer's state to one action in [0, 1] (a keep ratio); a critic
scores (state, action) pairs. As in AMC's ``lib/agent.py`` (mit-han-lab/amc): two
300-unit ReLU layers each, Adam at 1e-4 (actor) and 1e-3 (critic), target networks
updated softly with tau = 0.01, discount 1, a replay memory of 100 transitions per
layer, minibatches of 64, rewards minus a moving-average baseline (rate 0.5), and
exploration by a truncated normal around the actor's action whose width starts at
0.5 and decays by 0.95 per episode after the warm-up. Every random draw comes from
the seed, so a search is repeatable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from scipy import stats


@dataclasses.dataclass(frozen=True)
class Settings:
    """AMC's defaults (``amc_search.py``)."""

    hidden: int = 300
    actor_learning_rate: float = 1e-4
    critic_learning_rate: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    memory_per_layer: int = 100
    init_delta: float = 0.5
    delta_decay: float = 0.95
    baseline_rate: float = 0.5


class Actor(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, states: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(states))
        x = nn.relu(nn.Dense(self.hidden, name="fc2")(x))
        return nn.sigmoid(nn.Dense(1, name="fc3")(x))[..., 0]


class Critic(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, states: jax.Array, actions: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden, name="fc_state")(states) + nn.Dense(self.hidden, name="fc_action")(actions[..., None])
        x = nn.relu(nn.Dense(self.hidden, name="fc2")(nn.relu(x)))
        return nn.Dense(1, name="fc3")(x)[..., 0]


class Networks(NamedTuple):
    actor: Any
    critic: Any
    target_actor: Any
    target_critic: Any
    actor_optimizer: Any
    critic_optimizer: Any


def _optimizers(settings: Settings) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    return optax.adam(settings.actor_learning_rate), optax.adam(settings.critic_learning_rate)


@functools.partial(jax.jit, static_argnums=0)
def _update(settings: Settings, nets: Networks, batch: tuple) -> Networks:
    """One DDPG step: the critic towards r + discount * Q'(s', mu'(s')), the actor up the critic, targets softly."""
    states, actions, rewards, next_states, not_done = batch
    actor, critic = Actor(settings.hidden), Critic(settings.hidden)
    actor_optimizer, critic_optimizer = _optimizers(settings)
    next_q = critic.apply(nets.target_critic, next_states, actor.apply(nets.target_actor, next_states))
    target = rewards + settings.discount * not_done * next_q

    def critic_loss(params):
        return jnp.mean((critic.apply(params, states, actions) - target) ** 2)

    updates, critic_state = critic_optimizer.update(jax.grad(critic_loss)(nets.critic), nets.critic_optimizer)
    critic_params = optax.apply_updates(nets.critic, updates)

    def actor_loss(params):
        return -jnp.mean(critic.apply(critic_params, states, actor.apply(params, states)))

    updates, actor_state = actor_optimizer.update(jax.grad(actor_loss)(nets.actor), nets.actor_optimizer)
    actor_params = optax.apply_updates(nets.actor, updates)
    soft = functools.partial(optax.incremental_update, step_size=settings.tau)
    return Networks(
        actor_params,
        critic_params,
        soft(actor_params, nets.target_actor),
        soft(critic_params, nets.target_critic),
        actor_state,
        critic_state,
    )


@functools.partial(jax.jit, static_argnums=0)
def _act(hidden: int, params, state: jax.Array) -> jax.Array:
    return Actor(hidden).apply(params, state[None])[0]


class Agent:
    """A DDPG agent over ``state_size``-number states and one action in [0, 1], for episodes of ``layers`` steps."""

    def __init__(self, state_size: int, layers: int, seed: int, settings: Settings = Settings()):
        self.settings = settings
        self.rng = np.random.default_rng(seed)
        actor_key, critic_key = jax.random.split(jax.random.key(seed))
        states = jnp.zeros((1, state_size))
        actor = Actor(settings.hidden).init(actor_key, states)
        critic = Critic(settings.hidden).init(critic_key, states, jnp.zeros((1,)))
        actor_optimizer, critic_optimizer = _optimizers(settings)
        self.nets = Networks(actor, critic, actor, critic, actor_optimizer.init(actor), critic_optimizer.init(critic))
        size = settings.memory_per_layer * layers
        self._memory = {
            "states": np.zeros((size, state_size), np.float32),
            "actions": np.zeros(size, np.float32),
            "rewards": np.zeros(size, np.float32),
            "next_states": np.zeros((size, state_size), np.float32),
            "not_done": np.zeros(size, np.float32),
        }
        self._stored = 0
        self.baseline: float | None = None

    def random_action(self) -> float:
        """A warm-up action: uniform in [0, 1]."""
        return float(self.rng.uniform(0.0, 1.0))

    def action(self, state: np.ndarray, episodes_learned: int) -> float:
        """The actor's action with exploration: a normal truncated to [0, 1], narrowing with ``episodes_learned``."""
        mean = float(_act(self.settings.hidden, self.nets.actor, jnp.asarray(state, jnp.float32)))
        sigma = self.settings.init_delta * self.settings.delta_decay**episodes_learned
        low, high = (0.0 - mean) / sigma, (1.0 - mean) / sigma
        sample = stats.truncnorm.rvs(low, high, loc=mean, scale=sigma, random_state=self.rng)
        return float(np.clip(sample, 0.0, 1.0))

    def greedy_action(self, state: np.ndarray) -> float:
        return float(_act(self.settings.hidden, self.nets.actor, jnp.asarray(state, jnp.float32)))

    def remember(self, states: np.ndarray, actions: np.ndarray, reward: float) -> None:
        """One episode's transitions, each with the episode's reward (AMC: the reward comes at the end)."""
        memory, size = self._memory, len(self._memory["actions"])
        for t in range(len(actions)):
            i = self._stored % size
            last = t == len(actions) - 1
            memory["states"][i] = states[t]
            memory["actions"][i] = actions[t]
            memory["rewards"][i] = reward
            memory["next_states"][i] = states[t] if last else states[t + 1]
            memory["not_done"][i] = 0.0 if last else 1.0
            self._stored += 1

    def learn(self) -> None:
        """One update on a minibatch from the replay memory, rewards relative to the moving baseline."""
        count = min(self._stored, len(self._memory["actions"]))
        rows = self.rng.choice(count, self.settings.batch_size, replace=count < self.settings.batch_size)
        batch = {name: values[rows] for name, values in self._memory.items()}
        mean = float(batch["rewards"].mean())
        rate = self.settings.baseline_rate
        self.baseline = mean if self.baseline is None else self.baseline + rate * (mean - self.baseline)
        rewards = batch["rewards"] - self.baseline
        self.nets = _update(
            self.settings,
            self.nets,
            (batch["states"], batch["actions"], rewards, batch["next_states"], batch["not_done"]),
        )
