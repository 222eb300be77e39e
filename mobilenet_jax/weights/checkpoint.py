"""Checkpoints: model directories (variables + ``model.json``) and the train states of a run.

A model directory holds ``variables/`` (an orbax checkpoint of ``{'params',
'batch_stats'}``), ``model.json`` (``model_to_dict``) and, for weights that expect
other inputs than the ImageNet normalisation, ``preprocessing.json``. The converter writes one;
training, evaluation and export start from one. A training workdir holds
``model.json``, ``config.json`` (the resolved training config, as Flax's and big_vision's
trainers keep it) and ``checkpoints/<step>/`` (whole train states).

Restores are defensive: a checkpoint that fails to restore, or restores with a
non-finite array, is reported in one line and skipped for the next older one;
training moves it aside to ``corrupt_checkpoints/`` (renamed, never deleted).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import linen as nn

from mobilenet_jax.data.preprocessing import Preprocessing, PreprocessingError
from mobilenet_jax.data.preprocessing import read as read_inputs
from mobilenet_jax.errors import CheckpointError, sentence
from mobilenet_jax.models.registry import model_from_dict, model_to_dict

MODEL_JSON = "model.json"
CONFIG_JSON = "config.json"
VARIABLES_DIR = "variables"
CHECKPOINTS_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


def save_model(
    directory: str | os.PathLike, model: nn.Module, variables: dict, preprocessing: Preprocessing | None = None
) -> None:
    """Writes ``variables`` and ``model``'s architecture to a new directory.

    ``preprocessing`` records the inputs the weights were trained and published with
    (e.g. Keras applications' [-1, 1], timm's bicubic resize); see :func:`read_preprocessing`.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
        raise FileExistsError(f"{directory} already holds a model; choose an empty directory.")
    os.makedirs(directory, exist_ok=True)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables)
        checkpointer.wait_until_finished()
    write_model_record(directory, model)
    if preprocessing is not None:
        preprocessing.write(directory)


def read_preprocessing(directory: str | os.PathLike) -> Preprocessing | None:
    """The inputs a model directory's weights expect (its ``preprocessing.json``), or None when nothing was recorded."""
    try:
        return read_inputs(directory)
    except PreprocessingError as error:
        raise CheckpointError(str(error)) from None


def _read_json(path: str, what: str) -> Any | None:
    """The JSON value in ``path``, None when there is no such file; one sentence when it is not JSON."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not {what} ({sentence(error)}).") from None


def write_model_record(directory: str, model: nn.Module) -> None:
    """``directory/model.json``: lets evaluation, export and fine-tuning rebuild the architecture."""
    with open(os.path.join(directory, MODEL_JSON), "w") as f:
        json.dump(model_to_dict(model), f, indent=2)


def write_config(directory: str, config: Any) -> None:
    """``directory/config.json``: the config a workdir was trained with, for the commands that read it."""
    path = os.path.join(directory, CONFIG_JSON)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)  # a run killed mid-write leaves the previous record


def read_config(directory: str | os.PathLike) -> Any | None:
    """The training config recorded in a workdir's ``config.json`` (a ConfigDict), or None without one."""
    import ml_collections

    path = os.path.join(os.fspath(directory), CONFIG_JSON)
    record = _read_json(path, "a config record")
    if record is None:
        return None
    if not isinstance(record, dict) or "dataset" not in record or "image_size" not in record:
        raise CheckpointError(f"{path} is not a training config (no dataset or image_size); pass --config instead.")
    return ml_collections.ConfigDict(record)


def config_for(source: str | os.PathLike, config: Any | None, purpose: str) -> Any:
    """``config`` when given, else the one ``source`` (a workdir) was trained with; one sentence without either."""
    if config is not None:
        return config
    recorded = read_config(source)
    if recorded is None:
        raise CheckpointError(
            f"{source} records no training config ({CONFIG_JSON}); {purpose} needs --config naming the dataset."
        )
    return recorded


def read_model_record(directory: str, **runtime: Any) -> nn.Module:
    path = os.path.join(directory, MODEL_JSON)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory} has no {MODEL_JSON}; name a model directory (python -m mobilenet_jax.convert) "
            "or a training workdir."
        )
    try:
        with open(path) as f:
            return model_from_dict(json.load(f), **runtime)
    except (json.JSONDecodeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} is not a model record ({sentence(error)}).") from None


def load_model(directory: str | os.PathLike, **runtime: Any) -> tuple[nn.Module, dict]:
    """Reads a directory written by :func:`save_model`; ``runtime`` sets e.g. ``dtype``."""
    directory = os.path.abspath(os.fspath(directory))
    model = read_model_record(directory, **runtime)
    path = os.path.join(directory, VARIABLES_DIR)
    # Each process reads the whole model onto its own first device, coordinating with no other
    # process: in a multi-process run every process loads a teacher or init_from this way.
    index = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
            metadata = checkpointer.metadata(path)
            tree = getattr(metadata, "item_metadata", metadata)
            in_channels = int(tree["params"]["stem_conv"]["kernel"].shape[2])
            images = jax.ShapeDtypeStruct((1, 32, 32, in_channels), np.float32)
            abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
            target = {"params": abstract["params"], "batch_stats": abstract["batch_stats"]}
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), target)
            variables = checkpointer.restore(path, target)
    except Exception as error:  # orbax raises many kinds for missing, truncated or foreign files
        raise CheckpointError(f"Cannot read the model in {path} ({_short(error)}).") from None
    problem = nonfinite_problem(variables)
    if problem:
        raise CheckpointError(f"The model in {path} is unusable: {problem}.")
    return model, variables


def load_any(source: str | os.PathLike, weights: str = "ema", step: int | None = None, **runtime: Any):
    """``(model, variables)`` from a model directory or a training workdir (its newest good checkpoint).

    ``weights`` picks a training checkpoint's ``'ema'`` or ``'live'`` weights; ``step``
    a particular checkpoint.
    """
    source = os.path.abspath(os.fspath(source))
    if not os.path.isdir(source):
        raise CheckpointError(f"{source} is not a directory; name a model directory or a training workdir.")
    if os.path.isdir(os.path.join(source, VARIABLES_DIR)):
        return load_model(source, **runtime)
    if weights not in ("ema", "live"):
        raise ValueError(f"weights must be 'ema' or 'live', got {weights!r}.")
    model = read_model_record(source, **runtime)
    manager = TrainCheckpoints(source, read_only=True)
    try:
        state = manager.restore_weights(step)
    finally:
        manager.close()
    if weights == "ema":
        return model, {"params": state["ema_params"], "batch_stats": state["ema_batch_stats"]}
    return model, {"params": state["params"], "batch_stats": state["batch_stats"]}


def _short(error: BaseException, limit: int = 300) -> str:
    text = f"{type(error).__name__}: {sentence(error)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@jax.jit
def _finite_leaves(tree: Any) -> list:
    return [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]


def nonfinite_problem(tree: Any) -> str | None:
    """None when every floating-point array of ``tree`` is finite, else which ones are not."""
    floats = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)
    }
    flags = _finite_leaves(list(floats.values()))
    bad = [name for name, ok in zip(floats, flags, strict=True) if not bool(ok)]
    if not bad:
        return None
    return f"{len(bad)} non-finite array(s), e.g. {bad[0]}"


class TrainCheckpoints:
    """Periodic (asynchronous) saves of the whole train state, keeping the last ``keep``.

    orbax writes each step to a temporary directory and renames it when complete, so
    a run killed at any moment restarts from the last complete step. ``read_only``
    opens an existing directory without creating or cleaning anything (evaluation).
    """

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.workdir = workdir
        self.directory = os.path.join(workdir, CHECKPOINTS_DIR)
        self.read_only = read_only
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"No checkpoint in {self.directory}; train first, or name a model directory.")
        self._manager = None
        if not read_only:  # reading needs no manager (and orbax's read-only mode logs warnings)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """The finished steps on disk, oldest first (orbax's temporary directories are not steps)."""
        if self._manager is not None:
            return sorted(self._manager.all_steps())
        return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore_latest(self, abstract_state: Any, sharding: Any) -> Any | None:
        """The newest checkpoint that restores with the expected shapes and dtypes and is finite.

        Returns None when there is no checkpoint; raises CheckpointError when there are
        some and none is usable. Unusable ones are logged (and moved aside unless read-only).
        """
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_state)
        return self._newest_good(lambda step: self._restore(step, target))

    def restore_weights(self, step: int | None = None) -> dict:
        """The arrays of one checkpoint (the newest good one by default) as a dict, without an optimizer."""
        if step is None:
            state = self._newest_good(self._restore)
            if state is None:
                raise CheckpointError(f"No checkpoint in {self.directory}; train first, or name a model directory.")
            return state
        if step not in self.all_steps():
            steps = self.all_steps()
            raise CheckpointError(f"{self.directory} has no step {step}; it has {steps or 'none'}.")
        return self._checked(step, self._restore)

    def _restore(self, step: int, target: Any = None) -> Any:
        # Each step on its own, by path: a broken step directory cannot change how the
        # manager reads the next one (orbax infers the item layout from what it finds).
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(os.path.join(self.directory, str(step), "default"), target)

    def _checked(self, step: int, restore) -> Any:
        try:
            state = restore(step)
        except Exception as error:  # truncated, missing or foreign files: orbax raises many kinds
            raise CheckpointError(f"checkpoint {step} does not restore ({_short(error)})") from None
        problem = nonfinite_problem(state)
        if problem:
            raise CheckpointError(f"checkpoint {step} holds {problem}")
        return state

    def _newest_good(self, restore) -> Any | None:
        steps = self.all_steps()[::-1]
        for step in steps:
            try:
                return self._checked(step, restore)
            except CheckpointError as error:
                moved = "" if self.read_only else f"; moved to {self._move_aside(step)}"
                logging.warning("Skipping %s%s.", error, moved)
        if steps:
            raise CheckpointError(
                f"None of the {len(steps)} checkpoint(s) in {self.directory} is usable (see the lines above); "
                f"start a new workdir or restore a copy."
            )
        return None

    def _move_aside(self, step: int) -> str:
        destination = os.path.join(self.workdir, CORRUPT_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        while os.path.exists(destination):
            destination += "+"
        if jax.process_index() == 0:  # one process renames; all forget the step
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), destination)
        self._manager.reload()
        return destination

    def save(self, step: int, state: Any, force: bool = False) -> None:
        if step in self.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
