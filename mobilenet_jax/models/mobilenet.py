"""A MobileNet given only as an architecture table.

``MobileNet(network=Network(...))`` builds any stem / blocks / head sequence that
:mod:`mobilenet_jax.models.table` describes: a searched or hand-made variant needs no
class of its own. Counting, export, pruning, checkpoints and ``model.json`` work on it
as on MobileNetV1 and MobileNetV2, since they all walk the same table::

    network = Network(16, (Block("inverted_residual", 16, 16, 24, stride=2, kernel=5), ...), 128)
    model = MobileNet(network=network, num_classes=10)
"""

from __future__ import annotations

from mobilenet_jax.models import common, table


class MobileNet(common.MobileNetBase):
    """A classifier or backbone built from ``network_table`` (a :class:`~mobilenet_jax.models.table.Network`).

    The other attributes are MobileNetV2's: ``num_classes``, ``dropout_rate``, and the keyword-only ``padding``,
    ``dtype``, ``param_dtype``, ``bn_momentum``, ``bn_epsilon``, ``bn_axis_name``,
    ``depthwise_impl``, ``folded``.
    """

    network_table: table.Network
    num_classes: int | None = 1000
    dropout_rate: float = 0.0

    def network(self) -> table.Network:
        return self.network_table.check()

    def with_network(self, network: table.Network) -> MobileNet:
        return self.clone(network_table=network)
