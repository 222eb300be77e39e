"""A MobileNet given only as an architecture table.

``MobileNet(network=Network(...))`` builds any stem / blocks / head sequence that
:mod:`mobilenet_jax.models.table` describes: a searched or hand-made variant needs no
class of its own. Counting, export, pruning, checkpoints and ``model.json`` work on it
as on MobileNetV1 and MobileNetV2, since they all walk the same table::

    network = Network(16, (Block("inverted_residual", 16, 16, 24, stride=2, kernel=5), ...), 128)
    model = MobileNet(network=network, num_classes=10)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mobilenet_jax.models import common, table


class MobileNet(nn.Module):
    """A classifier or backbone built from ``network`` (a :class:`~mobilenet_jax.models.table.Network`).

    The other attributes are MobileNetV2's: ``num_classes``, ``dropout_rate``, ``padding``,
    ``dtype``, ``param_dtype``, ``bn_momentum``, ``bn_epsilon``, ``bn_axis_name``,
    ``depthwise_impl``, ``folded``.
    """

    network_table: table.Network
    num_classes: int | None = 1000
    dropout_rate: float = 0.0
    padding: str = "torch"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    depthwise_impl: str = "auto"
    folded: bool = False

    def network(self) -> table.Network:
        return self.network_table.check()

    def with_network(self, network: table.Network) -> MobileNet:
        return self.clone(network_table=network)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        return common.forward(self, self.network(), x, train, return_features, self.dropout_rate)
