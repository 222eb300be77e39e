"""AMC's search (He et al., 2018): a DDPG agent picks one keep ratio per layer under a MAC budget.

    python -m mobilenet_jax.prune WORKDIR OUT_DIR --search amc --macs 0.5 [--episodes 300 --warmup 100 --seed 0]

The layers are the channel groups ``--macs`` prunes (:func:`mobilenet_jax.compression.prune.macs_groups`:
MobileNetV1's stem and block outputs, MobileNetV2's stem and expansions), in the
order they run, so the search covers every network the architecture tables describe.
For each layer the agent sees AMC's 10 numbers (index, kind, input and output
channels, stride, kernel, weight count, the share of MACs removed so far, the share
still to come, its previous action; the first 7 scaled to [0, 1] over the layers) and
answers a keep ratio. The environment clips it to [0.2, 1], rounds the channels to
multiples of 8 and caps it by AMC's *action wall*: the largest width that still meets
the budget if every later layer kept only its minimum. Every episode therefore meets
the budget. The reward is the top-1 accuracy, without fine-tuning, of the pruned
network after AMC's least-squares refit, on training images held out from the refit's
(:func:`mobilenet_jax.compression.prune.zeroed` evaluates it at the unpruned shapes, so
one compiled forward pass serves every episode). Warm-up episodes act at random; then
the agent (:mod:`mobilenet_jax.compression.ddpg`) learns after every episode. The
search is seeded and repeatable on one machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from tqdm import tqdm

from mobilenet_jax import errors
from mobilenet_jax.compression import ddpg, prune

STATE_SIZE = 10


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """AMC's search set-up (``amc_search.py``: 100 warm-up episodes, a 0.2 lower bound, multiples of 8)."""

    episodes: int = 300  # learning episodes after the warm-up (AMC: 800 on ImageNet)
    warmup: int = 100
    lower: float = 0.2
    divisor: int = 8
    seed: int = 0
    agent: ddpg.Settings = ddpg.Settings()


class MacCounter:
    """Multiply-adds of ``model`` at ``image_size`` as a function of its channel-group widths.

    Each convolution's MACs are its output positions times its kernel area times its
    input and output channels (a depthwise conv: times its channels), so the count is a
    sum of products of at most two group widths; the classifier adds its inputs times
    the classes. :func:`mobilenet_jax.summary.summarize` counts the built model instead.
    :meth:`features` splits the count by kind of layer and adds the activations written
    (output positions times channels): what a latency model is fitted on.
    """

    KINDS = ("full", "pointwise", "depthwise", "classifier", "activations")

    def __init__(self, model: nn.Module, image_size: int):
        all_groups = prune.groups(model)
        reads = {reader: i for i, group in enumerate(all_groups) for reader in group.readers}
        reads.update({conv.path: i for i, group in enumerate(all_groups) for conv in group.passes})
        writes = {conv.path: i for i, group in enumerate(all_groups) for conv in group.producers}
        none = len(all_groups)  # the index of a constant width of 1
        terms = []  # (kind, coefficient, first group, second group)
        height = width = image_size
        network = model.network()
        for conv in network.convs():
            height, width = math.ceil(height / conv.stride), math.ceil(width / conv.stride)
            area = height * width * conv.kernel**2
            if conv.kind == "depthwise":
                terms.append(("depthwise", area, reads[conv.path], none))
                terms.append(("activations", height * width, reads[conv.path], none))
                continue
            given = reads.get(conv.path, none)  # the stem reads the image
            terms.append((conv.kind, area * (conv.in_channels if given == none else 1), given, writes[conv.path]))
            terms.append(("activations", height * width, writes[conv.path], none))
        pooled = [conv for i, block in enumerate(network.blocks) for conv in block.se_convs(f"block_{i}")]
        pooled += [network.head_fc()] if network.head_hidden else []  # 1x1 layers on pooled vectors
        terms += [("pointwise", 1, reads[conv.path], writes[conv.path]) for conv in pooled]
        if model.num_classes is not None:
            terms.append(("classifier", model.num_classes, reads["classifier"], none))
        self._kind = np.array([self.KINDS.index(t[0]) for t in terms])
        self._coefficient = np.array([t[1] for t in terms], np.float64)
        self._first = np.array([t[2] for t in terms])
        self._second = np.array([t[3] for t in terms])
        self.full = self(prune.group_widths(model))

    def _terms(self, widths: Sequence[float]) -> np.ndarray:
        w = np.append(np.asarray(widths, np.float64), 1.0)
        return self._coefficient * w[self._first] * w[self._second]

    def __call__(self, widths: Sequence[float]) -> float:
        terms = self._terms(widths)
        return float(np.sum(terms[self._kind != self.KINDS.index("activations")]))

    def features(self, widths: Sequence[float]) -> np.ndarray:
        """MACs of each kind of layer and the activations written, in the order of ``KINDS``."""
        return np.bincount(self._kind, weights=self._terms(widths), minlength=len(self.KINDS))


def check_budget(budget: float) -> None:
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and 0 < budget < 1):
        raise errors.UserError(f"The search's budget must be in (0, 1), got {budget!r}.")


class Environment:
    """AMC's channel-pruning environment: states, the action wall, and the reward of a list of widths."""

    def __init__(
        self,
        model: nn.Module,
        variables: dict,
        *,
        cost: Callable[[Sequence[float]], float],
        budget: float,
        refit_images: jax.Array,
        images: jax.Array,
        labels: np.ndarray,
        settings: SearchSettings = SearchSettings(),
    ):
        check_budget(budget)
        self.model, self.variables, self.cost, self.settings = model, variables, cost, settings
        self.groups = prune.groups(model)
        self.full = [group.channels for group in self.groups]
        self.layers = [i for i, searched in enumerate(prune.macs_groups(model)) if searched]
        if not self.layers:
            raise errors.UserError(f"{type(model).__name__} has no channel group the search can prune.")
        self.allowed = {i: _allowed_widths(self.full[i], settings.lower, settings.divisor) for i in self.layers}
        self.limit = budget * cost(self.full)
        smallest = cost(self.with_widths(self.full, {i: self.allowed[i][0] for i in self.layers}))
        if smallest > self.limit:
            raise errors.UserError(
                f"A budget of {budget} is below what keeping {settings.lower:.0%} of every layer costs "
                f"({smallest / cost(self.full):.3f} of the model); raise the budget."
            )
        self._static = self._static_features()
        self._refit_images, self._images, self.labels = refit_images, images, np.asarray(labels)
        self._target = prune.reference(model, variables, refit_images)
        self._rewards: dict[tuple, float] = {}

    @staticmethod
    def with_widths(widths: Sequence[int], changes: dict[int, int]) -> list[int]:
        return [changes.get(i, w) for i, w in enumerate(widths)]

    def _static_features(self) -> np.ndarray:
        """Index, kind, input and output channels, stride, kernel, weights per layer, each scaled to [0, 1]."""
        rows = []
        for t, i in enumerate(self.layers):
            group = self.groups[i]
            conv = group.producers[0]
            stride = max([conv.stride] + [p.stride for p in group.passes])
            weights = conv.in_channels * conv.out_channels * conv.kernel**2
            rows.append([t, float(conv.kind == "pointwise"), conv.in_channels, conv.out_channels, stride,
                         conv.kernel, weights])  # fmt: skip
        rows = np.asarray(rows, np.float64)
        low, span = rows.min(axis=0), np.ptp(rows, axis=0)
        return np.where(span > 0, (rows - low) / np.where(span > 0, span, 1.0), 0.0)

    def state(self, t: int, widths: Sequence[int], previous: float) -> np.ndarray:
        """Layer ``t``'s 10 numbers, given the widths decided so far (later layers still full)."""
        full = self.cost(self.full)
        later = {i: 0 for i in self.layers[t + 1 :]}
        reduced = (full - self.cost(widths)) / full
        rest = (full - self.cost(self.with_widths(self.full, later))) / full
        return np.concatenate([self._static[t], [reduced, rest, previous]]).astype(np.float32)

    def wall(self, t: int, widths: Sequence[int], action: float) -> int:
        """Layer ``t``'s width for ``action``: clipped, rounded, and no more than the budget leaves it."""
        i, allowed = self.layers[t], self.allowed[self.layers[t]]
        wanted = min(max(float(action), self.settings.lower), 1.0) * self.full[i]
        nearest = min(allowed, key=lambda w: (abs(w - wanted), w))
        later = {j: self.allowed[j][0] for j in self.layers[t + 1 :]}
        for width in reversed([w for w in allowed if w <= nearest]):
            if self.cost(self.with_widths(widths, {**later, i: width})) <= self.limit * (1 + 1e-12):
                return width
        return allowed[0]

    def reward(self, widths: Sequence[int]) -> float:
        """Top-1 accuracy on the held-out images of the pruned, refitted network ``widths`` describes."""
        key = tuple(int(w) for w in widths)
        if key not in self._rewards:
            keeps = prune.keep_indices(self.model, self.variables, prune.resize(self.model, key))
            variables = prune.zeroed(self.model, self.variables, keeps, self._refit_images, self._target)
            self._rewards[key] = accuracy(self.model, variables, self._images, self.labels)
        return self._rewards[key]


def uniform_widths(env: Environment) -> list[int]:
    """One keep ratio for every searched layer, the largest within the budget (bisected): the baseline AMC beats."""

    def plan(keep: float) -> list[int]:
        divisor = env.settings.divisor
        return env.with_widths(env.full, {i: max(env.allowed[i][0], prune.round_channels(env.full[i], keep, divisor))
                                          for i in env.layers})  # fmt: skip

    low, high = env.settings.lower, 1.0
    for _ in range(20):
        middle = (low + high) / 2
        low, high = (middle, high) if env.cost(plan(middle)) <= env.limit else (low, middle)
    return plan(low)


def _allowed_widths(channels: int, lower: float, divisor: int) -> list[int]:
    """Multiples of ``divisor`` from ``lower`` of ``channels`` (rounded up) to ``channels``, and ``channels``."""
    smallest = min(channels, max(divisor, math.ceil(channels * lower / divisor) * divisor))
    return sorted({*range(smallest, channels + 1, divisor), channels})


def accuracy(model: nn.Module, variables: dict, images: jax.Array, labels: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (compiled once per model and batch shape)."""
    outputs = [np.asarray(prune.logits(model, variables, images[i : i + batch])) for i in range(0, len(images), batch)]
    return float(np.mean(np.argmax(np.concatenate(outputs), axis=-1) == np.asarray(labels)))


@dataclasses.dataclass
class SearchResult:
    widths: tuple[int, ...]  # one per channel group (prune.resize)
    reward: float
    cost: float  # the cost of ``widths`` as a fraction of the unpruned model's
    episodes: list[dict[str, Any]]


def search(env: Environment, log_path: str | os.PathLike | None = None, progress: bool = True) -> SearchResult:
    """AMC's episodes: warm-up at random, then DDPG; returns the best widths seen. Appends one line per episode."""
    settings = env.settings
    agent = ddpg.Agent(STATE_SIZE, len(env.layers), settings.seed, settings.agent)
    best, history = None, []
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 (written through the whole search)
    bar = tqdm(total=settings.warmup + settings.episodes, unit="episode", disable=not progress, dynamic_ncols=True)
    try:
        for episode in range(settings.warmup + settings.episodes):
            start = time.perf_counter()
            learning = episode >= settings.warmup
            widths, states, actions = list(env.full), [], []
            for t, i in enumerate(env.layers):
                state = env.state(t, widths, actions[-1] if actions else 1.0)
                raw = agent.action(state, episode - settings.warmup) if learning else agent.random_action()
                widths[i] = env.wall(t, widths, raw)
                states.append(state)
                actions.append(widths[i] / env.full[i])
            reward = env.reward(widths)
            agent.remember(np.asarray(states), np.asarray(actions), reward)
            if learning:
                for _ in env.layers:
                    agent.learn()
            if best is None or reward > best.reward:
                best = SearchResult(tuple(widths), reward, env.cost(widths) / env.cost(env.full), history)
            record = {
                "episode": episode, "phase": "learn" if learning else "warmup", "reward": reward,
                "cost": env.cost(widths) / env.cost(env.full), "keep": [round(a, 4) for a in actions],
                "widths": widths, "best_reward": best.reward, "seconds": round(time.perf_counter() - start, 3),
            }  # fmt: skip
            history.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(best=f"{100 * best.reward:.2f}%", last=f"{100 * reward:.2f}%")
    finally:
        bar.close()
        if log:
            log.close()
    return best


def keep_ratio_svg(path: str | os.PathLike, names: Sequence[str], series: dict[str, Sequence[float]]) -> None:
    """A bar chart of the keep ratio per layer, one colour per series (AMC's figure of its searched policy)."""
    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
    left, bottom, top, bar = 50, 200, 20, 12
    slot = bar * len(series) + 8
    width, height = left + slot * len(names) + 20, bottom + 90
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="10">']  # fmt: skip
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - (bottom - top) * tick
        parts.append(f'<line x1="{left}" y1="{y}" x2="{width - 10}" y2="{y}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 5}" y="{y + 3}" text-anchor="end">{tick:.2f}</text>')
    parts.append(f'<text x="12" y="{top + 90}" transform="rotate(-90 12 {top + 90})">keep ratio</text>')
    for s, (label, values) in enumerate(series.items()):
        colour = colours[s % len(colours)]
        for i, value in enumerate(values):
            x, h = left + 4 + i * slot + s * bar, (bottom - top) * float(value)
            parts.append(f'<rect x="{x}" y="{bottom - h:.1f}" width="{bar - 1}" height="{h:.1f}" fill="{colour}"/>')
        parts.append(f'<text x="{left + 10 + 160 * s}" y="{height - 6}" fill="{colour}">{label}</text>')
    for i, name in enumerate(names):
        x, y = left + 4 + i * slot + slot // 2, bottom + 10
        parts.append(f'<text x="{x}" y="{y}" text-anchor="end" transform="rotate(-45 {x} {y})">{name}</text>')
    parts.append("</svg>\n")
    with open(path, "w") as file:
        file.write("".join(parts))
