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


# ----------------------------------------------------------------------------- training runs


def check_workdir(workdir: str) -> None:
    """Creates ``workdir`` or raises one sentence saying why it cannot be used."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise PermissionError(
            f"Cannot create workdir {workdir} ({error.strerror}); choose a writable directory."
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise PermissionError(f"Workdir {workdir} is not writable; choose a writable directory.")


def write_model_record(workdir: str, model: nn.Module) -> None:
    """``workdir/model.json``: lets the evaluation CLI rebuild the trained architecture."""
    with open(os.path.join(workdir, MODEL_JSON), "w") as f:
        json.dump(model_to_dict(model), f, indent=2)


class TrainCheckpoints:
    """Periodic (asynchronous) saves of the whole train state, keeping the last ``keep``.

    orbax writes each step to a temporary directory and renames it when complete, so
    a run killed at any moment restarts from the last complete step.
    """

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, abstract_state: Any, sharding: Any) -> Any | None:
        step = self._manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_state)
        return self._manager.restore(step, args=ocp.args.StandardRestore(target))

    def save(self, step: int, state: Any, force: bool = False) -> None:
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
