"""Export to LiteRT and StableHLO: parity with the JAX model, the int8 graph, and one-sentence errors."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from mobilenet_jax import MobileNetV1, MobileNetV2, MobileNetV3, MobileNetV4
from mobilenet_jax.deployment import export  # noqa: E402
from mobilenet_jax.errors import UserError  # noqa: E402
from mobilenet_jax.weights import checkpoint
from tests import variables as random_init

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4


def random_variables(model, size, seed=0):
    """Variables with BatchNorm parameters and statistics far from the identity."""
    return random_init.far_from_identity(model, size, seed, var_high=2.0)


def rgb_images(count, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype(np.float32)


def jax_logits(model, variables, rgb):
    return np.asarray(_logits(model, variables, (rgb - export.MEAN_RGB) / export.STDDEV_RGB))


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, variables, images):
    return model.apply(variables, images, train=False)


@pytest.mark.parametrize(
    "model, size",
    [
        (MobileNetV1(num_classes=10, width=0.25), 33),
        # timm/Keras fields: ReLU6, a head conv, Keras MobileNet's padding, on an even size.
        (MobileNetV1(num_classes=10, width=0.5, activation="relu6", head_channels=64, padding="keras_v1"), 34),
        (MobileNetV2(num_classes=10, width=0.35), 37),
        # Fewer blocks (expansion, residual and stride-2 all present) for a quicker conversion; TF 'SAME' padding.
        (
            MobileNetV2(
                num_classes=10, width=0.5, block_table=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2)), padding="tf"
            ),
            36,
        ),
        # timm's fix_stem_head ('d' variants); a pruned V2 is in the test below.
        (MobileNetV2(num_classes=10, width=0.5, block_table=((1, 16, 1, 1), (6, 24, 2, 2)), fix_stem_head=True), 33),
        # MobileNetV4's full convs and universal blocks in the body, BatchNorm on the pooled vector.
        (MobileNetV4(num_classes=10, variant="conv_small", width=0.5), 35),
    ],
)
def test_float32_tflite_matches_the_jax_model(model, size):
    variables = random_variables(model, size)
    tflite = export.TFLiteModel(export.to_tflite(model, variables, size))
    rgb = rgb_images(3, size)
    expected = jax_logits(model, variables, rgb)
    error = float(np.abs(tflite(rgb) - expected).max())
    print(f"tflite float32 {type(model).__name__} {model.width} @{size}: max abs error {error:.2e}")
    assert expected.std() > 0.1 and error <= TOLERANCE
    assert tflite.input["shape"].tolist() == [1, size, size, 3]


def test_pruned_v2_exports_with_its_logits():
    from mobilenet_jax.compression import prune
    from tests.test_prune import V2_CHANNELS, V2_TABLE

    source = MobileNetV2(num_classes=10, width=0.5, block_table=V2_TABLE)
    model, variables, _ = prune.prune(source, random_variables(source, 32), V2_CHANNELS)
    assert model.block_channels is not None  # per-block (hidden, out) widths
    rgb = rgb_images(3, 32)
    expected = jax_logits(model, variables, rgb)
    error = float(np.abs(export.TFLiteModel(export.to_tflite(model, variables, 32))(rgb) - expected).max())
    assert expected.std() > 0.1 and error <= TOLERANCE


def test_torchvision_model_exports_with_torchvisions_logits():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from mobilenet_jax.weights import convert, torch_reference

    module = torch_reference.randomize(torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10)).eval()
    model, variables = convert.from_torch(module.state_dict())
    rgb = rgb_images(3, 41, seed=3)
    with torch.no_grad():
        normalized = (rgb - export.MEAN_RGB) / export.STDDEV_RGB
        expected = module(torch.from_numpy(normalized.transpose(0, 3, 1, 2).copy())).numpy()
    got = export.TFLiteModel(export.to_tflite(model, variables, 41))(rgb)
    error = float(np.abs(got - expected).max())
    print(f"tflite float32 vs torchvision mobilenet_v2 0.5 @41: max abs error {error:.2e}")
    assert expected.std() > 0.1 and error <= TOLERANCE


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
def test_stablehlo_and_onnx_have_a_symbolic_batch(fmt):
    if fmt == "onnx":
        pytest.importorskip("jax2onnx")
        pytest.importorskip("onnxruntime")
    model = MobileNetV1(num_classes=5, width=0.25)
    variables = random_variables(model, 33)
    if fmt == "stablehlo":
        call = export.load_stablehlo(export.to_stablehlo(model, variables, 33))
    else:
        call = export.ONNXModel(export.to_onnx(model, variables, 33))  # run in onnxruntime
    for batch in (1, 3):
        rgb = rgb_images(batch, 33, seed=batch)
        expected = jax_logits(model, variables, rgb)
        assert expected.std() > 0.1
        np.testing.assert_allclose(call(rgb), expected, atol=TOLERANCE)


@pytest.fixture(scope="module")
def v2_full_width_files():
    """MobileNetV2 1.0 exported in float32 and full int8 (small input: the weights do not depend on it)."""
    model = MobileNetV2(num_classes=1000, width=1.0)
    variables = random_variables(model, 32)
    calibration = [rgb_images(1, 32, seed=s) for s in range(8)]
    float_file = export.to_tflite(model, variables, 32)
    int8_file = export.to_tflite(model, variables, 32, quantize="int8", calibration=calibration)
    return float_file, int8_file


COMPUTE_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUM", "MEAN"}


@pytest.mark.slow
def test_int8_graph_is_integer_per_channel_and_fused(v2_full_width_files):
    float_file, int8_file = v2_full_width_files
    assert {op["op_name"] for op in export.TFLiteModel(float_file, delegates=False).ops()} == FLOAT_OPS
    model = export.TFLiteModel(int8_file, delegates=False)
    ops = model.ops()
    names = [op["op_name"] for op in ops]
    assert not set(names) & {"RELU", "RELU6", "MINIMUM", "MAXIMUM", "BATCH_NORM", "RSQRT", "DIV"}  # all fused
    graph_output = model.output["index"]
    for op in ops:
        if op["op_name"] in COMPUTE_OPS:
            assert model.tensor(op["inputs"][0])["dtype"] == np.int8, op
        if op["op_name"] == "DEQUANTIZE":  # only to hand float logits out, never inside the graph
            assert list(op["outputs"]) == [graph_output], op
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            weights = model.tensor(op["inputs"][1])
            channels = weights["shape"][0] if op["op_name"] == "CONV_2D" else weights["shape"][-1]
            assert weights["dtype"] == np.int8 and len(weights["quantization_parameters"]["scales"]) == channels
    assert (
        names.count("CONV_2D") == 1 + 16 + 17 + 1 and names.count("DEPTHWISE_CONV_2D") == 17
    )  # stem, expansions, projections, last
    ratio = len(int8_file) / len(float_file)
    print(f"MobileNetV2 1.0: float32 {len(float_file) / 1e6:.2f} MB, int8 {len(int8_file) / 1e6:.2f} MB ({ratio:.2f})")
    assert 0.2 < ratio < 0.32


# Float graph: the input normalisation (SUB, MUL), then only folded, fused compute ops.
FLOAT_OPS = {"SUB", "MUL", "PAD", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUM", "FULLY_CONNECTED"}


def assert_int8_close(got, expected, share=0.02, agreement=0.9):
    """int8 logits within ``share`` of the float logits' range, and the same top-1 on most images.

    Measured on the 16-px MobileNetV1 below: 0.18% of the range (the output's own int8 step is
    ~0.2%), top-1 agreement 100% on 32 images, for float32 and int8 inputs/outputs alike.
    """
    spread = float(expected.max() - expected.min())
    error = float(np.abs(got - expected).max())
    agree = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
    print(f"int8: max abs error {error:.4f} = {error / spread:.2%} of the logit range, top-1 agreement {agree:.0%}")
    assert spread > 0.5 and error <= share * spread and agree >= agreement


def test_mobilenet_v3_exports_hard_swish_and_squeeze_excitation_in_int8():
    """MobileNetV3-Small: float32 LiteRT equals JAX; the int8 file (the export command's recipe) runs hard-swish
    as LiteRT's HARD_SWISH op and the squeeze-excitations in int8, and dequantizes only its output."""
    model = MobileNetV3(num_classes=10, variant="small", width=0.75)
    variables = random_variables(model, 32)
    rgb = rgb_images(16, 32, seed=7)
    expected = jax_logits(model, variables, rgb)
    float_model = export.TFLiteModel(export.to_tflite(model, variables, 32), delegates=False)
    error = float(np.abs(float_model(rgb) - expected).max())
    print(f"tflite float32 MobileNetV3-Small 0.75 @32: max abs error {error:.2e}")
    assert expected.std() > 0.1 and error <= TOLERANCE
    # Hard-swish after the stem, the expansions and depthwise layers of blocks 3-10, the last conv and head_fc.
    hard_swish = 1 + 2 * 8 + 1 + 1
    assert [op["op_name"] for op in float_model.ops()].count("HARD_SWISH") == hard_swish
    data = export.to_int8_tflite(model, variables, 32, "float32", rgb_images(64, 32, seed=8))
    int8 = export.TFLiteModel(data, delegates=False)
    ops = int8.ops()
    names = [op["op_name"] for op in ops]
    assert names.count("HARD_SWISH") == hard_swish and "LOGISTIC" not in names
    assert names.count("DEQUANTIZE") == 1
    for op in ops:
        if op["op_name"] in COMPUTE_OPS | {"HARD_SWISH", "MUL"}:  # MUL: the excitations' scaling
            assert int8.tensor(op["inputs"][0])["dtype"] == np.int8, op
        if op["op_name"] == "DEQUANTIZE":
            assert list(op["outputs"]) == [int8.output["index"]], op
    assert_int8_close(int8(rgb), expected)  # measured: 0.71% of the logit range, top-1 100%


def test_mobilenet_v4_int8_file_gets_the_chosen_ranges_of_its_layer_after_the_pooling():
    """The export recipe writes its chosen (percentile) ranges into the file; MobileNetV4's head_fc is the first
    FULLY_CONNECTED op, whose output must carry head_fc's range, and the file stays close to JAX."""
    from mobilenet_jax.compression import quantization
    from mobilenet_jax.deployment import int8

    network = MobileNetV4(variant="conv_small", width=0.5).network()  # its first 8 blocks: a quicker conversion
    model = MobileNetV4(num_classes=10, network_table=network._replace(blocks=network.blocks[:8]))
    variables = random_variables(model, 32)
    calibration = rgb_images(64, 32, seed=8)
    prepared = int8.prepare(model, variables, export.IMAGENET, calibration, int8.Recipe())
    assert "head_fc" in prepared.ranges
    tflite = export.TFLiteModel(export.to_int8_tflite(model, variables, 32, "float32", calibration), delegates=False)
    dense = [op for op in tflite.ops() if op["op_name"] == "FULLY_CONNECTED"]
    scale = tflite.tensor(dense[0]["outputs"][0])["quantization_parameters"]["scales"][0]
    expected_scale, _ = quantization.nudged_range(*prepared.ranges["head_fc"])
    assert scale == pytest.approx(float(expected_scale), rel=1e-6)
    rgb = rgb_images(16, 32, seed=9)
    assert_int8_close(tflite(rgb), jax_logits(model, variables, rgb))  # measured: 1.5% of the logit range, top-1 100%


@pytest.mark.parametrize("io_dtype", ["float32", "int8"])
def test_int8_logits_match_the_jax_model(io_dtype):
    model = MobileNetV1(num_classes=4, width=0.25)
    variables = random_variables(model, 16)
    calibration = [rgb_images(1, 16, seed=s) for s in range(16)]
    data = export.to_tflite(model, variables, 16, quantize="int8", io_dtype=io_dtype, calibration=calibration)
    tflite = export.TFLiteModel(data)
    assert tflite.input["dtype"] == tflite.output["dtype"] == np.dtype(io_dtype)
    rgb = rgb_images(32, 16, seed=100)  # not the calibration images
    assert_int8_close(tflite(rgb), jax_logits(model, variables, rgb))  # (de)quantized by the wrapper for int8 io


def test_float_and_dynamic_graphs_and_bad_requests(tmp_path):
    model = MobileNetV1(num_classes=4, width=0.25)
    variables = random_variables(model, 16)
    rgb = rgb_images(8, 16, seed=5)
    expected = jax_logits(model, variables, rgb)
    float_file = export.TFLiteModel(export.to_tflite(model, variables, 16), delegates=False)
    assert {op["op_name"] for op in float_file.ops()} == FLOAT_OPS - {"ADD"}  # V1: no residual adds
    dynamic = export.TFLiteModel(export.to_tflite(model, variables, 16, quantize="dynamic"), delegates=False)
    weights = [dynamic.tensor(op["inputs"][1]) for op in dynamic.ops() if op["op_name"] == "CONV_2D"]
    largest = max(weights, key=lambda w: np.prod(w["shape"]))  # the converter leaves tiny tensors in float
    assert largest["dtype"] == np.int8 and dynamic.input["dtype"] == np.float32
    # int8 weights, float activations: closer than full int8, not float32's 1e-4.
    assert_int8_close(dynamic(rgb), expected, share=0.01, agreement=1.0)
    with pytest.raises(UserError, match="--io_dtype int8 needs --quantize int8"):
        export.to_tflite(model, variables, 16, io_dtype="int8")
    with pytest.raises(UserError, match="--quantize must be one of"):
        export.to_tflite(model, variables, 16, quantize="int4")
    with pytest.raises(UserError, match="--format must be one of"):
        export.export(str(tmp_path), str(tmp_path / "m.pb"), fmt="tensorflow")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no model.json"):
        export.export(str(empty), str(tmp_path / "m.tflite"))
    checkpoint.save_model(tmp_path / "model", model, variables)
    dataset = export.int8.Recipe(calibration="dataset")
    with pytest.raises(UserError, match="--calibration dataset needs --config naming the training dataset"):
        export.export(str(tmp_path / "model"), str(tmp_path / "m.tflite"), quantize="int8", recipe=dataset)
    with pytest.raises(UserError, match="--ranges must be one of"):
        export.export(str(tmp_path / "model"), "m", quantize="int8", recipe=dataset._replace(ranges="kl"))


def test_int8_export_without_data_calibrates_on_synthetic_images(tmp_path):
    """A model directory has no dataset: int8 export synthesizes calibration images from its BatchNorm statistics
    (bias correction and percentile ranges on them) and stays close to the float model."""
    model = MobileNetV1(num_classes=4, width=0.25)
    variables = random_variables(model, 16)
    checkpoint.save_model(tmp_path / "model", model, variables)
    report = export.export(str(tmp_path / "model"), str(tmp_path / "m.tflite"), quantize="int8", image_size=16)
    assert "32 synthetic calibration images" in report and "bias_correction True" in report, report
    rgb = rgb_images(32, 16, seed=100)
    assert_int8_close(export.TFLiteModel(str(tmp_path / "m.tflite"))(rgb), jax_logits(model, variables, rgb))


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[export\]'"):
        export.TFLiteModel(b"")


@pytest.mark.slow
def test_export_and_evaluate_cli_on_a_training_workdir(tmp_path, image_folder, capfd):
    """A workdir remembers its config: export --quantize int8 and evaluate need no --config."""
    from mobilenet_jax.training import loop as training
    from tests.test_reliability import config_for

    run = tmp_path / "run"
    training.train_and_evaluate(config_for(image_folder, num_train_steps=2, checkpoint_every_steps=1), str(run))
    assert checkpoint.read_config(run).data_dir == str(image_folder)

    def cli(*args):
        env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
        return subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=600, env=env
        )

    out = tmp_path / "int8.tflite"
    # export as its command calls it without --config (config=None; .ci/run runs the command itself), then
    # evaluate's command line.
    capfd.readouterr()
    message = export.export(str(run), str(out), quantize="int8")
    assert message.startswith(f"Wrote {out}") and "32x32" in message and "dataset calibration" in message, message
    printed = capfd.readouterr()  # the converter's own lines are held (host.native_output_held)
    assert "fully_quantize" not in printed.out + printed.err, printed
    result = cli("mobilenet_jax.evaluate", "--workdir", str(run), "--tflite", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    # TensorFlow loaded quietly (the tests' own TF_CPP_MIN_LOG_LEVEL is not passed on): no oneDNN/CPU notices.
    notices = [line for line in result.stderr.splitlines() if "oneDNN" in line or line.startswith("I0000")]
    assert not notices and "XNNPACK delegate" not in result.stderr, result.stderr  # nor the interpreter's
    agreement = float(result.stdout.split("top-1 agreement ")[1].split("%")[0])
    assert "over 20 images | tflite: top-1" in result.stdout and agreement >= 90.0, result.stdout
    # --step and --weights live pick that checkpoint's live weights (not the newest EMA ones).
    export.export(str(run), str(tmp_path / "step1.tflite"), step=1, weights="live")
    state = checkpoint.TrainCheckpoints(str(run), read_only=True).restore_weights(1)
    model = checkpoint.read_model_record(str(run))
    rgb = rgb_images(4, 32, seed=9)
    expected = jax_logits(model, {"params": state["params"], "batch_stats": state["batch_stats"]}, rgb)
    newest_ema = jax_logits(*checkpoint.load_any(str(run)), rgb)
    got = export.TFLiteModel(str(tmp_path / "step1.tflite"))(rgb)
    assert np.abs(got - expected).max() <= TOLERANCE < np.abs(newest_ema - expected).max()
