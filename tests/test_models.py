"""MobileNetV1/V2/V3 modules: shapes, features, BatchNorm modes, dtypes, initialisation, errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mobilenet_jax import MobileNetV1, MobileNetV2, MobileNetV3, MobileNetV4, reset_classifier
from mobilenet_jax.kernels import depthwise as depthwise_kernels
from mobilenet_jax.models import DepthwiseConv, layers, model_from_dict, model_to_dict


def output_shape(model, size, **kwargs):
    images = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)

    def forward(x):
        variables = model.init(jax.random.key(0), x)
        return model.apply(variables, x, **kwargs)

    return jax.eval_shape(forward, images)


@pytest.mark.parametrize("width", [0.25, 0.5, 0.75, 1.0, 1.3])
@pytest.mark.parametrize("size", [(224, 224), (128, 128), (97, 61)])
def test_v1_output_shapes(width, size):
    assert output_shape(MobileNetV1(num_classes=17, width=width), size).shape == (2, 17)
    assert output_shape(MobileNetV1(num_classes=None, width=width), size).shape == (2, max(8, int(1024 * width)))


@pytest.mark.parametrize("width, last", [(0.35, 1280), (0.5, 1280), (1.0, 1280), (1.4, 1792)])
@pytest.mark.parametrize("size", [(224, 224), (160, 160), (33, 65)])
def test_v2_output_shapes(width, last, size):
    assert output_shape(MobileNetV2(num_classes=5, width=width), size).shape == (2, 5)
    assert output_shape(MobileNetV2(num_classes=None, width=width), size).shape == (2, last)


@pytest.mark.parametrize(
    "model, channels",
    [
        (MobileNetV1(width=1.0), {4: 128, 8: 256, 16: 512, 32: 1024}),
        (MobileNetV1(profile="0.5flops"), {4: 80, 8: 200, 16: 400, 32: 752}),
        (MobileNetV2(width=1.0), {4: 24, 8: 32, 16: 96, 32: 1280}),
        (MobileNetV3(variant="large"), {4: 24, 8: 40, 16: 112, 32: 960, "pre_logits": 1280}),
        (MobileNetV3(variant="small", minimal=True), {4: 16, 8: 24, 16: 48, 32: 576, "pre_logits": 1024}),
        (MobileNetV4(variant="conv_medium"), {4: 48, 8: 80, 16: 160, 32: 960, "pre_logits": 1280}),
    ],
)
def test_backbone_features_at_every_stride(model, channels):
    logits, features = output_shape(model, (224, 224), return_features=True)
    for stride, c in channels.items():
        if stride != "pre_logits":
            assert features[f"stride_{stride}"].shape == (2, 224 // stride, 224 // stride, c)
    assert features["pre_logits"].shape == (2, channels.get("pre_logits", channels[32]))
    assert logits.shape == (2, 1000)


def test_user_channel_list_and_width_scaling():
    model = MobileNetV1(num_classes=3, profile=(16, [24, (40, 2), (80, 2)]))
    _, features = output_shape(model, (32, 32), return_features=True)
    assert features["stride_8"].shape == (2, 4, 4, 80)
    assert MobileNetV1(width=0.5).apply  # width is data, not a subclass
    assert layers.make_divisible(32 * 0.35) == 16 and layers.make_divisible(320 * 1.4) == 448


@pytest.fixture(scope="module")
def small_v1():
    model = MobileNetV1(num_classes=4, width=0.25)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    return model, variables, x


def test_batchnorm_statistics_update_in_train_mode_only(small_v1):
    model, variables, x = small_v1
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    _, updated = train(variables, x)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updated["batch_stats"])
    assert all(jax.tree.leaves(changed))
    # Eval mode reads the running statistics and cannot write them.
    _, state = model.apply(variables, x, train=False, mutable=["batch_stats"])
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables["batch_stats"], state["batch_stats"])
    assert all(jax.tree.leaves(same))


def test_same_seed_same_parameters_and_other_seed_differs():
    model = MobileNetV1(num_classes=4, width=0.25)
    x = jnp.zeros((1, 32, 32, 3))
    init = jax.jit(model.init)
    a, b, c = init(jax.random.key(7), x), init(jax.random.key(7), x), init(jax.random.key(8), x)
    assert jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b))
    assert not np.array_equal(a["params"]["block_3"]["conv_pw"]["kernel"], c["params"]["block_3"]["conv_pw"]["kernel"])
    assert a["params"]["block_3"]["conv_pw"]["kernel"].shape == (1, 1, 32, 64)


def test_initialisation_follows_the_reference_code():
    model = MobileNetV1(num_classes=1000, width=1.0)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    pw = params["block_12"]["conv_pw"]["kernel"]  # 1x1, 1024 outputs: std sqrt(2 / 1024)
    assert pw.std() == pytest.approx(np.sqrt(2 / 1024), rel=0.02)
    dw = params["block_12"]["conv_dw"]["kernel"]  # 3x3 depthwise, 1024 outputs: std sqrt(2 / (9 * 1024))
    assert dw.shape == (3, 3, 1, 1024) and dw.std() == pytest.approx(np.sqrt(2 / (9 * 1024)), rel=0.05)
    assert params["classifier"]["kernel"].std() == pytest.approx(0.01, rel=0.02)
    assert not params["classifier"]["bias"].any()
    assert (params["block_0"]["bn_dw"]["scale"] == 1).all() and not params["block_0"]["bn_dw"]["bias"].any()


def test_bfloat16_compute_with_float32_parameters():
    from tests.test_prune import trained_like  # BatchNorm far from the identity, O(1) logits

    model = MobileNetV2(num_classes=4, width=0.35, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = trained_like(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
    logits, features = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x)
    assert logits.dtype == jnp.bfloat16 and features["stride_8"].dtype == jnp.bfloat16
    # The same function as float32, to bfloat16's precision (measured: 0.3% of the logits' norm).
    reference = jax.jit(model.clone(dtype=jnp.float32).apply)(variables, x)
    assert float(jnp.std(reference)) > 0.1
    error = jnp.linalg.norm(logits.astype(jnp.float32) - reference) / jnp.linalg.norm(reference)
    assert float(error) < 0.02


def test_v2_dropout_is_random_in_train_mode_and_off_in_eval():
    model = MobileNetV2(num_classes=4, width=0.35)
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    train = jax.jit(lambda v, x, r: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": r})[0])
    a, b = train(variables, x, jax.random.key(1)), train(variables, x, jax.random.key(2))
    assert np.abs(a).max() > 0 and not np.allclose(a, b)
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))  # no dropout rng needed
    np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_depthwise_implementations_agree_in_value_and_gradient(strides, size, kernel_size):
    # 'shift' has a hand-written backward pass (input and kernel gradients); 'xla' is
    # lax's grouped convolution differentiated by JAX: an independent reference.
    x = jax.random.normal(jax.random.key(0), (2, *size, 6))
    outputs, grads = {}, {}
    for impl in ("xla", "shift"):
        layer = DepthwiseConv(kernel_size=kernel_size, strides=strides, implementation=impl)
        variables = layer.init(jax.random.key(1), x)

        def loss(v, x, layer=layer):
            return jnp.sum(jnp.sin(layer.apply(v, x)))

        outputs[impl] = layer.apply(variables, x)
        grads[impl] = jax.grad(loss, argnums=(0, 1))(variables, x)
    np.testing.assert_allclose(outputs["xla"], outputs["shift"], atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["shift"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_whole_network_gradients_agree_across_depthwise_implementations():
    # The training loss of a short MobileNetV2 (train-mode BN, a residual, both strides) in float64.
    blocks = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 19, 17, 3), jnp.float64)
        labels = jnp.array([1, 3])
        results = {}
        for impl in ("xla", "shift", "ffi"):  # 'ffi': the C++ depthwise and BatchNorm kernels
            model = MobileNetV2(
                num_classes=5, width=0.35, block_table=blocks, dropout_rate=0.0, depthwise_impl=impl, dtype=jnp.float64
            )
            variables = model.init(jax.random.key(1), x)
            variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)

            def loss(params, model=model, variables=variables):
                logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

            results[impl] = jax.jit(jax.value_and_grad(loss))(variables["params"])
        flat_xla = jax.tree_util.tree_leaves_with_path(results["xla"][1])
        for impl in ("shift", "ffi"):
            np.testing.assert_allclose(results["xla"][0], results[impl][0], rtol=1e-12)
            flat = jax.tree.leaves(results[impl][1])
            assert len(flat_xla) == len(flat)
            for (path, a), b in zip(flat_xla, flat, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10, err_msg=f"{impl} {jax.tree_util.keystr(path)}")


def test_pointwise_conv_is_a_1x1_nn_conv():
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
    ours, reference = layers.PointwiseConv(4), nn.Conv(4, (1, 1), use_bias=False, kernel_init=layers.conv_kernel_init)
    variables = ours.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, variables, reference.init(jax.random.key(1), x))  # same init
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-6)

    def grads(layer):
        return jax.grad(lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x))), argnums=(0, 1))(variables, x)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(reference)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kernel_size, strides, pads", [(3, 2, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))), (5, 1, ((2, 2),) * 2)]
)
def test_full_conv_as_a_matrix_product_is_flax_conv(kernel_size, strides, pads):
    # The stem and the V3/V4 full convolutions on CPU: patches times the kernel, against nn.Conv itself.
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
    ours = layers.Conv(16, (kernel_size,) * 2, strides=strides, padding=pads, use_bias=False)
    reference = nn.Conv(16, (kernel_size,) * 2, strides=strides, padding=pads, use_bias=False)
    variables = reference.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(1), x), variables)  # same init
    assert ours._patches_apply(x) if jax.default_backend() == "cpu" else True
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), atol=2e-6)

    def grads(layer):
        return jax.grad(lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x))), argnums=(0, 1))(variables, x)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(reference)), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_depthwise_implementation_does_not_change_the_parameter_tree():
    x = jnp.zeros((1, 32, 32, 3))
    trees = [
        jax.tree.map(
            lambda a: a.shape, jax.eval_shape(MobileNetV2(width=0.35, depthwise_impl=impl).init, jax.random.key(0), x)
        )
        for impl in ("xla", "shift", "ffi")
    ]
    assert trees[0] == trees[1] == trees[2]
    assert layers.resolve_depthwise_impl("auto", "cpu") == ("ffi" if depthwise_kernels.available() else "shift")
    assert layers.resolve_depthwise_impl("auto", "gpu") == "xla"


def test_model_record_round_trip():
    resized = MobileNetV3(variant="small", width=0.5).network()._replace(head_hidden=64)
    for model in (
        MobileNetV1(num_classes=3, profile=(16, (24, (40, 2)))),
        MobileNetV2(width=0.75, rounding="floor"),
        MobileNetV3(variant="small", minimal=True, rounding="keras", padding="tf"),
        MobileNetV3(network_table=resized),
        MobileNetV4(variant="conv_medium", width=0.75, num_classes=5),
    ):
        record = json.loads(json.dumps(model_to_dict(model)))  # as stored beside a checkpoint
        assert model_from_dict(record) == model
    with pytest.raises(ValueError, match="does not take"):
        model_from_dict({"architecture": "MobileNetV2", "alpha": 0.5})


@pytest.mark.parametrize(
    "model, message",
    [
        (MobileNetV1(width=0), "width must be a positive number"),
        (MobileNetV1(profile="tiny"), "Unknown MobileNetV1 profile"),
        (MobileNetV1(profile=(32, [(64, 3)])), "stride 1 or 2"),
        (MobileNetV2(width=-1.0), "width must be a positive number"),
        (MobileNetV2(rounding="ceil"), "rounding must be one of"),
        (MobileNetV2(depthwise_impl="fast"), "depthwise_impl must be one of"),
        (MobileNetV3(variant="medium"), "variant must be one of"),
        (MobileNetV3(rounding="floor"), "rounding must be one of"),
        (MobileNetV4(variant="hybrid_medium"), "variant must be one of"),
    ],
)
def test_bad_configuration_is_a_clear_error(model, message):
    with pytest.raises(ValueError, match=message):
        output_shape(model, (32, 32))


def test_images_must_be_nhwc():
    with pytest.raises(ValueError, match="NHWC images of rank 4"):
        jax.eval_shape(MobileNetV1().init, jax.random.key(0), jax.ShapeDtypeStruct((32, 32, 3), jnp.float32))


def test_reset_classifier_keeps_the_backbone_and_replaces_the_head():
    model = MobileNetV2(num_classes=1000, width=0.35, block_table=((1, 16, 1, 1), (6, 24, 2, 2)))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    new_model, new_variables = reset_classifier(model, variables, num_classes=10, rng=jax.random.key(5))
    assert new_model.num_classes == 10 and new_model.width == 0.35
    head = new_variables["params"]["classifier"]
    assert head["kernel"].shape == (1280, 10) and not np.any(head["bias"])
    assert 0.005 < float(jnp.std(head["kernel"])) < 0.02  # N(0, 0.01), as the models initialise it
    for name in ("stem_conv", "block_2", "last_conv"):
        assert new_variables["params"][name] is variables["params"][name]
    assert new_variables["batch_stats"] is variables["batch_stats"]
    _, old_features = model.apply(variables, x, return_features=True)
    logits, features = new_model.apply(new_variables, x, return_features=True)
    assert logits.shape == (2, 10)
    np.testing.assert_array_equal(features["pre_logits"], old_features["pre_logits"])

    # MobileNetV3's classifier reads the dense layer after the pooling (head_fc), which stays.
    v3 = MobileNetV3(variant="small", width=0.5)
    v3_variables = jax.eval_shape(lambda: v3.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    v3_variables = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), v3_variables)
    v3_model, v3_new = reset_classifier(v3, v3_variables, num_classes=7)
    assert v3_new["params"]["classifier"]["kernel"].shape == (512, 7) and v3_model.num_classes == 7  # 1024 x 0.5
    assert v3_new["params"]["head_fc"] is v3_variables["params"]["head_fc"]

    backbone, backbone_variables = reset_classifier(model, variables, num_classes=None)
    assert "classifier" not in backbone_variables["params"]
    assert backbone.apply(backbone_variables, x).shape == (2, 1280)
    with pytest.raises(ValueError, match="num_classes must be a positive integer or None"):
        reset_classifier(model, variables, num_classes=0)
