"""The int8 recipe of ``export --quantize int8``: calibration images, equalization, bias correction, ranges.

A converted ImageNet model comes without ImageNet, so calibration need not use real data:

* ``calibration='synthetic'`` (ZeroQ, Cai et al. 2020) generates images whose activations
  match the model's own BatchNorm statistics; ``'dataset'`` reads a training split; ``'auto'``
  takes the dataset when a config names one, else synthetic images;
* ``equalize`` (cross-layer equalization, Nagel et al. 2019) rescales each pair of
  consecutive convolutions so that their channels' weight ranges match; it needs
  positively homogeneous activations, so the ReLU6s become ReLUs (the float function
  changes where an activation exceeded 6);
* ``bias_correction`` (Nagel et al. 2019) subtracts from each convolution's bias the mean
  shift its int8 weights cause on the calibration images;
* ``ranges``: ``'minmax'`` keeps the converter's calibration, ``'percentile'`` and ``'mse'``
  write clipped ranges into the file (:mod:`mobilenet_jax.deployment.tflite_ranges`); the
  logits keep their full range, since clipping the largest logit ties classes. Networks with
  squeeze-excitation keep the converter's ranges (their gates' ops are not mapped yet).

:func:`prepare` applies the recipe to a model and returns the folded model, its
variables, the calibration images and the ranges to write. A model trained with
quantization-aware training (:mod:`mobilenet_jax.compression.qat`) is converted as it
was trained: its learned ranges are written, and nothing else changes its weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobilenet_jax import errors
from mobilenet_jax.compression import qat, quantization
from mobilenet_jax.data.preprocessing import Preprocessing
from mobilenet_jax.models import table
from mobilenet_jax.models.fold import fold_batchnorm
from mobilenet_jax.models.mobilenet import MobileNet

CALIBRATIONS = ("auto", "dataset", "synthetic")


class Recipe(NamedTuple):
    """How ``export --quantize int8`` quantizes (see the module docstring)."""

    calibration: str = "auto"
    ranges: str = "percentile"
    bias_correction: bool = True
    equalize: bool = False
    synthetic_images: int = 32
    synthetic_steps: int = 100

    def check(self) -> Recipe:
        if self.calibration not in CALIBRATIONS:
            raise errors.UserError(f"--calibration must be one of {CALIBRATIONS}, got {self.calibration!r}.")
        if self.ranges not in quantization.RANGE_METHODS:
            raise errors.UserError(f"--ranges must be one of {quantization.RANGE_METHODS}, got {self.ranges!r}.")
        if self.synthetic_images < 1 or self.synthetic_steps < 0:
            raise errors.UserError(
                f"--synthetic_images must be positive and --synthetic_steps not negative, got "
                f"{self.synthetic_images} and {self.synthetic_steps}."
            )
        return self


class Prepared(NamedTuple):
    model: nn.Module  # the folded inference form (a table-built MobileNet when equalized)
    variables: dict
    calibration: np.ndarray  # RGB 0..255 images, (N, H, W, 3)
    ranges: dict[str, tuple[float, float]] | None  # to write into the file; None: the converter's


def synthetic_calibration(
    model: nn.Module, variables: dict, preprocessing: Preprocessing, image_size: int, recipe: Recipe
) -> np.ndarray:
    if "batch_stats" not in variables:
        raise errors.UserError(
            "Synthetic calibration images are generated from BatchNorm statistics, and this model has none; "
            "pass --config naming a dataset."
        )
    return quantization.synthetic_images(
        model, variables, preprocessing, recipe.synthetic_images, image_size, recipe.synthetic_steps
    )


def writes_ranges(network: table.Network, recipe: Recipe) -> bool:
    """Whether the file gets the recipe's chosen ranges; squeeze-excitation gates add ops that
    :mod:`~mobilenet_jax.deployment.tflite_ranges` does not map yet, so those networks keep the converter's."""
    return recipe.ranges != "minmax" and not any(block.se_channels for block in network.blocks)


def prepare(
    model: nn.Module, variables: dict, preprocessing: Preprocessing, images: np.ndarray, recipe: Recipe
) -> Prepared:
    """The folded model and variables to convert, after equalization and bias correction on ``images``, and the
    ranges to write (see the module docstring). A model trained with quantization-aware training keeps its
    weights and brings its own ranges: the recipe does not apply."""
    folded, folded_variables = fold_batchnorm(model.clone(dtype=jnp.float32, param_dtype=jnp.float32), variables)
    learned = qat.learned_ranges(variables)
    if learned is not None:
        return Prepared(folded, folded_variables, images, learned)
    network, params = model.network(), jax.tree.map(jnp.asarray, folded_variables["params"])
    if recipe.equalize:
        network, params = quantization.equalize(network, params)
        params = jax.tree.map(jnp.asarray, params)
        folded = MobileNet(network_table=network, num_classes=model.num_classes, padding=model.padding, folded=True)
    batches = [images[i : i + 16] for i in range(0, len(images), 16)]
    if recipe.bias_correction:
        params = quantization.bias_correction(network, params, batches, preprocessing, model.padding)
    ranges = None
    if writes_ranges(network, recipe):
        stats = quantization.observe(network, params, batches, preprocessing, model.padding)
        ranges = {point: quantization.choose_range(stat, recipe.ranges) for point, stat in stats.items()}
        for point in ("normalized", "logits"):  # the input's full range; see the module docstring for logits
            ranges[point] = quantization.choose_range(stats[point], "minmax")
    params = jax.tree.map(np.asarray, params)
    return Prepared(folded, {"params": params}, images, ranges)
