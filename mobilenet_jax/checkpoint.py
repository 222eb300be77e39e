"""Model checkpoints: orbax-saved variables beside a JSON record of the architecture.

A model directory holds ``variables/`` (an orbax checkpoint of ``{'params',
'batch_stats'}``) and ``model.json`` (``model_to_dict``). The converter writes one;
training and evaluation can start from one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from mobilenet_jax.models.config import model_from_dict, model_to_dict

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


def save_model(directory: str | os.PathLike, model: nn.Module, variables: dict) -> None:
    """Writes ``variables`` and ``model``'s architecture to a new directory."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
        raise FileExistsError(f"{directory} already holds a model; choose an empty directory.")
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_DIR), dict(variables))
        checkpointer.wait_until_finished()
    with open(os.path.join(directory, MODEL_JSON), "w") as f:
        json.dump(model_to_dict(model), f, indent=2)


def load_model(directory: str | os.PathLike, **runtime: Any) -> tuple[nn.Module, dict]:
    """Reads a directory written by :func:`save_model`; ``runtime`` sets e.g. ``dtype``."""
    directory = os.path.abspath(os.fspath(directory))
    record_path = os.path.join(directory, MODEL_JSON)
    if not os.path.isfile(record_path):
        raise FileNotFoundError(f"{directory} has no {MODEL_JSON}; is it a directory written by the converter?")
    with open(record_path) as f:
        model = model_from_dict(json.load(f), **runtime)
    in_channels = _stem_in_channels(directory)
    images = jax.ShapeDtypeStruct((1, 32, 32, in_channels), np.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR), dict(abstract))
    return model, variables


def _stem_in_channels(directory: str) -> int:
    metadata = ocp.StandardCheckpointer().metadata(os.path.join(directory, VARIABLES_DIR))
    tree = getattr(metadata, "item_metadata", metadata)
    kernel = tree["params"]["stem_conv"]["kernel"]
    return int(kernel.shape[2])
