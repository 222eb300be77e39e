"""Random variables for tests, drawn with NumPy: compiling a whole network's initialisers takes XLA tens of
seconds on 2 cores (a V2's init with the perturbations below: 48 s), and a test needs values, not that graph."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def initial(model, size: int, seed: int = 0) -> dict:
    """What ``model.init`` draws, in distribution: He-normal (fan-out) convolutions as torchvision and the
    models initialise them, N(0, 0.01) dense kernels, zero biases, identity BatchNorm."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel" and len(leaf.shape) == 4:
            values = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:2]) / leaf.shape[-1]), leaf.shape)
        elif name == "kernel":
            values = rng.normal(0.0, 0.01, leaf.shape)
        elif name in ("scale", "var"):
            values = np.ones(leaf.shape)
        else:
            values = np.zeros(leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def far_from_identity(model, size: int, seed: int = 0, var_high: float = 2.0) -> dict:
    """:func:`initial` with BatchNorm scales, biases and statistics far from the identity (every channel
    matters) and a classifier scaled by 30 (O(1) logits, so a tolerance on them means something)."""
    variables = initial(model, size, seed)
    rng = np.random.default_rng(seed + 1)
    ranges = {"scale": (0.5, 1.5), "var": (0.5, var_high)}

    def perturb(path, leaf):
        name = path[-1].key
        if name in ("mean", "bias"):
            return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)
        if name in ranges:
            return jnp.asarray(rng.uniform(*ranges[name], leaf.shape), leaf.dtype)
        return leaf

    variables = jax.tree_util.tree_map_with_path(perturb, variables)
    if "classifier" in variables["params"]:
        variables["params"]["classifier"]["kernel"] = variables["params"]["classifier"]["kernel"] * 30.0
    return variables


@functools.partial(jax.jit, static_argnums=0)
def logits(model, variables: dict, images: jax.Array) -> jax.Array:
    """``model.apply(variables, images, train=False)`` compiled once per model and shape (eagerly, each
    of a network's operations compiles on its own: seconds per network on 2 cores)."""
    return model.apply(variables, images, train=False)
