"""Flax linen MobileNets; importing this package pulls in no training code."""

from mobilenet_jax.models.common import reset_classifier
from mobilenet_jax.models.layers import DepthwiseConv, PointwiseConv, make_divisible
from mobilenet_jax.models.mobilenet_v1 import V1_PROFILES, MobileNetV1, v1_architecture
from mobilenet_jax.models.mobilenet_v2 import V2_BLOCKS, MobileNetV2, V2Block, v2_architecture
from mobilenet_jax.models.registry import ARCHITECTURES, create_model, model_from_dict, model_to_dict

__all__ = [
    "ARCHITECTURES",
    "create_model",
    "model_from_dict",
    "model_to_dict",
    "reset_classifier",
    "DepthwiseConv",
    "PointwiseConv",
    "MobileNetV1",
    "MobileNetV2",
    "V1_PROFILES",
    "V2_BLOCKS",
    "V2Block",
    "make_divisible",
    "v1_architecture",
    "v2_architecture",
]
