"""Channel groups read off a trace of the model, independently of its architecture table.

``traced_groups(model, variables, image_size)`` traces ``model.apply`` with
``jax.make_jaxpr`` and follows every tensor axis through the primitives (convolutions,
matrix products, reshapes, broadcasts, reductions, elementwise ops, nested calls),
joining the axes that must have one size and meaning: a convolution's input features
with its kernel's input axis, a grouped (depthwise) convolution's output with its
input, the two sides of an add. The parameter axes that end up joined are the
channel groups the module really has; ``table_groups`` lists the ones the table says.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from mobilenet_jax.compression import prune

ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "log", "rsqrt", "sqrt", "integer_pow", "square",
    "convert_element_type", "select_n", "gt", "ge", "lt", "le", "eq", "ne", "and", "or", "not", "abs", "sign",
    "pow", "tanh", "logistic", "clamp", "stop_gradient", "copy", "copy_p", "erf", "log1p", "expm1",
}  # fmt: skip


class _Axes:
    """Union-find over (variable, axis) slots."""

    def __init__(self):
        self.parent: dict = {}
        self.scopes = 0

    def new_scope(self) -> int:
        self.scopes += 1
        return self.scopes

    def find(self, slot):
        self.parent.setdefault(slot, slot)
        while self.parent[slot] != slot:
            self.parent[slot] = self.parent[self.parent[slot]]
            slot = self.parent[slot]
        return slot

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)


def _is_var(v) -> bool:
    return not isinstance(v, jex_core.Literal)


def _rank(v) -> int:
    return len(v.aval.shape)


def _sub_jaxpr(eqn):
    for value in eqn.params.values():
        if isinstance(value, jex_core.ClosedJaxpr):
            return value.jaxpr
        if isinstance(value, jex_core.Jaxpr):
            return value
    return None


def _walk(jaxpr, axes: _Axes, scope: int = 0) -> None:
    """Joins the axes of ``jaxpr``'s variables; a nested call gets a scope of its own (bodies can be shared)."""

    def join(a, i, b, j):
        axes.union((scope, a, i), (scope, b, j))

    for eqn in jaxpr.eqns:
        ins, out, name = eqn.invars, eqn.outvars, eqn.primitive.name
        inner = _sub_jaxpr(eqn)
        if inner is not None:  # pjit, custom_jvp_call, custom_vjp_call, ...: connect through the body
            inner_scope = axes.new_scope()
            pairs = list(zip(ins[len(ins) - len(inner.invars) :], inner.invars, strict=True))
            pairs += list(zip(out, inner.outvars, strict=True))
            for outer, formal in pairs:
                if _is_var(outer) and _is_var(formal):
                    for i in range(_rank(outer)):
                        axes.union((scope, outer, i), (inner_scope, formal, i))
            _walk(inner, axes, inner_scope)
        elif name in ELEMENTWISE or name in ("pad", "slice", "reduce_precision", "dynamic_slice"):
            for v in [*ins, *out]:
                if _is_var(v) and _rank(v) == _rank(out[0]):
                    for i in range(_rank(v)):
                        join(v, i, out[0], i)
        elif name == "broadcast_in_dim":
            for j, d in enumerate(eqn.params["broadcast_dimensions"]):
                if ins[0].aval.shape[j] == out[0].aval.shape[d]:
                    join(ins[0], j, out[0], d)
        elif name == "reshape":
            a, b = ins[0].aval.shape, out[0].aval.shape
            for k in range(1, min(len(a), len(b)) + 1):  # trailing axes of equal size keep their meaning
                if a[-k] != b[-k]:
                    break
                join(ins[0], len(a) - k, out[0], len(b) - k)
        elif name in ("reduce_sum", "reduce_max", "reduce_min", "squeeze"):
            dropped = eqn.params.get("axes", eqn.params.get("dimensions"))
            kept = [i for i in range(_rank(ins[0])) if i not in dropped]
            for o, i in enumerate(kept):
                join(ins[0], i, out[0], o)
        elif name == "transpose":
            for o, i in enumerate(eqn.params["permutation"]):
                join(ins[0], i, out[0], o)
        elif name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = ins
            for i, j in zip((*lc, *lb), (*rc, *rb), strict=True):
                join(lhs, i, rhs, j)
            free = [(lhs, i) for i in (*lb, *(i for i in range(_rank(lhs)) if i not in (*lc, *lb)))]
            free += [(rhs, j) for j in range(_rank(rhs)) if j not in (*rc, *rb)]
            for o, (v, i) in enumerate(free):
                join(v, i, out[0], o)
        elif name == "conv_general_dilated":
            x, kernel = ins
            numbers = eqn.params["dimension_numbers"]
            join(kernel, numbers.rhs_spec[0], out[0], numbers.out_spec[1])  # output features
            join(x, numbers.lhs_spec[0], out[0], numbers.out_spec[0])  # batch
            if eqn.params["feature_group_count"] == 1:
                join(x, numbers.lhs_spec[1], kernel, numbers.rhs_spec[1])
            else:  # depthwise: output channel c reads input channel c
                join(x, numbers.lhs_spec[1], out[0], numbers.out_spec[1])
        else:
            raise NotImplementedError(f"traced_groups does not know the primitive {name!r}")


def traced_groups(model, variables, image_size: int = 32) -> set[frozenset]:
    """The partition of the parameters' channel slots that the traced computation imposes."""
    model = model.clone(depthwise_impl="xla")
    images = jnp.zeros((2, image_size, image_size, 3))
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
    axes = _Axes()
    _walk(closed.jaxpr, axes)
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]  # the first invars; the images come last
    slots = {}
    for (path, _), var in zip(leaves, closed.jaxpr.invars, strict=False):
        name = "/".join(str(k.key) for k in path[1:])  # without the collection: block_0/bn_dw/mean
        for axis in range(_rank(var)):
            slots[(name, axis)] = axes.find((0, var, axis))
    return _partition(slots, _channel_slots(model, variables))


def _channel_slots(model, variables) -> set[tuple[str, int]]:
    """Every parameter slot that carries channels: conv kernels' in/out axes, BatchNorm vectors, classifier rows."""
    slots = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        name = "/".join(str(k.key) for k in path[1:])
        if name.endswith("kernel") and leaf.ndim == 4:
            slots |= {(name, 3)} | ({(name, 2)} if leaf.shape[2] > 1 and not name.startswith("stem_conv") else set())
        elif name.startswith("classifier/kernel"):
            slots.add((name, 0))
        elif name.endswith("kernel") and leaf.ndim == 2:  # a dense layer before the classifier (head_fc)
            slots |= {(name, 0), (name, 1)}
        elif leaf.ndim == 1 and not name.startswith("classifier"):
            slots.add((name, 0))
    return slots


def _partition(roots: dict, slots: set) -> set[frozenset]:
    by_root: dict = {}
    for slot in slots:
        by_root.setdefault(roots[slot], set()).add(slot)
    return {frozenset(group) for group in by_root.values()}


def table_groups(model) -> set[frozenset]:
    """The same partition as the architecture table's channel groups give it."""
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jax.numpy.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]
    rank = {
        "/".join(str(k.key) for k in path): leaf.ndim for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    result = set()
    for group in prune.groups(model):
        slots = set()
        for conv in group.producers + group.passes:
            slots.add((f"{conv.path}/kernel", rank[f"{conv.path}/kernel"] - 1))  # the output axis
            if not conv.norm:  # a squeeze-excitation conv: its own bias
                slots.add((f"{conv.path}/bias", 0))
                continue
            for field in ("scale", "bias"):
                slots.add((f"{conv.norm}/{field}", 0))
            for field in ("mean", "var"):
                slots.add((f"{conv.norm}/{field}", 0))
        for reader in group.readers:
            slots.add((f"{reader}/kernel", rank[f"{reader}/kernel"] - 2))  # the input axis of a conv or dense kernel
        result.add(frozenset(slots))
    return result
