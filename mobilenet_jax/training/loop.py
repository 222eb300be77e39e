"""The training loop: a config and a workdir in, checkpoints, metrics and a final evaluation out.

``train_and_evaluate`` validates the config, restores the newest good checkpoint of
the workdir (or initialises, optionally from ``config.init_from``), then runs the
compiled step of :mod:`mobilenet_jax.training.steps` over the input pipeline, logging,
checkpointing and evaluating at the configured cadences. A non-finite step stops
the run before anything is saved; SIGTERM saves the current step and returns.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from mobilenet_jax.compression import distill, qat
from mobilenet_jax.data import input_pipeline
from mobilenet_jax.data.preprocessing import IMAGENET
from mobilenet_jax.errors import ConfigError, DivergenceError
from mobilenet_jax.models import ARCHITECTURES, registry, reset_classifier
from mobilenet_jax.training import distributed, optim, steps
from mobilenet_jax.training.metrics import MetricWriter, ProgressBar
from mobilenet_jax.weights import checkpoint, pretrained

_NUMBERS = (
    "batch_size image_size learning_rate lr_batch_size num_epochs num_train_steps label_smoothing ema_decay "
    "weight_decay lr_decay_factor lr_decay_epochs warmup_epochs log_every_steps checkpoint_every_steps "
    "keep_checkpoints max_consecutive_nonfinite_skips eval_every_steps seed distill_temperature distill_alpha "
    "qat_freeze_bn_epochs qat_freeze_ranges_epochs"
).split()


def _check_types(config: ml_collections.ConfigDict) -> None:
    for field in _NUMBERS:
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Bad config: {field} must be a number, got {value!r}.")
    area = config.crop_area_range
    if not (isinstance(area, (tuple, list)) and len(area) == 2 and all(isinstance(v, (int, float)) for v in area)):
        raise ConfigError(f"Bad config: crop_area_range must be two numbers (min, max), got {area!r}.")
    if not isinstance(config.quantization_aware, bool):
        raise ConfigError(f"Bad config: quantization_aware must be True or False, got {config.quantization_aware!r}.")
    width = config.model.get("width")
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise ConfigError(f"Bad config: model.width must be a number, got {width!r}.")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError with one sentence for values that cannot work."""
    _check_types(config)
    architecture = config.model.get("architecture")
    checks = [
        (
            architecture in ARCHITECTURES,
            f"model.architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}",
        ),
        (config.batch_size > 0, f"batch_size must be positive, got {config.batch_size}"),
        (config.image_size >= 8, f"image_size must be at least 8 pixels, got {config.image_size}"),
        (config.model.width > 0, f"model.width must be positive, got {config.model.width}"),
        (config.learning_rate > 0, f"learning_rate must be positive, got {config.learning_rate}"),
        (config.lr_batch_size > 0, f"lr_batch_size must be positive, got {config.lr_batch_size}"),
        (config.num_epochs > 0 or config.num_train_steps > 0, "set num_epochs or num_train_steps to a positive value"),
        (0 <= config.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {config.label_smoothing}"),
        (0 <= config.ema_decay < 1, f"ema_decay must be in [0, 1), got {config.ema_decay}"),
        (config.weight_decay >= 0, f"weight_decay must be non-negative, got {config.weight_decay}"),
        (0 < config.lr_decay_factor <= 1, f"lr_decay_factor must be in (0, 1], got {config.lr_decay_factor}"),
        (config.lr_decay_epochs > 0, f"lr_decay_epochs must be positive, got {config.lr_decay_epochs}"),
        (config.warmup_epochs >= 0, f"warmup_epochs must be non-negative, got {config.warmup_epochs}"),
        (
            0 < config.crop_area_range[0] <= config.crop_area_range[1] <= 1,
            f"crop_area_range must satisfy 0 < min <= max <= 1, got {tuple(config.crop_area_range)}",
        ),
        (config.log_every_steps > 0, f"log_every_steps must be positive, got {config.log_every_steps}"),
        (
            config.checkpoint_every_steps > 0,
            f"checkpoint_every_steps must be positive, got {config.checkpoint_every_steps}",
        ),
        (config.keep_checkpoints > 0, f"keep_checkpoints must be positive, got {config.keep_checkpoints}"),
        (
            config.distill_temperature > 0,
            f"distill_temperature must be positive, got {config.distill_temperature}",
        ),
        (0 <= config.distill_alpha <= 1, f"distill_alpha must be in [0, 1], got {config.distill_alpha}"),
        (
            config.qat_freeze_bn_epochs >= 0 and config.qat_freeze_ranges_epochs >= 0,
            "qat_freeze_bn_epochs and qat_freeze_ranges_epochs must be non-negative, got "
            f"{config.qat_freeze_bn_epochs} and {config.qat_freeze_ranges_epochs}",
        ),
        (
            config.max_consecutive_nonfinite_skips >= 0,
            f"max_consecutive_nonfinite_skips must be non-negative, got {config.max_consecutive_nonfinite_skips}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"Bad config: {message}.")


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


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Run:
    """Everything a training run derives from its config before the first step."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    info: input_pipeline.DatasetInfo
    model: nn.Module
    tx: optax.GradientTransformation
    learning_rate_fn: optax.Schedule
    steps_per_epoch: int
    num_steps: int
    teacher: tuple[distill.Teacher, dict] | None = None
    quantization: qat.QuantizationAware | None = None  # config.quantization_aware: the model through int8

    @property
    def trained(self) -> nn.Module | qat.QuantizationAware:
        """What the steps train and evaluate: the model, or its quantization-aware form."""
        return self.model if self.quantization is None else self.quantization

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, workdir: str) -> Run:
        validate_config(config)
        workdir = os.path.abspath(workdir)
        check_workdir(workdir)
        mesh = distributed.make_mesh()
        distributed.check_batch_size(config.batch_size, mesh)
        info = input_pipeline.get_dataset(config.dataset, config.data_dir, config.manual_dir)
        input_pipeline.check_split(info, config.train_split)
        input_pipeline.check_split(info, config.eval_split)
        steps_per_epoch = max(1, input_pipeline.num_examples(info, config.train_split) // config.batch_size)
        num_steps = config.num_train_steps
        if num_steps <= 0:
            num_steps = int(math.ceil(config.num_epochs * steps_per_epoch))
        learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch)
        model = steps.create_model(config, info.num_classes, **init_from_fields(config))
        tx = optim.create_optimizer(config, learning_rate_fn)
        teacher = distill.load_teacher(config, info.num_classes)
        quantization = None
        if config.quantization_aware:
            try:
                quantization = qat.QuantizationAware(
                    model,
                    freeze_bn_step=round(config.qat_freeze_bn_epochs * steps_per_epoch),
                    freeze_ranges_step=round(config.qat_freeze_ranges_epochs * steps_per_epoch),
                )
            except ValueError as error:
                raise ConfigError(f"Bad config: {error}") from None
        return cls(
            config, workdir, mesh, info, model, tx, learning_rate_fn, steps_per_epoch, num_steps, teacher, quantization
        )

    @property
    def eval_every(self) -> int:
        return self.config.eval_every_steps if self.config.eval_every_steps > 0 else self.steps_per_epoch


def init_from_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The architecture fields of ``config.init_from``'s model.json, which replace ``config.model``'s.

    So a pruned or converted model fine-tunes with the stock config: its width, profile
    or pruned channel counts come with it. The training fields (``bn_momentum``,
    ``dropout_rate``) and the number of classes stay the config's.
    """
    if not config.init_from:
        return {}
    source = checkpoint.read_model_record(os.path.abspath(pretrained.local_source(config.init_from)))
    if type(source).__name__ != config.model.architecture:
        raise ConfigError(
            f"Bad config: init_from={config.init_from!r} holds a {type(source).__name__} and "
            f"model.architecture is {config.model.architecture!r}; use the config of that architecture."
        )
    record = registry.model_to_dict(source)
    fields = {k: v for k, v in record.items() if k not in ("architecture", "num_classes", *registry.TRAINING_FIELDS)}
    changed = sorted(k for k, v in fields.items() if config.model.get(k) != v)
    if changed:
        logging.info("init_from: model fields %s from %s/model.json.", changed, config.init_from)
    return fields


def initial_variables(config: ml_collections.ConfigDict, model: nn.Module, image_size: int, rng) -> dict | None:
    """Variables from ``config.init_from`` (a model directory, workdir or published model's name), with a new
    classifier if needed."""
    if not config.init_from:
        return None
    directory = pretrained.local_source(config.init_from)  # a published model's name: its converted copy
    source_model, source = checkpoint.load_any(directory)
    source = qat.strip(source)  # a quantization-aware workdir's ranges: restart them (or train float)
    inputs = checkpoint.read_preprocessing(directory)
    if inputs is not None and not inputs.same_normalization(IMAGENET):
        logging.warning(
            "init_from=%s expects other inputs (its preprocessing.json, e.g. Keras's [-1, 1]) than the ImageNet "
            "normalisation training feeds; fine-tuning starts from differently scaled inputs.",
            config.init_from,
        )
    if source_model.num_classes != model.num_classes:
        logging.info("init_from: %s classes -> %s, new classifier.", source_model.num_classes, model.num_classes)
        _, source = reset_classifier(source_model, source, model.num_classes, rng)
    expected = jax.eval_shape(lambda: optim.init_variables(model, rng, image_size))
    if jax.tree.map(lambda a: a.shape, source) != jax.tree.map(lambda a: a.shape, dict(expected)):
        raise ConfigError(
            f"Bad config: init_from={config.init_from!r} holds a different architecture than the config "
            "(compare its model.json with config.model)."
        )
    return source


def restore_or_init(run: Run, manager: checkpoint.TrainCheckpoints) -> optim.TrainState:
    """The newest good checkpoint of the workdir, or a fresh state (written to ``model.json`` too)."""
    config, rng = run.config, jax.random.PRNGKey(run.config.seed)
    abstract = optim.abstract_train_state(run.trained, run.tx, config.image_size)
    state = manager.restore_latest(abstract, distributed.replicated(run.mesh))
    if state is not None:
        return state
    variables = initial_variables(config, run.model, config.image_size, rng)
    if variables is not None and run.quantization is not None:
        variables = run.quantization.with_ranges(variables)
    state = optim.create_train_state(rng, run.trained, run.tx, config.image_size, variables)
    if jax.process_index() == 0:
        checkpoint.write_model_record(run.workdir, run.model)
    # Through host memory: every process holds the same values (same seed), and each
    # places its own replicas.
    return jax.device_put(jax.device_get(state), distributed.replicated(run.mesh))


def check_finite(pending: list[dict], first_step: int) -> None:
    """Raises DivergenceError naming the first non-finite step of ``pending`` (numbered from ``first_step``)."""
    flags = distributed.to_host([m["finite"] for m in pending])
    for offset, finite in enumerate(flags):
        if not finite:
            loss = float(distributed.to_host(pending[offset]["loss"]))
            what = f"loss became {loss}" if not math.isfinite(loss) else "state became non-finite"
            raise DivergenceError(
                f"Training {what} at step {first_step + offset}; lower the learning rate "
                f"(nothing from that step on was saved)."
            )


def _summarize(pending: list[dict], batch_size: int, elapsed: float) -> dict:
    logged = distributed.to_host(pending)
    summary = {k: float(np.mean([m[k] for m in logged])) for k in logged[0] if k != "finite"}
    summary["images_per_sec"] = len(logged) * batch_size / max(elapsed, 1e-9)
    summary["skipped"] = float(np.sum([m["skipped"] for m in logged]))
    return summary


def _evaluate(run: Run, eval_fn, eval_data, state: optim.TrainState) -> dict:
    dataset, total = eval_data
    live = {"params": state.params, "batch_stats": state.batch_stats}
    results = {"validation": steps.evaluate(eval_fn, live, dataset, run.mesh, total)}
    if run.config.ema_decay > 0:
        ema = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
        results["validation_ema"] = steps.evaluate(eval_fn, ema, dataset, run.mesh, total)
    return results


def train_loop(run: Run, state, manager, writer: MetricWriter) -> tuple[Any, dict]:
    """Steps from the state's step to ``run.num_steps``; returns the state and the last evaluation."""
    config, mesh = run.config, run.mesh
    start_step = int(distributed.to_host(state.step))
    train_fn = steps.make_train_step(config, run.trained, mesh, run.tx, run.learning_rate_fn, run.teacher)
    eval_fn = steps.make_eval_step(mesh, run.trained)
    train_iter = iter(_train_dataset(run, start_step))
    eval_data = input_pipeline.eval_dataset(config, run.info)
    progress = ProgressBar(run.num_steps, start_step, enabled=jax.process_index() == 0 and config.progress_bar)
    pending, window_start, results = [], time.perf_counter(), {}
    try:
        with _Preemption() as preemption:
            for step in range(start_step + 1, run.num_steps + 1):
                batch = distributed.global_batch(input_pipeline.as_numpy(next(train_iter)), mesh)
                state, metrics = train_fn(state, batch)
                pending.append(metrics)
                last = step == run.num_steps
                log_now = step % config.log_every_steps == 0 or last
                save_now = step % config.checkpoint_every_steps == 0 or last or preemption.requested
                if log_now or save_now:
                    check_finite(pending, step - len(pending) + 1)
                if log_now:
                    summary = _summarize(pending, config.batch_size, time.perf_counter() - window_start)
                    writer.write(step, "train", summary)
                    progress.update(step, summary)
                    pending, window_start = [], time.perf_counter()
                if save_now:
                    manager.save(step, state, force=preemption.requested)
                if preemption.requested:
                    manager.wait()
                    logging.warning(
                        "SIGTERM: saved step %d to %s; rerun the same command to resume.", step, run.workdir
                    )
                    return state, {"preempted_at_step": step}
                if step % run.eval_every == 0 or last:
                    results = _evaluate(run, eval_fn, eval_data, state)
                    for split, values in results.items():
                        writer.write(step, split, values)
                    if not last:
                        progress.write(steps.format_results(results, f"Step {step}"))
    finally:
        progress.close()  # before any error message, so that it starts a line of its own
    if not results:  # resumed at the last step: nothing ran, evaluate what was restored
        results = _evaluate(run, eval_fn, eval_data, state)
    return state, results


def _train_dataset(run: Run, start_step: int):
    config = run.config
    return input_pipeline.create_train_dataset(
        run.info,
        config.train_split,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=start_step,
        area_range=tuple(config.crop_area_range),
        shuffle_buffer_size=config.shuffle_buffer_size,
        cache=config.cache,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def describe(model: nn.Module) -> str:
    """``'MobileNetV1 (width 0.5)'``; a pruned model says so instead of its long channel list."""
    record = registry.model_to_dict(model)
    profile = record.get("profile", "normal")
    if record.get("block_channels") or not isinstance(profile, str):
        return f"{record['architecture']} (pruned channel list)"
    return f"{record['architecture']} (width {record['width']}{', profile ' + profile if profile != 'normal' else ''})"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> tuple[optim.TrainState, dict]:
    """Trains, checkpoints and evaluates as ``config`` says; returns the state and the final evaluation.

    A workdir that holds checkpoints resumes from the newest good one; after SIGTERM the
    current step is saved and the results are ``{'preempted_at_step': step}``.
    """
    run = Run.from_config(config, workdir)
    manager = checkpoint.TrainCheckpoints(
        run.workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints
    )
    writer = MetricWriter(run.workdir, enabled=jax.process_index() == 0)
    if jax.process_index() == 0:  # export, prune and evaluate read the dataset and image size from it
        checkpoint.write_config(run.workdir, config)
    try:
        state = restore_or_init(run, manager)
        if jax.process_index() == 0:
            print(
                f"Training {describe(run.model)} on {config.dataset} at {config.image_size} px"
                f"{', distilling from ' + config.teacher if run.teacher else ''}"
                f"{', quantization-aware (simulated int8)' if run.quantization else ''}, {jax.device_count()} devices, "
                f"steps {int(distributed.to_host(state.step))} -> {run.num_steps}, workdir {run.workdir}",
                flush=True,
            )
        state, results = train_loop(run, state, manager, writer)
    finally:
        # Finish in-flight saves (the newest finite state) and stop orbax's threads before exiting.
        manager.wait()
        manager.close()
        writer.close()
    if jax.process_index() == 0 and "preempted_at_step" not in results:
        print(steps.format_results(results, "Final evaluation"), flush=True)
    return state, results
