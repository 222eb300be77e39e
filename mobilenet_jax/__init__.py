"""MobileNetV1 and MobileNetV2 for JAX/Flax."""

import warnings

from mobilenet_jax.models import MobileNetV1, MobileNetV2
from mobilenet_jax.summary import ModelSummary, summary

# `python -m mobilenet_jax.summary` runs a module this package has already imported
# (to export the `summary` function); the module has no import-time side effects.
warnings.filterwarnings("ignore", message="'mobilenet_jax.summary' found in sys.modules", category=RuntimeWarning)

__all__ = ["MobileNetV1", "MobileNetV2", "ModelSummary", "summary"]
__version__ = "0.1.0"
