"""Flax linen MobileNets; importing this package pulls in no training code."""

from mobilenet_jax.models.config import ARCHITECTURES, model_from_dict, model_to_dict
from mobilenet_jax.models.layers import DepthwiseConv, make_divisible
from mobilenet_jax.models.mobilenet_v1 import V1_PROFILES, MobileNetV1, v1_architecture
from mobilenet_jax.models.mobilenet_v2 import V2_BLOCKS, MobileNetV2, v2_architecture

__all__ = [
    "ARCHITECTURES",
    "model_from_dict",
    "model_to_dict",
    "DepthwiseConv",
    "MobileNetV1",
    "MobileNetV2",
    "V1_PROFILES",
    "V2_BLOCKS",
    "make_divisible",
    "v1_architecture",
    "v2_architecture",
]
