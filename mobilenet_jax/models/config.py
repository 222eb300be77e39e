"""A model's architecture as a JSON-able dict, so checkpoints can record what they hold."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import linen as nn

from mobilenet_jax.models.mobilenet_v1 import MobileNetV1
from mobilenet_jax.models.mobilenet_v2 import MobileNetV2

ARCHITECTURES: dict[str, type[nn.Module]] = {"MobileNetV1": MobileNetV1, "MobileNetV2": MobileNetV2}

# Fields that choose how a model runs, not what it is; they stay out of the record so
# a checkpoint written in float32 on a GPU can be restored in bfloat16 on a TPU.
_RUNTIME_FIELDS = ("parent", "name", "dtype", "param_dtype", "bn_axis_name", "depthwise_impl")


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_to_dict(model: nn.Module) -> dict[str, Any]:
    """``{'architecture': 'MobileNetV2', 'width': 0.5, ...}`` for a MobileNet module."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(f"Only {sorted(ARCHITECTURES)} can be recorded, got {name}.")
    fields = {
        f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init and f.name not in _RUNTIME_FIELDS
    }
    return {"architecture": name, **fields}


def model_from_dict(record: dict[str, Any], **runtime: Any) -> nn.Module:
    """Rebuilds the module recorded by :func:`model_to_dict`; ``runtime`` sets e.g. ``dtype``."""
    record = dict(record)
    name = record.pop("architecture", None)
    if name not in ARCHITECTURES:
        raise ValueError(f"The architecture record names {name!r}; expected one of {sorted(ARCHITECTURES)}.")
    cls = ARCHITECTURES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ValueError(f"The architecture record has fields {unknown} that {name} does not take.")
    return cls(**{k: _to_tuples(v) for k, v in record.items()}, **runtime)
