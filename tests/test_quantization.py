"""int8 without data: fake quantization against integer arithmetic, equalization, bias correction,
synthetic calibration images, and ranges written into the LiteRT file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mobilenet_jax import MobileNetV1, MobileNetV2
from mobilenet_jax.compression import quantization as Q
from mobilenet_jax.data.preprocessing import IMAGENET
from mobilenet_jax.models.fold import fold_batchnorm
from mobilenet_jax.models.mobilenet import MobileNet
from tests.test_export import random_variables, rgb_images

SMALL_V2 = MobileNetV2(num_classes=10, width=0.5, block_table=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2)))


def folded_small_v2(size=24):
    variables = random_variables(SMALL_V2, size)
    _, folded = fold_batchnorm(SMALL_V2, variables)
    return SMALL_V2.network(), jax.tree.map(jnp.asarray, folded["params"]), variables


def int8_grid(lo, hi):
    """Scale and zero point of int8 for [lo, hi] as TF nudges them, written out independently."""
    scale = (hi - lo) / 255.0
    return scale, int(np.clip(np.round(-128 - lo / scale), -128, 127))


def test_fake_quantized_layer_equals_integer_arithmetic():
    """A 1x1 layer with int8 input, per-channel int8 weights, an int32 bias and int8 output, computed in integers as
    the LiteRT kernels do, against fake quantization in float."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, (2, 5, 5, 6)).astype(np.float32)
    kernel = (rng.normal(0, 1, (1, 1, 6, 4)) * np.array([0.01, 0.1, 1.0, 3.0])).astype(np.float32)
    bias = rng.normal(0, 0.5, 4).astype(np.float32)
    (in_lo, in_hi), (out_lo, out_hi) = (-1.5, 3.0), (-6.0, 8.0)

    in_scale, in_zero = int8_grid(in_lo, in_hi)
    out_scale, out_zero = int8_grid(out_lo, out_hi)
    q_in = np.clip(np.round(x / in_scale) + in_zero, -128, 127).astype(np.int32)
    w_scale = np.abs(kernel).max(axis=(0, 1, 2)) / 127.0
    q_w = np.round(kernel[0, 0] / w_scale).astype(np.int32)
    q_bias = np.round(bias / (in_scale * w_scale)).astype(np.int32)
    accumulator = (q_in - in_zero).reshape(-1, 6) @ q_w + q_bias  # int32
    q_out = np.clip(np.round(accumulator * (in_scale * w_scale) / out_scale) + out_zero, -128, 127)
    integer = ((q_out - out_zero) * out_scale).reshape(2, 5, 5, 4)

    y = lax.conv_general_dilated(
        Q.fake_quant(jnp.asarray(x), in_lo, in_hi), Q.fake_quant_weights(jnp.asarray(kernel)), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    simulated = np.asarray(Q.fake_quant(y + bias, out_lo, out_hi))
    differs = np.abs(simulated - integer) > 1e-4
    # The int32 bias rounds by at most half of in_scale * w_scale; it moves an output across a rounding boundary rarely.
    assert differs.mean() < 0.02 and np.abs(simulated - integer).max() <= out_scale * 1.001
    assert len(np.unique(q_out)) > 50  # the grid is exercised, not saturated
    # Straight-through: gradient 1 inside the range, 0 where clipped.
    grad = jax.grad(lambda v: Q.fake_quant(v, in_lo, in_hi).sum())(jnp.asarray([-3.0, 0.3, 2.9, 4.0]))
    np.testing.assert_array_equal(np.asarray(grad), [0.0, 1.0, 1.0, 0.0])


def test_equalization_keeps_the_relu_networks_function_and_equalizes_ranges():
    network, params, _ = folded_small_v2()
    relu_network, equalized = Q.equalize(network, params)
    assert {relu_network.activation} | {block.activation for block in relu_network.blocks} == {"relu"}

    # Reference: the Flax module built from the ReLU table with the original folded parameters.
    module = MobileNet(network_table=relu_network, num_classes=10, padding=SMALL_V2.padding, folded=True)
    x = IMAGENET.normalize(rgb_images(8, 24, seed=3))
    before = np.asarray(module.apply({"params": params}, x))
    after = np.asarray(module.apply({"params": jax.tree.map(jnp.asarray, equalized)}, x))
    assert before.std() > 0.5
    np.testing.assert_allclose(after, before, atol=1e-4)

    pairs = Q.equalization_pairs(network)
    assert ("block_1/conv_pw", "block_1/conv_dw") in [(a.path, b.path) for a, b in pairs]

    def imbalance(tree):
        worst = 0.0
        for first, second in pairs:
            r1 = np.abs(np.asarray(Q.table.at(tree, first.path)["kernel"])).max(axis=(0, 1, 2))
            axis = (0, 1, 2) if second.kind == "depthwise" else (0, 1, 3)
            r2 = np.abs(np.asarray(Q.table.at(tree, second.path)["kernel"])).max(axis=axis)
            worst = max(worst, float(np.abs(np.log(r1 / r2)).max()))
        return worst

    assert imbalance(params) > 1.0 and imbalance(equalized) < 0.05


def test_bias_correction_removes_the_mean_shift_of_int8_weights():
    network, params, _ = folded_small_v2()
    images = rgb_images(16, 24, seed=4)
    corrected = Q.bias_correction(network, params, [images[:8], images[8:]], IMAGENET, SMALL_V2.padding)

    # The stem's pre-activation output, averaged over the images, computed directly.
    x = jnp.asarray(IMAGENET.normalize(images))
    stem = params["stem_conv"]
    pads = ((0, 1), (0, 1)) if SMALL_V2.padding == "tf" else ((1, 1), (1, 1))

    def mean_output(kernel, bias):
        y = lax.conv_general_dilated(x, kernel, (2, 2), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return np.asarray(jnp.mean(y + bias, axis=(0, 1, 2)))

    float_mean = mean_output(stem["kernel"], stem["bias"])
    quantized = Q.fake_quant_weights(stem["kernel"])
    shift_before = np.abs(mean_output(quantized, stem["bias"]) - float_mean).max()
    shift_after = np.abs(mean_output(quantized, corrected["stem_conv"]["bias"]) - float_mean).max()
    assert shift_before > 1e-4 and shift_after < 1e-5
    np.testing.assert_array_equal(corrected["stem_conv"]["kernel"], stem["kernel"])


def test_synthetic_images_match_the_batchnorm_statistics_they_target():
    model = MobileNetV1(num_classes=4, width=0.25)
    variables = random_variables(model, 16)
    # As in a trained model, the running statistics are those of some image distribution: here smooth coloured
    # pictures (4x4 random colours, upsampled), which uniform noise is not. Momentum 0 makes them the batch's.
    coarse = np.random.default_rng(8).uniform(30, 220, (32, 4, 4, 3)).astype(np.float32)
    pictures = np.asarray(jax.image.resize(coarse, (32, 16, 16, 3), "linear"))
    _, stats = model.clone(bn_momentum=0.0).apply(
        variables, IMAGENET.normalize(pictures), train=True, mutable=["batch_stats"]
    )
    variables = {**variables, **stats}
    synthetic = Q.synthetic_images(
        model, variables, IMAGENET, count=16, image_size=16, steps=200, batch_size=16, labels=False
    )
    assert synthetic.shape == (16, 16, 16, 3) and 0 <= synthetic.min() and synthetic.max() <= 255

    def distance(rgb):
        """ZeroQ's distance, mean over BatchNorm layers of the RMS over channels of (batch mean - running mean) and
        of (batch std - running std), over the running std; each BatchNorm's input is its convolution's output,
        which Flax's capture_intermediates records (inference mode, as the int8 model runs)."""
        _, seen = model.apply(variables, IMAGENET.normalize(rgb), capture_intermediates=True, mutable=["intermediates"])
        distances = []
        for conv in model.network().convs():
            inputs = np.asarray(Q.table.at(seen["intermediates"], conv.path)["__call__"][0], np.float64)
            running = Q.table.at(variables["batch_stats"], conv.norm)
            mean, std = np.asarray(running["mean"]), np.sqrt(np.asarray(running["var"]))
            moments = inputs.mean(axis=(0, 1, 2)), inputs.std(axis=(0, 1, 2))
            pairs = zip(moments, (mean, std), strict=True)
            distances.append(sum(np.sqrt(np.mean(((a - b) / std) ** 2)) for a, b in pairs))
        return float(np.mean(distances))

    noise = distance(rgb_images(16, 16, seed=7))
    matched = distance(synthetic)
    # The default adds a cross-entropy with random classes, which trades some of the match for class-like logits
    # (measured: 16.8 noise, 1.6 statistics only, 5.7 with classes on this 4-class model).
    with_classes = distance(Q.synthetic_images(model, variables, IMAGENET, count=16, image_size=16, steps=200))
    print(f"BatchNorm statistics distance: noise {noise:.3f}, synthetic {matched:.3f}, with classes {with_classes:.3f}")
    assert matched < 0.2 * noise and with_classes < 0.5 * noise


@pytest.mark.slow
def test_ranges_written_into_the_file_are_the_ones_the_int8_model_uses():
    pytest.importorskip("ai_edge_litert")
    from mobilenet_jax.deployment import export, tflite_ranges

    network, params, variables = folded_small_v2(size=16)
    calibration = rgb_images(16, 16, seed=11)
    data = export.to_tflite(SMALL_V2, variables, 16, "int8", calibration=[image[None] for image in calibration])
    stats = Q.observe(network, params, [calibration], IMAGENET, SMALL_V2.padding)
    rgb = rgb_images(32, 16, seed=12)

    def simulated(ranges):
        return np.asarray(Q.simulate(network, params, jnp.asarray(rgb), IMAGENET, ranges, SMALL_V2.padding))

    minmax = {point: Q.choose_range(stat) for point, stat in stats.items()}
    clipped = {point: Q.choose_range(stat, "percentile", 99.0) for point, stat in stats.items()}
    step = (minmax["logits"][1] - minmax["logits"][0]) / 255
    converted = export.TFLiteModel(data)(rgb)
    written = export.TFLiteModel(tflite_ranges.write_ranges(data, network, clipped))(rgb)
    # The converter's own file is what the simulator computes with min/max ranges, and the rewritten file is what
    # it computes with the clipped ones: within an output step or two, while the two files differ by far more.
    assert np.abs(converted - simulated(minmax)).max() <= 2.01 * step
    clipped_step = (clipped["logits"][1] - clipped["logits"][0]) / 255
    assert np.abs(written - simulated(clipped)).max() <= 2.01 * clipped_step
    assert np.abs(written - converted).max() > 5 * step

    # Per-point errors: at the logits, the simulation against the float network, and the float logits rounded to
    # their own range, written out here with NumPy.
    errors = Q.point_errors(network, params, [rgb], IMAGENET, minmax, SMALL_V2.padding)
    assert list(errors) == Q.points(network)
    exact = np.asarray(Q.graph(network, params, jnp.asarray(rgb), IMAGENET, SMALL_V2.padding))
    scale, zero_point = int8_grid(*minmax["logits"])
    rounded = (np.clip(np.round(exact / scale) + zero_point, -128, 127) - zero_point) * scale

    def decibels(noisy):
        return 10 * np.log10(np.sum(exact**2) / np.sum((noisy - exact) ** 2))

    assert errors["logits"]["own"] == pytest.approx(decibels(rounded), abs=0.01)
    assert errors["logits"]["accumulated"] == pytest.approx(decibels(simulated(minmax)), abs=0.01)
    assert errors["logits"]["accumulated"] < errors["logits"]["own"] - 3  # the error builds up through the network


@pytest.mark.slow
def test_quantization_aware_training_freezes_on_schedule_and_its_tflite_reproduces_it(tmp_path, image_folder):
    """train.py's path with --config.quantization_aware from a float model: BatchNorm statistics move for 2 steps
    and the ranges for 3, then freeze; the int8 export writes the learned ranges, and the LiteRT file computes
    what the QAT model (as evaluate loads it) computes."""
    pytest.importorskip("ai_edge_litert")
    from configs import v1
    from mobilenet_jax import evaluate
    from mobilenet_jax.compression import qat
    from mobilenet_jax.deployment import export
    from mobilenet_jax.training import loop
    from mobilenet_jax.weights import checkpoint
    from tests.test_distributed import PROFILE
    from tests.test_training import tiny

    source = MobileNetV1(num_classes=4, width=0.25, profile=PROFILE)  # the run takes its architecture
    checkpoint.save_model(tmp_path / "float", source, random_variables(source, 32))
    workdir = str(tmp_path / "qat")
    config = tiny(
        v1.get_config(), dataset="folder", data_dir=str(image_folder), init_from=str(tmp_path / "float"),
        quantization_aware=True, num_train_steps=4, checkpoint_every_steps=1, keep_checkpoints=4,
        qat_freeze_bn_epochs=0.25, qat_freeze_ranges_epochs=0.375,  # 8 steps per epoch: steps 2 and 3
    )  # fmt: skip
    _, results = loop.train_and_evaluate(config, workdir)
    manager = checkpoint.TrainCheckpoints(workdir, read_only=True)
    states = {step: manager.restore_weights(step)["batch_stats"] for step in (1, 2, 3, 4)}
    manager.close()

    def bn(step):
        return np.asarray(states[step]["block_3"]["bn_pw"]["mean"])

    def ranges(step):
        return np.stack([np.asarray(v) for v in states[step][qat.KEY]["ranges"].values()])

    assert [float(states[s][qat.KEY]["steps"]) for s in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert not np.allclose(bn(1), bn(2)) and np.array_equal(bn(2), bn(3)) and np.array_equal(bn(3), bn(4))
    assert not np.allclose(ranges(2), ranges(3)) and np.array_equal(ranges(3), ranges(4))
    assert set(qat.learned_ranges({"batch_stats": states[4]})) == set(Q.points(source.network()))

    report = export.export(workdir, str(tmp_path / "qat.tflite"), quantize="int8")
    assert "ranges learned by quantization-aware training" in report, report
    model, variables = evaluate.load_weights(config, workdir=workdir)
    assert isinstance(model, qat.QuantizationAware)
    rgb = rgb_images(32, 32, seed=21)
    simulated = np.asarray(jax.jit(model.apply)(variables, IMAGENET.normalize(jnp.asarray(rgb))))
    # The QAT model in inference is the LiteRT simulator (tested against integer arithmetic and the converter's
    # file above) run on the BatchNorm-folded weights with the learned ranges.
    _, folded = fold_batchnorm(source, qat.strip(variables))
    reference = Q.simulate(
        source.network(), folded["params"], jnp.asarray(rgb), IMAGENET, qat.learned_ranges(variables), source.padding
    )
    np.testing.assert_allclose(simulated, np.asarray(reference), atol=1e-4)
    low, high = qat.learned_ranges(variables)["logits"]
    step = (high - low) / 255  # one int8 step of the logits
    learned = qat.learned_ranges(variables)
    file = export.TFLiteModel(str(tmp_path / "qat.tflite"), delegates=False)
    convs = [op for op in file.ops() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    conv_points = [p for p in Q.points(source.network()) if p not in ("input", "normalized", "pool", "logits")]
    assert len(convs) == len(conv_points)  # V1: no residual adds
    for point, op in zip(conv_points, convs, strict=True):  # the file holds the learned ranges, not calibrated ones
        scale = file.tensor(op["outputs"][0])["quantization_parameters"]["scales"][0]
        assert scale == pytest.approx(float(Q.nudged_range(*learned[point])[0]), rel=1e-6), point
    tflite = file(rgb)
    print(f"QAT: tflite vs simulated int8 max {np.abs(tflite - simulated).max() / step:.2f} logit steps")
    assert np.abs(tflite - simulated).max() <= 2.01 * step
    assert np.mean(tflite.argmax(-1) == simulated.argmax(-1)) >= 0.95
    assert results["validation"]["examples"] == 20
