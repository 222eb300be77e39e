"""Custom calls under ``jax.shard_map``: operands that vary over the same mesh axes, results typed like them.

An XLA custom call is opaque to JAX's tracking of which values vary across the manual mesh
axes of ``shard_map``: its operands must agree, and its results must be declared with the
same type, or a ``custom_vjp`` around it fails with "the manual axis types do not match".
"""

from __future__ import annotations

import jax
from jax import lax


def same_varying_axes(*arrays: jax.Array) -> list[jax.Array]:
    """``arrays``, each cast to vary over the union of their varying mesh axes (a no-op outside shard_map).

    Used before a ``custom_vjp``: the cast's transpose sums the cotangent of a replicated
    operand (a kernel, a BatchNorm scale) over the axes it was broadcast to.
    """
    axes = [jax.typeof(a).manual_axis_type.varying for a in arrays]
    union = frozenset().union(*axes)
    return [
        lax.pcast(a, tuple(sorted(union - own)), to="varying") if union - own else a
        for a, own in zip(arrays, axes, strict=True)
    ]


def result_like(x: jax.Array, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    """A custom call's result of ``shape`` with ``x``'s dtype and, under ``shard_map``, its varying mesh axes."""
    aval = jax.typeof(x)
    sharding = jax.sharding.NamedSharding(aval.sharding.mesh, jax.sharding.PartitionSpec())  # replicated, any rank
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding, manual_axis_type=aval.manual_axis_type)
