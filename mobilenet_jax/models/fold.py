"""The inference form of a MobileNet: every BatchNorm folded into the convolution before it.

``fold_batchnorm(model, variables)`` returns ``model.clone(folded=True)`` (the same
module, its convolutions with a bias and no BatchNorm, each one XLA convolution op)
and variables where each convolution ``w`` followed by BatchNorm ``(gamma, beta,
mean, var)`` becomes ``w * gamma / sqrt(var + eps)`` and bias
``beta - mean * gamma / sqrt(var + eps)``. The walk over the model's architecture
table names every pair, so a new architecture needs nothing here. Export runs the
folded model; its logits equal the original's in inference mode up to rounding.
"""

from __future__ import annotations

import numpy as np
from flax import linen as nn

from mobilenet_jax.models import table


def _set(tree: dict, path: str, value: dict) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def fold_batchnorm(model: nn.Module, variables: dict) -> tuple[nn.Module, dict]:
    """``(folded model, folded variables)`` for inference (see the module docstring)."""
    if getattr(model, "folded", True):
        raise ValueError("fold_batchnorm needs an unfolded MobileNet (a model with a folded field set to False).")
    params, stats = variables["params"], variables["batch_stats"]
    folded: dict = {}
    network = model.network()
    normalized_fc = [network.head_fc()] if network.head_hidden and network.head_fc_norm else []
    for conv in (*network.convs(), *normalized_fc):
        kernel = np.asarray(table.at(params, conv.path)["kernel"], np.float32)
        norm, running = table.at(params, conv.norm), table.at(stats, conv.norm)
        scale = np.asarray(norm["scale"], np.float32) / np.sqrt(
            np.asarray(running["var"], np.float32) + model.bn_epsilon
        )
        bias = np.asarray(norm["bias"], np.float32) - np.asarray(running["mean"], np.float32) * scale
        _set(folded, conv.path, {"kernel": kernel * scale, "bias": bias})
    # Layers with a bias and no BatchNorm are copied: squeeze-excitations, the dense layer after the pooling and
    # the classifier.
    unnormalized = [conv.path for i, block in enumerate(network.blocks) for conv in block.se_convs(f"block_{i}")]
    unnormalized += [network.head_fc().path] if network.head_hidden and not network.head_fc_norm else []
    for path in unnormalized + (["classifier"] if "classifier" in params else []):
        _set(folded, path, {k: np.asarray(v, np.float32) for k, v in table.at(params, path).items()})
    return model.clone(folded=True), {"params": folded}
