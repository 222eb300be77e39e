"""Flax linen MobileNets; importing this package pulls in no training code."""

from mobilenet_jax.models.common import reset_classifier
from mobilenet_jax.models.fold import fold_batchnorm
from mobilenet_jax.models.layers import DepthwiseConv, PointwiseConv, make_divisible
from mobilenet_jax.models.mobilenet import MobileNet
from mobilenet_jax.models.mobilenet_v1 import V1_PROFILES, MobileNetV1, v1_architecture
from mobilenet_jax.models.mobilenet_v2 import V2_BLOCKS, MobileNetV2, v2_architecture
from mobilenet_jax.models.mobilenet_v3 import MobileNetV3, v3_network
from mobilenet_jax.models.mobilenet_v4 import MobileNetV4, v4_network
from mobilenet_jax.models.registry import ARCHITECTURES, create_model, model_from_dict, model_to_dict
from mobilenet_jax.models.table import Block, Conv, Network, channel_groups

__all__ = [
    "ARCHITECTURES",
    "create_model",
    "model_from_dict",
    "model_to_dict",
    "reset_classifier",
    "DepthwiseConv",
    "PointwiseConv",
    "MobileNet",
    "MobileNetV1",
    "fold_batchnorm",
    "MobileNetV2",
    "MobileNetV3",
    "MobileNetV4",
    "v3_network",
    "v4_network",
    "V1_PROFILES",
    "V2_BLOCKS",
    "Block",
    "Conv",
    "Network",
    "channel_groups",
    "make_divisible",
    "v1_architecture",
    "v2_architecture",
]
