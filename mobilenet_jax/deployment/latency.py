"""LiteRT latency on this machine as a function of a MobileNet's channel widths: timed, fitted, cached.

AMC's latency budget ("50% of the time") needs the latency of every network the search
tries, and converting each would take seconds. :func:`fit` instead times whole networks
with random channel widths (random-init weights: latency does not depend on the
values) in the LiteRT interpreter (XNNPACK, ``threads``), batch 1, and fits

    latency = c + a_full * MACs_full + a_pointwise * MACs_pointwise + a_depthwise * MACs_depthwise
                + a_classifier * MACs_classifier + b * activations written

with non-negative coefficients (``scipy.optimize.nnls``), so a narrower network is
never predicted slower. The counts come from the architecture table
(:class:`mobilenet_jax.compression.amc.MacCounter`). A fit is cached under
``$MOBILENET_JAX_CACHE`` (default ``~/.cache/mobilenet_jax``)``/latency/`` by
architecture, image size, kind, threads, CPU and LiteRT version: measured once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobilenet_jax import errors
from mobilenet_jax.compression import amc, prune
from mobilenet_jax.deployment import export

KINDS = ("int8", "float32")


@dataclasses.dataclass
class LatencyModel:
    """Predicted batch-1 latency in milliseconds of ``model`` at the widths given (one per channel group)."""

    counter: amc.MacCounter
    coefficients: np.ndarray  # the constant, then one per MacCounter.KINDS
    samples: list[dict]  # {"widths", "measured_ms"} the fit was made on

    def __call__(self, widths: Sequence[float]) -> float:
        return float(self.coefficients[0] + self.coefficients[1:] @ self.counter.features(widths))

    def relative_errors(self) -> list[float]:
        return [abs(self(s["widths"]) - s["measured_ms"]) / s["measured_ms"] for s in self.samples]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def litert_version() -> str:
    """The installed LiteRT's version, or one sentence saying how to install it."""
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        raise errors.UserError("A latency budget needs the LiteRT interpreter: pip install -e '.[export]'.") from None


def measure(model: nn.Module, image_size: int, kind: str = "int8", threads: int = 1, rounds: int = 200) -> float:
    """Median batch-1 latency in milliseconds of ``model`` (random weights) as a LiteRT ``kind`` file."""
    if kind not in KINDS:
        raise errors.UserError(f"The latency kind must be one of {KINDS}, got {kind!r}.")
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False
    )
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 255, (1, image_size, image_size, 3)).astype(np.float32) for _ in range(8)]
    quantize = "int8" if kind == "int8" else "none"
    data = export.to_tflite(model, variables, image_size, quantize=quantize, calibration=images)
    runner = export.TFLiteModel(data, num_threads=threads)
    interpreter = runner.interpreter
    interpreter.set_tensor(runner.input["index"], images[0].astype(runner.input["dtype"]))
    for _ in range(20):
        interpreter.invoke()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _sample_widths(model: nn.Module, count: int, lower: float, seed: int) -> list[list[int]]:
    """The full widths, three uniform ratios, then random ratios per searched group (multiples of 8)."""
    full = list(prune.group_widths(model))
    searched = [i for i, s in enumerate(prune.macs_groups(model)) if s]
    rng = np.random.default_rng(seed)
    plans = [np.ones(len(searched)) * keep for keep in (1.0, 0.75, 0.5, lower)]
    plans += [rng.uniform(lower, 1.0, len(searched)) for _ in range(max(0, count - len(plans)))]
    samples = []
    for plan in plans:
        widths = list(full)
        for i, keep in zip(searched, plan, strict=True):
            widths[i] = prune.round_channels(full[i], keep)
        samples.append(widths)
    return samples


def _cache_path(model: nn.Module, image_size: int, kind: str, threads: int, count: int) -> str:
    key = json.dumps(
        [model.network().to_dict(), model.num_classes, image_size, kind, threads, count, _cpu(), litert_version()],
        sort_keys=True,
    )
    root = os.environ.get("MOBILENET_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mobilenet_jax")
    return os.path.join(root, "latency", hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


def fit(
    model: nn.Module, image_size: int, kind: str = "int8", threads: int = 1, count: int = 16, lower: float = 0.2
) -> LatencyModel:
    """The latency model of ``model``: ``count`` networks timed (or read from the cache) and fitted."""
    from scipy.optimize import nnls

    counter = amc.MacCounter(model, image_size)
    path = _cache_path(model, image_size, kind, threads, count)
    if os.path.exists(path):
        with open(path) as file:
            samples = json.load(file)["samples"]
    else:
        samples = []
        for widths in _sample_widths(model, count, lower, seed=0):
            ms = measure(prune.resize(model, widths), image_size, kind, threads)
            samples.append({"widths": widths, "measured_ms": ms})
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as file:
            json.dump({"kind": kind, "threads": threads, "image_size": image_size, "samples": samples}, file)
        os.replace(path + ".tmp", path)
    features = np.array([counter.features(s["widths"]) for s in samples])
    scale = np.maximum(features.max(axis=0), 1.0)  # nnls on columns of similar size
    design = np.concatenate([np.ones((len(samples), 1)), features / scale], axis=1)
    solution, _ = nnls(design, np.array([s["measured_ms"] for s in samples]))
    coefficients = np.concatenate([solution[:1], solution[1:] / scale])
    return LatencyModel(counter, coefficients, samples)
