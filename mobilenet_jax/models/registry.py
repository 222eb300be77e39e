"""The model registry: architecture names, models from configs, and the JSON record of an architecture.

A training config describes its model in one place, ``config.model``::

    config.model.architecture = "MobileNetV2"
    config.model.width = 1.0
    config.model.rounding = "torchvision"   # any field the architecture's class takes

:func:`create_model` builds it; :func:`model_to_dict` / :func:`model_from_dict`
write and read the same fields as ``model.json`` beside checkpoints, so a checkpoint
records what it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from mobilenet_jax.models.mobilenet import MobileNet
from mobilenet_jax.models.mobilenet_v1 import MobileNetV1
from mobilenet_jax.models.mobilenet_v2 import MobileNetV2
from mobilenet_jax.models.mobilenet_v3 import MobileNetV3
from mobilenet_jax.models.mobilenet_v4 import MobileNetV4
from mobilenet_jax.models.table import Network

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "MobileNetV1": MobileNetV1,
    "MobileNetV2": MobileNetV2,
    "MobileNetV3": MobileNetV3,
    "MobileNetV4": MobileNetV4,
    "MobileNet": MobileNet,  # any architecture table
}

# Fields that choose how a model runs, not what it is; they stay out of the record so
# a checkpoint written in float32 on a GPU can be restored in bfloat16 on a TPU.
RUNTIME_FIELDS = (
    "parent",
    "name",
    "dtype",
    "param_dtype",
    "bn_axis_name",
    "depthwise_impl",
    "folded",
    "fuse_batchnorm",
)
# Fields that only matter while training: a fine-tuning config sets them, whatever the
# model it starts from was trained with.
TRAINING_FIELDS = ("bn_momentum", "dropout_rate")


def _to_tuples(value: Any) -> Any:
    if isinstance(value, Network):
        return value
    if isinstance(value, Mapping):  # a MobileNet's architecture table, as model.json records it
        return Network.from_dict(value)
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _to_record(value: Any) -> Any:
    return value.to_dict() if isinstance(value, Network) else value


def architecture_fields(architecture: str) -> set[str]:
    """The constructor fields of a registered architecture."""
    return {
        f.name for f in dataclasses.fields(ARCHITECTURES[architecture]) if f.init and f.name not in ("parent", "name")
    }


def create_model(fields: Mapping[str, Any], num_classes: int | None = None, **runtime: Any) -> nn.Module:
    """The model ``fields`` describe (``config.model`` or a ``model.json`` record).

    ``fields['architecture']`` names the class; every other field is passed to it.
    ``num_classes`` (when given) and ``runtime`` (``dtype``, ``bn_axis_name``, ...)
    override the fields. Raises ValueError with one sentence for an unknown
    architecture or a field the architecture does not take.
    """
    fields = dict(fields)
    name = fields.pop("architecture", None)
    if name not in ARCHITECTURES:
        raise ValueError(f"The model architecture must be one of {sorted(ARCHITECTURES)}, got {name!r}.")
    if num_classes is not None:
        fields["num_classes"] = num_classes
    fields.update(runtime)
    unknown = sorted(set(fields) - architecture_fields(name))
    if unknown:
        raise ValueError(f"{name} does not take the field(s) {unknown}; it takes {sorted(architecture_fields(name))}.")
    return ARCHITECTURES[name](**{k: _to_tuples(v) for k, v in fields.items()})


def model_to_dict(model: nn.Module) -> dict[str, Any]:
    """``{'architecture': 'MobileNetV2', 'width': 0.5, ...}`` for a MobileNet module."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(f"Only {sorted(ARCHITECTURES)} can be recorded, got {name}.")
    fields = {
        f.name: _to_record(getattr(model, f.name))
        for f in dataclasses.fields(model)
        if f.init and f.name not in RUNTIME_FIELDS
    }
    return {"architecture": name, **fields}


def model_from_dict(record: Mapping[str, Any], **runtime: Any) -> nn.Module:
    """Rebuilds the module recorded by :func:`model_to_dict`; ``runtime`` sets e.g. ``dtype``."""
    return create_model(record, **runtime)
