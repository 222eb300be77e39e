"""timm and Keras applications weights -> Flax: parity with their own forward passes, TF padding, round trips, errors.

Random-init reference models only (timm and keras.applications with ``weights=None``):
nothing is downloaded. BatchNorm statistics and affine parameters are randomised so
that every layer matters, and logits are O(1), so the 1e-4 tolerance means something.
"""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
keras = pytest.importorskip("keras")

from mobilenet_jax import MobileNetV1, evaluate  # noqa: E402
from mobilenet_jax.data.preprocessing import IMAGENET  # noqa: E402
from mobilenet_jax.deployment import export  # noqa: E402
from mobilenet_jax.weights import checkpoint, convert, convert_keras  # noqa: E402
from mobilenet_jax.weights import torch_reference as ref  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4


def tolerance(expected) -> float:
    """TOLERANCE relative to the largest reference logit (at least 1): float32 through 50-odd layers rounds
    in proportion to the logits' scale. MobileNetV3-Large's logits reach 5.2 here; on an AVX2 machine its
    parity error was 6.6e-5 with XLA's ops and 1.05e-4 with the C++ kernels (another summation order),
    while a wrong mapping (padding, an epsilon, a transposed kernel) costs 1e-3 or more."""
    return TOLERANCE * max(1.0, float(np.abs(expected).max()))


def nhwc(batch, height, width, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


def convert_cli(*args):
    """``python -m mobilenet_jax.convert ARGS``, which must succeed."""
    command = [sys.executable, "-m", "mobilenet_jax.convert", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def max_error(model, variables, x, expected):
    got = np.asarray(jax.jit(lambda v, i: model.apply(v, i, train=False))(variables, x))
    assert expected.std() > 0.1, "O(1) logits, or the tolerance means nothing"
    assert np.abs(expected[0] - expected[1]).max() > 0.05, "the two images must give different logits"
    return float(np.abs(got - expected).max())


# ----------------------------------------------------------------------------- timm


def timm_model(name, num_classes=10, seed=0):
    """A random-init timm model whose BatchNorm statistics are those of a random batch (then randomised
    affine parameters): random running statistics would wash the input out over 30 layers."""
    torch.manual_seed(seed)
    module = ref.randomize(timm.create_model(name, pretrained=False, num_classes=num_classes), seed)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average: the statistics of the batch below
    module.train()
    with torch.no_grad():
        module(torch.from_numpy(nhwc(8, 48, 48, seed=seed + 100).transpose(0, 3, 1, 2).copy()))
    return module.eval()


def timm_layout(name):
    """'timm_v2' for 'mobilenetv2_050' and so on."""
    return "timm_v" + re.search(r"mobilenetv(\d)", name)[1]


def timm_logits(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize(
    "name, size, expected",
    [
        ("mobilenetv1_100", (33, 33), dict(width=1.0, activation="relu6", head_channels=0)),
        ("mobilenetv1_125", (32, 41), dict(width=1.25, activation="relu6")),
        ("mobilenetv1_100h", (35, 35), dict(width=1.0, head_channels=1024)),
        ("mobilenetv2_035", (33, 33), dict(width=0.35, fix_stem_head=False)),
        ("mobilenetv2_050", (32, 32), dict(width=0.5)),
        ("mobilenetv2_110d", (33, 37), dict(width=1.1, fix_stem_head=True)),
        ("mobilenetv3_large_100", (33, 40), dict(variant="large", width=1.0, minimal=False, bn_epsilon=1e-5)),
        ("mobilenetv3_large_075", (32, 32), dict(variant="large", width=0.75, rounding="timm")),
        ("mobilenetv3_small_050", (35, 35), dict(variant="small", width=0.5, rounding="timm")),
        ("mobilenetv3_small_100", (48, 48), dict(variant="small", width=1.0, minimal=False)),
        ("tf_mobilenetv3_large_minimal_100", (33, 33), dict(variant="large", minimal=True)),
        ("mobilenetv4_conv_small", (33, 33), dict(variant="conv_small", width=1.0)),
        ("mobilenetv4_conv_medium", (32, 32), dict(variant="conv_medium", width=1.0)),
        ("mobilenetv4_conv_small_050", (35, 35), dict(variant="conv_small", width=0.5)),
    ],
)
def test_timm_parity(name, size, expected):
    module = timm_model(name)
    model, variables = convert.load(module.state_dict())
    assert convert.detect_layout(module.state_dict()) == timm_layout(name)
    if name.startswith("tf_"):  # TF's 'SAME' padding and epsilon: the file cannot say so (timm's tf_ names do)
        model = model.clone(padding="tf", bn_epsilon=1e-3)
    for field, value in expected.items():
        assert getattr(model, field) == value, (field, getattr(model, field))
    x = nhwc(2, *size)
    logits = timm_logits(module, x)
    error = max_error(model, variables, x, logits)
    print(f"timm {name} {size}: max abs logit error {error:.2e}")
    assert error <= tolerance(logits)


@pytest.mark.parametrize("name", ["mobilenetv1_100h", "mobilenetv2_110d", "mobilenetv2_050", "mobilenetv3_small_100"])
def test_timm_round_trip_reproduces_the_state_dict(name):
    state = timm_model(name).state_dict()
    model, variables = convert.load(state)
    # Flax keeps no BatchNorm step counter; the one calibration batch above set it to 1.
    layout = timm_layout(name)
    back = convert.to_torch(model, variables, layout=layout, num_batches_tracked=1)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    timm.create_model(name, pretrained=False, num_classes=10).load_state_dict(back, strict=True)
    assert convert.default_layout(model) == (
        "torchvision" if name == "mobilenetv2_050" else ("timm_v2" if name.endswith("d") else layout)
    )


def test_safetensors_and_pth_give_identical_variables(tmp_path):
    from safetensors.torch import save_file

    state = timm_model("mobilenetv2_035", num_classes=5).state_dict()
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "model.pth")
    a_model, a = convert.load(tmp_path / "model.safetensors")
    b_model, b = convert.load(str(tmp_path / "model.pth"))
    assert a_model == b_model
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="as a safetensors file"):
        convert.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("mobilenetv3_rw", ["'timm_v2' layout", "missing", "squeeze-excitation", "MobileNetV3-RW"]),
        ("efficientnet_b0", ["'timm_v2' layout", "unexpected", "squeeze-excitation"]),
        ("resnet18", ["closest: 'timm_v1'", "missing", "conv_stem.weight", "unexpected", "layer1.0.conv1.weight"]),
    ],
)
def test_other_timm_architectures_are_one_listing_error(name, fragments):
    state = timm.create_model(name, pretrained=False, num_classes=10).state_dict()
    with pytest.raises(convert.StateDictMismatchError) as info:
        convert.load(state)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value)[:400])


# ----------------------------------------------------------------------------- Keras


def keras_model(architecture, alpha, size, classes=6, seed=0):
    """A random-init keras.applications model, BatchNorm and classifier randomised."""
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, architecture)(
        alpha=alpha, weights=None, input_shape=(size, size, 3), classes=classes, classifier_activation=None
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            n = gamma.shape[0]
            layer.set_weights([1 + 0.2 * rng.normal(size=n), 0.2 * rng.normal(size=n), mean, var])
            layer.momentum = 0.0  # the call below sets the statistics to those of one random batch
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and layer.name != "conv_preds":
            # He-normal on the fan-in, so the signal survives 30 layers at inference (Glorot shrinks it).
            (kernel,) = layer.get_weights()
            fan_in = np.prod(kernel.shape[:2]) * (
                1 if isinstance(layer, keras.layers.DepthwiseConv2D) else kernel.shape[2]
            )
            layer.set_weights([rng.normal(size=kernel.shape) * np.sqrt(2.0 / fan_in)])
        elif layer.name in ("predictions", "conv_preds") and layer.get_weights():
            kernel, bias = layer.get_weights()
            layer.set_weights(
                [rng.normal(size=kernel.shape) / kernel.shape[-2] ** 0.5, 0.1 * rng.normal(size=bias.shape)]
            )
    model(nhwc(32, size, size, seed=seed + 100), training=True)
    return model


def keras_logits(model, x):
    return np.asarray(model(x, training=False))


@pytest.mark.parametrize(
    "architecture, alpha, size, padding",
    [
        ("MobileNet", 0.25, 33, "keras_v1"),
        ("MobileNet", 0.5, 32, "keras_v1"),
        ("MobileNetV2", 0.35, 33, "tf"),
        ("MobileNetV2", 0.5, 32, "tf"),
        ("MobileNetV2", 1.3, 35, "tf"),
    ],
)
def test_keras_parity_live_model_and_weight_files(architecture, alpha, size, padding, tmp_path):
    reference = keras_model(architecture, alpha, size)
    x = nhwc(2, size, size, seed=1)
    expected = keras_logits(reference, x)
    reference.save_weights(tmp_path / "model.weights.h5")  # Keras 3: layers by class and order
    reference.save(tmp_path / "legacy.h5")  # legacy HDF5: layers by name
    converted = convert.load_with_info(reference)
    model = converted.model
    assert model.width == alpha and model.padding == padding and model.bn_epsilon == 1e-3
    assert converted.preprocessing == convert_keras.PREPROCESSING
    error = max_error(model, converted.variables, x, expected)
    print(f"keras {architecture} {alpha} @{size}: max abs logit error {error:.2e}")
    assert error <= tolerance(expected)
    # Both weight files give the live model's architecture and exactly its variables (so the same logits).
    for path in (tmp_path / "model.weights.h5", tmp_path / "legacy.h5"):
        from_file = convert.load_with_info(str(path))
        assert from_file.model == model and from_file.layout == converted.layout
        jax.tree.map(np.testing.assert_array_equal, from_file.variables, converted.variables)
    # The PyTorch-style default padding does not reproduce these weights where 'SAME' is asymmetric: on
    # even sizes, and at every stride-2 depthwise layer of Keras's MobileNet. (On odd sizes all through,
    # 'SAME' pads one pixel on each side, as PyTorch does.)
    torch_style = converted.model.clone(padding="torch")
    if size % 2 == 0 or padding == "keras_v1":
        assert max_error(torch_style, converted.variables, x, expected) > 1e-3


def keras_v3_model(architecture, alpha, size, minimalistic, include_top, seed=0):
    """A random-init keras.applications MobileNetV3 (its Rescaling layer inside: fed RGB 0..255), every
    weight randomised He-style (the SE and head convs have biases) and BatchNorm set on one random batch."""
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, architecture)(
        alpha=alpha, weights=None, input_shape=(size, size, 3), classes=6, classifier_activation=None,
        minimalistic=minimalistic, include_top=include_top, pooling=None if include_top else "avg",
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            n = weights[0].shape[0]
            layer.set_weights([1 + 0.2 * rng.normal(size=n), 0.2 * rng.normal(size=n), *weights[2:]])
            layer.momentum = 0.0
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            kernel = weights[0]
            fan_in = np.prod(kernel.shape[:2]) * (
                1 if isinstance(layer, keras.layers.DepthwiseConv2D) else kernel.shape[2]
            )
            weights[0] = rng.normal(size=kernel.shape) * np.sqrt((1.0 if layer.name == "logits" else 2.0) / fan_in)
            weights[1:] = [0.1 * rng.normal(size=w.shape) for w in weights[1:]]
            layer.set_weights(weights)
    model(rng.uniform(0, 255, (32, size, size, 3)).astype(np.float32), training=True)
    return model


@pytest.mark.parametrize(
    "architecture, alpha, size, minimalistic, include_top",
    [("MobileNetV3Large", 1.0, 32, False, True), ("MobileNetV3Small", 0.75, 33, False, True),
     ("MobileNetV3Small", 1.0, 32, True, False)],
)  # fmt: skip
def test_keras_mobilenet_v3_parity_with_its_rescaling_recorded(
    architecture, alpha, size, minimalistic, include_top, tmp_path
):
    """Squeeze-excitation, hard-swish, conv_2 (the dense layer after the pooling) and the Rescaling inside the
    Keras model: the converted model on preprocessing.json's [-1, 1] inputs equals Keras on RGB 0..255."""
    reference = keras_v3_model(architecture, alpha, size, minimalistic, include_top)
    rgb = np.random.default_rng(1).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    expected = keras_logits(reference, rgb)
    converted = convert.load_with_info(reference)
    model = converted.model
    assert converted.layout == "keras_v3" and converted.preprocessing == convert_keras.PREPROCESSING
    assert (model.variant, model.width, model.minimal, model.padding) == (
        architecture[11:].lower(),
        alpha,
        minimalistic,
        "tf",
    )
    assert model.network().head_hidden == ({"large": 1280, "small": 1024}[model.variant] if include_top else 0)
    error = max_error(model, converted.variables, converted.preprocessing.normalize(rgb), expected)
    print(f"keras {architecture} {alpha} minimal={minimalistic} @{size}: max abs error {error:.2e}")
    assert error <= tolerance(expected)
    reference.save_weights(tmp_path / "model.weights.h5")  # Keras 3: layers by class and order
    from_file = convert.load_with_info(str(tmp_path / "model.weights.h5"))
    assert from_file.model == model
    jax.tree.map(np.testing.assert_array_equal, from_file.variables, converted.variables)


def test_keras_export_and_preprocessing_applied_end_to_end(tmp_path, image_folder):
    """The converted directory records [-1, 1] inputs; the exported graph and the evaluation CLI apply them."""
    reference = keras_model("MobileNetV2", 0.35, 32, classes=4, seed=3)
    reference.save_weights(tmp_path / "k.weights.h5")
    result = convert_cli(tmp_path / "k.weights.h5", tmp_path / "converted")
    assert "'keras_v2' layout" in result.stdout and "[-1, 1]" in result.stdout
    assert checkpoint.read_preprocessing(tmp_path / "converted") == convert_keras.PREPROCESSING
    model, variables = checkpoint.load_model(tmp_path / "converted")
    # The export's graph takes RGB 0..255 and scales it as Keras's preprocess_input does.
    rgb = np.random.default_rng(4).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)
    forward = export.inference_function(model, variables, checkpoint.read_preprocessing(tmp_path / "converted"))
    np.testing.assert_allclose(
        np.asarray(forward(rgb)), keras_logits(reference, rgb / 127.5 - 1.0), atol=TOLERANCE, rtol=1e-5
    )
    # Evaluation re-normalises the pipeline's images: same top-1 and loss as Keras on x / 127.5 - 1.
    from configs import v2
    from mobilenet_jax.data import input_pipeline

    config = v2.get_config()
    config.dataset, config.data_dir, config.image_size, config.batch_size = "folder", str(image_folder), 32, 8
    config.half_precision = False
    got = evaluate.run(config, model_dir=str(tmp_path / "converted"))
    info = input_pipeline.get_dataset(config.dataset, config.data_dir)
    dataset, _ = input_pipeline.eval_dataset(config, info)
    hits, losses, count = 0, [], 0
    for batch in dataset.as_numpy_iterator():
        keep = batch["mask"] > 0
        rgb = batch["image"][keep] * np.array(input_pipeline.STDDEV_RGB) + np.array(input_pipeline.MEAN_RGB)
        logits = keras_logits(reference, (rgb / 127.5 - 1.0).astype(np.float32)).astype(np.float64)
        labels = batch["label"][keep]
        log_probs = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        losses += list(-log_probs[np.arange(len(labels)), labels])
        hits += int(np.sum(logits.argmax(-1) == labels))
        count += len(labels)
    assert got["examples"] == count == 20
    assert got["top1"] == pytest.approx(hits / count)
    assert got["loss"] == pytest.approx(np.mean(losses), rel=1e-4)


def keras_transfer_model(architecture, alpha, head, size=32, classes=5, seed=0):
    """The TensorFlow tutorials' transfer-learning model: a keras.applications backbone nested as one layer.

    ``head``: 'functional' (Rescaling to [-1, 1], backbone, average pooling, dropout, a softmax Dense),
    'sequential' (backbone, pooling, dropout, Dense; inputs scaled outside) or 'two_dense'.
    """
    backbone = keras_model(architecture, alpha, size, seed=seed)  # randomised BatchNorm, then the top is dropped
    base = getattr(keras.applications, architecture)(
        alpha=alpha, weights=None, input_shape=(size, size, 3), include_top=False
    )
    for layer in base.layers:
        if layer.get_weights():
            layer.set_weights(backbone.get_layer(layer.name).get_weights())
    layers = keras.layers
    if head == "sequential":
        model = keras.Sequential(
            [
                keras.Input((size, size, 3)),
                base,
                layers.GlobalAveragePooling2D(),
                layers.Dropout(0.2),
                layers.Dense(classes),
            ]
        )
    else:
        inputs = keras.Input((size, size, 3))
        x = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(base(layers.Rescaling(1 / 127.5, offset=-1)(inputs))))
        if head == "two_dense":
            x = layers.Dense(8, activation="relu")(x)
        model = keras.Model(inputs, layers.Dense(classes, activation="softmax")(x))
    dense = model.layers[-1]
    kernel, bias = dense.get_weights()
    rng = np.random.default_rng(seed + 7)
    dense.set_weights([rng.normal(size=kernel.shape) / kernel.shape[0] ** 0.5, 0.1 * rng.normal(size=bias.shape)])
    return model


def keras_pooled_and_logits(model, rgb):
    """The pooled backbone features and the last Dense's logits (before its softmax; None when that Dense
    does not read the pooled features), computed from Keras."""
    pooled_layer = next(layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D))
    pooled = np.asarray(keras.Model(model.inputs, pooled_layer.output)(rgb, training=False), np.float64)
    kernel, bias = model.layers[-1].get_weights()
    return pooled, (pooled @ kernel + bias if kernel.shape[0] == pooled.shape[-1] else None)


@pytest.mark.parametrize(
    "architecture, alpha, head", [("MobileNetV2", 0.35, "functional"), ("MobileNet", 0.25, "sequential")]
)
def test_keras_transfer_learning_model_converts_with_its_head(architecture, alpha, head, tmp_path):
    reference = keras_transfer_model(architecture, alpha, head)
    rgb = np.random.default_rng(2).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)
    # The Sequential model takes inputs scaled outside, as preprocess_input does.
    keras_in = rgb if head == "functional" else rgb / 127.5 - 1.0
    _, expected = keras_pooled_and_logits(reference, keras_in)
    reference.save(tmp_path / "model.keras")
    reference.save(tmp_path / "legacy.h5")
    reference.save_weights(tmp_path / "model.weights.h5")
    for source in (reference, tmp_path / "model.keras", tmp_path / "legacy.h5", tmp_path / "model.weights.h5"):
        converted = convert.load_with_info(source if source is reference else str(source))
        assert converted.layout == ("keras_v2" if architecture == "MobileNetV2" else "keras_v1")
        assert converted.model.num_classes == 5 and "became the classifier (5 classes)" in converted.note
        softmax_known = head == "functional" and not str(source).endswith(".weights.h5")
        assert ("Keras applied a softmax" in converted.note) == softmax_known
        # The Rescaling layer's [-1, 1] (or, without one, keras preprocess_input's) is the recorded preprocessing.
        assert converted.preprocessing.mean_rgb == (127.5,) * 3 and converted.preprocessing.stddev_rgb == (127.5,) * 3
        forward = export.inference_function(converted.model, converted.variables, converted.preprocessing)
        np.testing.assert_allclose(np.asarray(forward(rgb)), expected, atol=TOLERANCE, rtol=0)


def test_keras_head_it_cannot_map_gives_the_backbone_and_one_sentence(tmp_path):
    reference = keras_transfer_model("MobileNetV2", 0.35, "two_dense")
    reference.save(tmp_path / "model.keras")
    rgb = np.random.default_rng(3).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)
    pooled, _ = keras_pooled_and_logits(reference, rgb)
    converted = convert.load_with_info(str(tmp_path / "model.keras"))
    assert converted.model.num_classes is None  # the backbone: pooled features out
    note = converted.note  # one sentence naming the layers left out
    assert "\n" not in note and ". " not in note and note.endswith(".") and "the head (dense #0, dense #1)" in note
    features = converted.model.apply(converted.variables, (rgb - 127.5) / 127.5, train=False)
    np.testing.assert_allclose(np.asarray(features), pooled, atol=TOLERANCE, rtol=0)
    result = convert_cli(tmp_path / "model.keras", tmp_path / "converted")
    assert "left out" in result.stdout and checkpoint.load_model(tmp_path / "converted")[0].num_classes is None


@pytest.mark.slow
def test_keras_transfer_model_exports_to_int8_and_evaluates(tmp_path, image_folder):
    """TF padding and Keras's [-1, 1] scaling inside an int8 graph; evaluate's JAX reference gets the same inputs."""
    pytest.importorskip("ai_edge_litert")
    from configs import v2
    from mobilenet_jax.data import input_pipeline
    from tests.test_export import COMPUTE_OPS

    reference = keras_transfer_model("MobileNetV2", 0.35, "functional", classes=4)
    reference.save(tmp_path / "model.keras")
    converted = convert.load_with_info(str(tmp_path / "model.keras"))  # what the convert command writes:
    checkpoint.save_model(tmp_path / "converted", converted.model, converted.variables, converted.preprocessing)
    config = v2.get_config()
    config.dataset, config.data_dir, config.image_size, config.batch_size = "folder", str(image_folder), 32, 8
    config.half_precision = False
    out = tmp_path / "int8.tflite"
    export.export(str(tmp_path / "converted"), str(out), quantize="int8", config=config, calibration_count=64)
    # The validation images (the calibration's distribution, not its images), as the pipeline gives them.
    dataset, _ = input_pipeline.eval_dataset(config, input_pipeline.get_dataset("folder", str(image_folder)))
    batches = list(dataset.as_numpy_iterator())
    pipeline_images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    rgb = IMAGENET.denormalize(pipeline_images)
    _, expected = keras_pooled_and_logits(reference, rgb)
    tflite = export.TFLiteModel(str(out), delegates=False)
    for op in tflite.ops():  # an integer graph: TF padding and the [-1, 1] scaling quantized with the rest
        if op["op_name"] in COMPUTE_OPS | {"PAD", "MUL", "SUB"} and op["outputs"][0] != tflite.output["index"]:
            assert tflite.tensor(op["outputs"][0])["dtype"] == np.int8, op
    # Not asserted: these random-init Keras weights lose far more in int8 (37% of the logit range, 75-85%
    # top-1 agreement) than test_export's random variables in the same converted architecture and graph
    # (TF padding, Keras rounding, [-1, 1] in the graph: 0.7%, 100%): the weights, not the export, as
    # post-training quantization of MobileNets is known to be (issue 20).
    got = export.TFLiteModel(str(out))(rgb)  # with XNNPACK, as evaluate runs it
    print(f"keras int8: top-1 agreement with Keras {np.mean(got.argmax(-1) == expected.argmax(-1)):.0%}")
    # evaluate --tflite FILE --model_dir DIR: the JAX reference is fed the directory's [-1, 1] inputs.
    model, variables = checkpoint.load_model(tmp_path / "converted")
    jax_reference = evaluate._reference(model, variables, str(tmp_path / "converted"))
    np.testing.assert_allclose(np.asarray(jax_reference(pipeline_images)), expected, atol=TOLERANCE)
    result = evaluate.evaluate_tflite(config, str(out), jax.jit(jax_reference))
    assert result["examples"] == 20
    assert result["jax_top1"] == pytest.approx(np.mean(expected.argmax(-1) == labels))  # Keras's own top-1
    assert result["top1_agreement"] == pytest.approx(np.mean(got.argmax(-1) == expected.argmax(-1)))


def test_keras_closest_layout_of_unnamed_weights_counts_depthwise_layers():
    layers = [(None, "depthwise_conv2d", []) for _ in range(16)] + [(None, "conv2d", [])]
    assert convert_keras._closest(layers) == "keras_v2"
    assert convert_keras._closest(layers[:12]) == "keras_v1"


def test_keras_resnet_is_one_listing_error(tmp_path):
    resnet = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=3)
    with pytest.raises(convert_keras.KerasMismatchError) as info:
        convert.load(resnet)
    message = str(info.value)
    assert message.startswith("No Keras MobileNet layout fits (closest: keras_v")
    assert "missing" in message and "unexpected" in message and "conv1_conv" in message
    with pytest.raises(FileNotFoundError, match="No Keras weights file"):
        convert.load(str(tmp_path / "missing.h5"))


@pytest.mark.slow
def test_convert_cli_lists_layouts_and_reads_timm_safetensors(tmp_path, image_folder):
    from safetensors.torch import save_file

    result = convert_cli("--list_layouts")
    for layout in ("torchvision", "amc_v1", "notes_v2", "timm_v1", "timm_v2", "keras_v1", "keras_v2") + (
        "torchvision_v3",
        "timm_v3",
        "keras_v3",
        "timm_v4",
    ):
        assert layout in result.stdout
    # timm's tf_ models were trained with TF's padding and epsilon, which their files do not record.
    tf_module = timm_model("tf_mobilenetv3_small_minimal_100", num_classes=4)
    save_file(tf_module.state_dict(), tmp_path / "tf.safetensors")
    convert_cli(tmp_path / "tf.safetensors", tmp_path / "tf", "--padding", "tf", "--bn_epsilon", "1e-3")
    tf_model, tf_variables = checkpoint.load_model(tmp_path / "tf")
    assert (tf_model.padding, tf_model.bn_epsilon, tf_model.minimal) == ("tf", 1e-3, True)
    x = nhwc(2, 32, 32)
    logits = timm_logits(tf_module, x)
    assert max_error(tf_model, tf_variables, x, logits) <= tolerance(logits)
    module = timm_model("mobilenetv1_100h", num_classes=4)
    save_file(module.state_dict(), tmp_path / "model.safetensors")
    convert_cli(tmp_path / "model.safetensors", tmp_path / "out")
    model, variables = checkpoint.load_model(tmp_path / "out")
    assert isinstance(model, MobileNetV1) and model.head_channels == 1024 and model.activation == "relu6"
    assert model.num_classes == 4
    recorded = checkpoint.read_preprocessing(tmp_path / "out")  # timm V1: Inception mean/std, resize + crop, bicubic
    assert (recorded.eval_crop, recorded.interpolation) == ("torchvision", "bicubic")
    assert recorded.mean_rgb == recorded.stddev_rgb == (127.5,) * 3  # timm's pretrained_cfg: mean = std = 0.5
    x = nhwc(2, 33, 33)
    logits = timm_logits(module, x)
    assert max_error(model, variables, x, logits) <= tolerance(logits)
    # Evaluation uses that crop and interpolation: the same figures as a manual run over such a split.
    from configs import v1
    from mobilenet_jax.data import input_pipeline
    from mobilenet_jax.training import distributed, steps

    config = v1.get_config()
    config.dataset, config.data_dir, config.image_size, config.batch_size = "folder", str(image_folder), 32, 8
    config.half_precision = False
    got = evaluate.run(config, model_dir=str(tmp_path / "out"))
    info = input_pipeline.get_dataset(config.dataset, config.data_dir)
    mesh = distributed.make_mesh()
    bicubic, _ = input_pipeline.eval_dataset(config, info, "torchvision", "bicubic")
    # (x * std_imagenet + mean_imagenet - 127.5) / 127.5: the pipeline's images as timm V1 takes them.
    scale = np.array(input_pipeline.STDDEV_RGB) / 127.5
    shift = (np.array(input_pipeline.MEAN_RGB) - 127.5) / 127.5
    bicubic = bicubic.map(lambda b: {**b, "image": b["image"] * scale.astype(np.float32) + shift.astype(np.float32)})
    expected = steps.evaluate(steps.make_eval_step(mesh, model), variables, bicubic, mesh)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6) and got["top1"] == expected["top1"]
    bilinear, _ = input_pipeline.eval_dataset(config, info, "center_crop", "bilinear")
    assert steps.evaluate(steps.make_eval_step(mesh, model), variables, bilinear, mesh)["loss"] != pytest.approx(
        got["loss"], rel=1e-4
    )
