"""How a model's inputs are made: one value type, read and written as ``preprocessing.json``.

:class:`Preprocessing` holds the per-channel normalisation ``x = (rgb - mean_rgb) /
stddev_rgb`` on RGB values in 0..255, and how evaluation images are cut: the crop
(``'center_crop'``: TF-slim's central ``crop_fraction`` of the shorter side;
``'torchvision'``: resize the shorter side to ``image_size / crop_fraction``, then the
central crop) and the resize interpolation. :data:`IMAGENET` is what the training
pipeline feeds; converted published weights record theirs (Keras ``x / 127.5 - 1``,
timm's bicubic resize). The input pipeline, the distillation teacher, evaluation,
export, pruning's refit and the converters all use this one type, and this module
does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mobilenet_jax.errors import UserError

FILENAME = "preprocessing.json"
EVAL_CROPS = ("center_crop", "torchvision")
INTERPOLATIONS = ("bilinear", "bicubic")


class PreprocessingError(UserError):
    """A preprocessing record that cannot be used; the message is one sentence."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    mean_rgb: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    stddev_rgb: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    eval_crop: str | None = None  # None: the evaluation config's own choice
    interpolation: str = "bilinear"
    crop_fraction: float = 0.875

    def __post_init__(self):
        mean, std = tuple(map(float, self.mean_rgb)), tuple(map(float, self.stddev_rgb))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise PreprocessingError("Preprocessing needs three means and three positive standard deviations.")
        if self.eval_crop not in (None, *EVAL_CROPS):
            raise PreprocessingError(f"eval_crop must be one of {EVAL_CROPS} or None, got {self.eval_crop!r}.")
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessingError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}.")
        if not 0 < self.crop_fraction <= 1:
            raise PreprocessingError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}.")
        object.__setattr__(self, "mean_rgb", mean)
        object.__setattr__(self, "stddev_rgb", std)

    # -------------------------------------------------------------------------- arithmetic

    def normalize(self, rgb) -> np.ndarray:
        """RGB on 0..255 (NumPy or JAX, any leading shape) -> the model's input."""
        return (rgb - np.asarray(self.mean_rgb, np.float32)) / np.asarray(self.stddev_rgb, np.float32)

    def denormalize(self, x) -> np.ndarray:
        """The model's input (NumPy or JAX, any leading shape) back to RGB on 0..255."""
        return x * np.asarray(self.stddev_rgb, np.float32) + np.asarray(self.mean_rgb, np.float32)

    def same_normalization(self, other: Preprocessing) -> bool:
        return bool(np.allclose(self.mean_rgb, other.mean_rgb) and np.allclose(self.stddev_rgb, other.stddev_rgb))

    def affine_from(self, fed: Preprocessing) -> tuple[np.ndarray, np.ndarray] | None:
        """``(scale, shift)`` per channel taking inputs normalised as ``fed`` to this normalisation; None if equal.

        ``x_self = (x_fed * fed.std + fed.mean - self.mean) / self.std = x_fed * scale + shift``.
        """
        if self.same_normalization(fed):
            return None
        mean, std = np.asarray(fed.mean_rgb, np.float64), np.asarray(fed.stddev_rgb, np.float64)
        new_mean, new_std = np.asarray(self.mean_rgb, np.float64), np.asarray(self.stddev_rgb, np.float64)
        return (std / new_std).astype(np.float32), ((mean - new_mean) / new_std).astype(np.float32)

    # -------------------------------------------------------------------------- records

    def to_dict(self) -> dict[str, Any]:
        record = {"mean_rgb": list(self.mean_rgb), "stddev_rgb": list(self.stddev_rgb)}
        if self.eval_crop is not None:
            record["eval_preprocessing"] = self.eval_crop  # the key evaluation configs use
        return {**record, "interpolation": self.interpolation, "crop_fraction": self.crop_fraction}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Preprocessing:
        known = {"mean_rgb", "stddev_rgb", "eval_preprocessing", "interpolation", "crop_fraction"}
        unknown = sorted(set(record) - known)
        if unknown:
            raise PreprocessingError(f"Unknown preprocessing field(s) {unknown}; known: {sorted(known)}.")
        if "mean_rgb" not in record or "stddev_rgb" not in record:
            raise PreprocessingError("A preprocessing record needs mean_rgb and stddev_rgb.")
        try:
            return cls(
                mean_rgb=tuple(record["mean_rgb"]),
                stddev_rgb=tuple(record["stddev_rgb"]),
                eval_crop=record.get("eval_preprocessing"),
                interpolation=record.get("interpolation", "bilinear"),
                crop_fraction=float(record.get("crop_fraction", 0.875)),
            )
        except (TypeError, ValueError) as error:
            if isinstance(error, PreprocessingError):
                raise
            raise PreprocessingError(f"A preprocessing record needs numbers: {error}.") from None

    def write(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(os.fspath(directory), FILENAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)


IMAGENET = Preprocessing()
# Keras applications and TF-slim: x / 127.5 - 1 and the central 87.5% crop.
KERAS = Preprocessing((127.5,) * 3, (127.5,) * 3, eval_crop="center_crop")
# torchvision and timm: ImageNet mean/std, resize to 256 and crop 224.
TORCHVISION = Preprocessing(eval_crop="torchvision")
TIMM = Preprocessing(eval_crop="torchvision", interpolation="bicubic")
# timm's MobileNetV1 weights (the ra4_e3600_r224_in1k tags) were trained on Inception's inputs,
# mean = std = 0.5 on the 0..1 scale (timm's pretrained_cfg), with the same bicubic resize and crop.
TIMM_INCEPTION = Preprocessing((127.5,) * 3, (127.5,) * 3, eval_crop="torchvision", interpolation="bicubic")


def read(directory: str | os.PathLike) -> Preprocessing | None:
    """A model directory's ``preprocessing.json``, or None when it has none.

    Raises :class:`PreprocessingError` (one sentence naming the file) for a file that is not a record.
    """
    path = os.path.join(os.fspath(directory), FILENAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return Preprocessing.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError, PreprocessingError, AttributeError) as error:
        raise PreprocessingError(f"{path} is not a preprocessing record ({error}).") from None
