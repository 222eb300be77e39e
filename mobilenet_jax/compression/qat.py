"""Quantization-aware training: a MobileNet trained through the int8 arithmetic LiteRT will run.

:class:`QuantizationAware` wraps a MobileNet and has its ``init``/``apply``, so the
training steps, checkpoints and evaluation take it in place of the model. Its forward
pass is :func:`mobilenet_jax.compression.quantization.graph`, the network LiteRT runs
(Jacob et al. 2018, https://arxiv.org/abs/1712.05877; Krishnamoorthi 2018,
https://arxiv.org/abs/1806.08342):

* **BatchNorm folded into each convolution as it trains**: the kernel ``w * gamma / sigma``
  (running ``sigma``) is fake-quantized per output channel, as the exported kernel will be.
  While BatchNorm still learns, the convolution's output is divided back by
  ``gamma / sigma`` and normalized with the batch's statistics, which update the running
  ones (torchvision's ``ConvBn`` QAT modules do the same); once frozen, the output is the
  folded convolution plus the folded bias, exactly the exported layer.
* **Activations fake-quantized at every point LiteRT quantizes** (input, normalization,
  each fused convolution output, residual sums, pooling, logits) on ranges that follow
  the batches' min/max as a moving average (decay :data:`RANGE_DECAY`, PyTorch's
  ``MovingAverageMinMaxObserver``; the first batch sets them), until they freeze.
* **A straight-through gradient** through every rounding (1 inside the range, 0 where clipped).

The ranges, a step counter and the running statistics live in the ``batch_stats``
collection (``batch_stats['quantization']``), so they are checkpointed, averaged over
replicas and tracked by the EMA like the BatchNorm statistics. ``export --quantize
int8`` writes them into the ``.tflite`` file (:mod:`mobilenet_jax.deployment.tflite_ranges`),
and evaluation of such a workdir simulates int8. Dropout is not applied in this graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from mobilenet_jax.compression import quantization
from mobilenet_jax.data.preprocessing import IMAGENET, Preprocessing
from mobilenet_jax.models import table

KEY = "quantization"  # batch_stats entry: {'steps': trained steps, 'ranges': {point: [lo, hi]}}
RANGE_DECAY = 0.99


def point_key(point: str) -> str:
    """The ``batch_stats`` key of a quantization point (``'block_3/conv_dw'`` -> ``'block_3-conv_dw'``)."""
    return point.replace("/", "-")


def qat_points(network: table.Network) -> list[str]:
    """The points quantization-aware training quantizes: every point LiteRT quantizes for ``network``."""
    if any(block.se_channels for block in network.blocks):
        raise ValueError(
            "Quantization-aware training does not support squeeze-excitation yet (the exported file's gate ops "
            "are not mapped); train this network without --config.quantization_aware."
        )
    if network.head_fc_norm:
        raise ValueError(
            "Quantization-aware training does not fold a BatchNorm after the pooling yet (MobileNetV4's head); "
            "train this network without --config.quantization_aware."
        )
    return quantization.points(network)


def learned_ranges(variables: Mapping) -> dict[str, tuple[float, float]] | None:
    """``{point: (lo, hi)}`` stored by quantization-aware training in ``variables``, or None for a float model."""
    entry = variables.get("batch_stats", {}).get(KEY)
    if entry is None:
        return None
    # Stored with '-' for '/'; convolution paths and block names never contain '-'.
    return {key.replace("-", "/"): tuple(float(v) for v in value) for key, value in entry["ranges"].items()}


def strip(variables: Mapping) -> dict:
    """``variables`` without the quantization entry (the float model's variables)."""
    stats = {k: v for k, v in variables.get("batch_stats", {}).items() if k != KEY}
    return {**variables, "batch_stats": stats} if "batch_stats" in variables else dict(variables)


@dataclasses.dataclass(frozen=True)
class QuantizationAware:
    """A MobileNet trained and evaluated through simulated int8 (see the module docstring).

    ``freeze_bn_step`` and ``freeze_ranges_step``: trained steps after which BatchNorm
    uses its running statistics and the ranges stop moving.
    """

    model: nn.Module
    freeze_bn_step: int = 0
    freeze_ranges_step: int = 0
    preprocessing: Preprocessing = IMAGENET

    def __post_init__(self):
        qat_points(self.model.network())  # refuses what it cannot quantize, before any compilation

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def network(self) -> table.Network:
        return self.model.network()

    def clone(self, **fields: Any) -> QuantizationAware:
        return dataclasses.replace(self, model=self.model.clone(**fields))

    def with_ranges(self, variables: Mapping) -> dict:
        """``variables`` of the float model with the quantization entry added (zero ranges, zero steps): the first
        training step sets the ranges from its batch."""
        if KEY in variables.get("batch_stats", {}):
            return dict(variables)
        ranges = {point_key(p): jnp.zeros(2, jnp.float32) for p in qat_points(self.network())}
        entry = {"steps": jnp.zeros((), jnp.float32), "ranges": ranges}
        return {**variables, "batch_stats": {**variables.get("batch_stats", {}), KEY: entry}}

    def init(self, rngs, images, train: bool = False) -> dict:
        return self.with_ranges(self.model.init(rngs, images, train=train))

    def apply(self, variables: Mapping, images: jax.Array, train: bool = False, mutable=False, rngs=None):
        """Logits of the simulated int8 network on normalized ``images``; with ``mutable``, also
        ``{'batch_stats': ...}`` updated by a training step (running statistics, ranges, step counter)."""
        del rngs  # no dropout in the simulated graph
        stats = variables["batch_stats"]
        state = stats[KEY]
        updates: dict[str, Any] = {}
        hook = self._observe_and_quantize(state, train, updates)
        convolve = self._fold(variables["params"], stats, state["steps"], train, updates)
        rgb = self.preprocessing.denormalize(images.astype(jnp.float32))
        logits = quantization.graph(
            self.network(), variables["params"], rgb, self.preprocessing, self.model.padding,
            hook, lambda path, kernel: quantization.fake_quant_weights(kernel), convolve=convolve,
        )  # fmt: skip
        if not mutable:
            return logits
        new_stats = {k: v for k, v in stats.items() if k != KEY}
        for path, running in updates.pop("norms", {}).items():
            new_stats = table.replace_at(new_stats, path, running)
        steps = state["steps"] + (1.0 if train else 0.0)
        new_stats[KEY] = {"steps": steps, "ranges": {**state["ranges"], **updates.get("ranges", {})}}
        return logits, {"batch_stats": new_stats}

    def _observe_and_quantize(self, state: Mapping, train: bool, updates: dict):
        steps = state["steps"]

        def hook(point: str, x: jax.Array) -> jax.Array:
            key = point_key(point)
            old = state["ranges"][key]
            if train:
                seen = lax.stop_gradient(jnp.stack([jnp.min(x), jnp.max(x)]))
                moved = jnp.where(steps == 0, seen, RANGE_DECAY * old + (1.0 - RANGE_DECAY) * seen)
                old = jnp.where(steps < self.freeze_ranges_step, moved, old)
                updates.setdefault("ranges", {})[key] = old
            return quantization.fake_quant(x, old[0], old[1])

        return hook

    def _fold(self, params: Mapping, stats: Mapping, steps: jax.Array, train: bool, updates: dict):
        model = self.model
        axis_name = getattr(model, "bn_axis_name", None)

        def convolve(conv: table.Conv, x: jax.Array) -> jax.Array:
            kernel = table.at(params, conv.path)["kernel"]
            norm, running = table.at(params, conv.norm), table.at(stats, conv.norm)
            gamma, beta = norm["scale"], norm["bias"]
            scale = gamma / jnp.sqrt(running["var"] + model.bn_epsilon)
            y = quantization.convolution(conv, quantization.fake_quant_weights(kernel * scale), x, model.padding)
            folded = y + (beta - running["mean"] * scale)
            if not train:
                return folded
            # Before the freeze: the unfolded output, normalized with the batch's statistics.
            unfolded = y / jnp.where(jnp.abs(scale) > 1e-12, scale, 1e-12)
            axes = tuple(range(unfolded.ndim - 1))
            mean, mean_square = jnp.mean(unfolded, axes), jnp.mean(unfolded * unfolded, axes)
            if axis_name is not None:
                mean, mean_square = lax.pmean((mean, mean_square), axis_name)
            var = jnp.maximum(mean_square - mean * mean, 0.0)
            normalized = (unfolded - mean) * (gamma / jnp.sqrt(var + model.bn_epsilon)) + beta
            frozen = steps >= self.freeze_bn_step
            momentum = model.bn_momentum
            updates.setdefault("norms", {})[conv.norm] = {
                name: jnp.where(frozen, running[name], momentum * running[name] + (1 - momentum) * batch)
                for name, batch in (("mean", lax.stop_gradient(mean)), ("var", lax.stop_gradient(var)))
            }
            return jnp.where(frozen, folded, normalized)

        return convolve
