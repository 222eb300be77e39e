"""Flax NNX projects use the linen modules through ``flax.nnx.bridge`` (the README's NNX section)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mobilenet_jax import MobileNetV2


@pytest.fixture(scope="module")
def bridged():
    # A short MobileNetV2 (expansion, residual and stride-2 blocks) keeps the compiles quick.
    linen = MobileNetV2(num_classes=4, width=0.35, dropout_rate=0.5, block_table=((1, 16, 1, 1), (6, 24, 2, 2)))
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(params=0, dropout=1))
    nnx.bridge.lazy_init(model, x, train=False)
    return linen, model, x


def test_nnx_model_has_the_linen_parameters_and_logits(bridged):
    linen, model, x = bridged
    params = nnx.state(model, nnx.Param)
    assert params["stem_conv"]["kernel"][...].shape == (3, 3, 3, 16)
    assert params["classifier"]["kernel"][...].shape == (1280, 4)
    # The same numbers through linen's apply: the bridge adds nothing of its own.
    variables = {
        "params": nnx.to_pure_dict(params),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }
    np.testing.assert_allclose(model(x, train=False), linen.apply(variables, x, train=False), atol=1e-6)


def test_nnx_train_mode_updates_batch_stats_and_uses_dropout(bridged):
    _, model, x = bridged
    before = nnx.state(model, nnx.BatchStat)["stem_bn"]["mean"][...]
    first = model(x, train=True, mutable=["batch_stats"])
    after = nnx.state(model, nnx.BatchStat)["stem_bn"]["mean"][...]
    assert bool(jnp.any(before != after))  # running statistics moved
    second = model(x, train=True, mutable=["batch_stats"])
    assert bool(jnp.any(first != second))  # a new dropout mask each call
    np.testing.assert_array_equal(model(x, train=False), model(x, train=False))  # eval: deterministic


def test_nnx_gradients_and_optimizer_step_match_linen(bridged):
    linen, _, x = bridged
    linen = linen.clone(dropout_rate=0.0)
    model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(params=0))
    nnx.bridge.lazy_init(model, x, train=False)
    variables = {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }
    labels = jnp.array([0, 1, 2, 3])

    def nnx_loss(m):
        logits = m(x, train=True, mutable=["batch_stats"])  # batch statistics, as in training
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def linen_loss(params):
        logits, _ = linen.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    expected = jax.grad(linen_loss)(variables["params"])
    grads = nnx.grad(nnx_loss)(model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), nnx.to_pure_dict(grads), expected)
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    optimizer.update(model, grads)
    updated = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(
        updated["classifier"]["kernel"],
        variables["params"]["classifier"]["kernel"] - 0.5 * expected["classifier"]["kernel"],
        rtol=1e-5,
        atol=1e-7,
    )
