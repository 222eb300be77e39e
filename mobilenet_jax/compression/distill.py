"""Knowledge distillation: the teacher a student learns from, and the loss.

``--config.teacher=DIR`` (a model directory or workdir with the dataset's classes)
makes the train step of :mod:`mobilenet_jax.training.steps` a distillation step:
:func:`load_teacher` reads the teacher from disk, and :func:`distillation_loss` is
Hinton et al.'s soft-target loss mixed with the cross-entropy on the labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from mobilenet_jax.data.preprocessing import IMAGENET
from mobilenet_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A distillation teacher: its module (inference mode), temperature and the soft loss's weight."""

    model: nn.Module
    temperature: float
    alpha: float
    # Per-channel affine from the pipeline's normalised images to the teacher's inputs, for a
    # teacher that expects others (its preprocessing.json, e.g. Keras's [-1, 1]); None: the same.
    input_affine: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def inputs(self, images: jax.Array) -> jax.Array:
        if self.input_affine is None:
            return images
        scale, shift = (jnp.asarray(v, images.dtype) for v in self.input_affine)
        return images * scale + shift


def load_teacher(config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> tuple[Teacher, dict] | None:
    """``(Teacher, variables)`` from ``config.teacher`` (a model directory, workdir or published model's name),
    or None without one."""
    if not config.get("teacher"):
        return None
    from mobilenet_jax.weights import checkpoint, pretrained  # orbax: only when a teacher is named

    runtime = {"dtype": jnp.bfloat16 if config.half_precision else jnp.float32, "bn_axis_name": None, **overrides}
    directory = pretrained.local_source(config.teacher)  # a published model's name: its converted copy
    model, variables = checkpoint.load_any(directory, **runtime)
    inputs = checkpoint.read_preprocessing(directory)
    affine = None if inputs is None else inputs.affine_from(IMAGENET)
    if affine is not None:  # plain floats, as the frozen Teacher holds them
        affine = tuple(tuple(part.tolist()) for part in affine)
    if model.num_classes != num_classes:
        raise ConfigError(
            f"Bad config: teacher={config.teacher!r} has {model.num_classes} classes and the dataset {num_classes}; "
            "distillation compares the two models' class probabilities, so they must agree."
        )
    return Teacher(model, float(config.distill_temperature), float(config.distill_alpha), affine), variables


def distillation_loss(
    logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array, temperature: float, alpha: float
) -> jax.Array:
    """Per example: ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(targets)``.

    The ``T^2`` keeps the soft term's gradients on the scale of the hard term's
    (Hinton et al., 2015, Section 2).
    """
    teacher_log_probs = jax.nn.log_softmax(teacher_logits / temperature)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - jax.nn.log_softmax(logits / temperature)), -1)
    return alpha * temperature**2 * kl + (1.0 - alpha) * optax.softmax_cross_entropy(logits, targets)
