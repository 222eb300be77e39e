"""Export to LiteRT (``.tflite``, float32, full int8 or dynamic-range int8) and to StableHLO.

    python -m mobilenet_jax.export SOURCE OUT.tflite [--quantize none|int8|dynamic] [--io_dtype float32|int8]
    python -m mobilenet_jax.export SOURCE OUT.tflite --quantize int8 --config configs/v1.py:quickstart
    python -m mobilenet_jax.export SOURCE OUT.stablehlo --format stablehlo   # jax.export, symbolic batch
    python -m mobilenet_jax.export SOURCE OUT.onnx --format onnx             # jax2onnx, symbolic batch

SOURCE is a training workdir (its newest good checkpoint, or ``--step N``; the EMA
weights unless ``--weights live``) or a model directory from ``python -m
mobilenet_jax.weights.convert``. A workdir's ``config.json`` supplies the dataset (int8
calibration) and image size; ``--config`` replaces it.

The exported graph is the model itself in its inference form (``models.fold``):
every BatchNorm folded into the convolution before it (``w * gamma / sqrt(var + eps)``
and a bias), so the LiteRT converter sees convolution + bias + ReLU6 and fuses them
into one op. The input normalisation is part of the graph: the ``.tflite`` file takes
batch-1 NHWC RGB images on the 0..255 scale (float32, or int8 with ``--io_dtype
int8``) and returns logits.

Path: ``jax2tf`` -> a TensorFlow SavedModel -> the LiteRT converter. Full-integer
int8 uses the converter's representative dataset, calibrated on training images
through the evaluation preprocessing, rather than the AI Edge Quantizer: it needs
no package beyond TensorFlow (already a dependency), and its static int8 recipe
quantizes convolution and depthwise weights per output channel, the scheme that
keeps MobileNets with depthwise layers accurate.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobilenet_jax import cli, errors, host
from mobilenet_jax.compression import qat
from mobilenet_jax.data.preprocessing import IMAGENET, Preprocessing
from mobilenet_jax.deployment import int8, tflite_ranges
from mobilenet_jax.models.fold import fold_batchnorm

QUANTIZE = ("none", "int8", "dynamic")
FORMATS = ("tflite", "stablehlo", "onnx")
# The training pipeline's normalisation, applied inside the exported graph unless a model records another.
MEAN_RGB = np.array(IMAGENET.mean_rgb, np.float32)
STDDEV_RGB = np.array(IMAGENET.stddev_rgb, np.float32)


# ----------------------------------------------------------------------------- the folded inference graph


def inference_function(
    model: nn.Module, variables: dict, preprocessing: Preprocessing | None = None
) -> Callable[[jax.Array], jax.Array]:
    """``images (N, H, W, 3) RGB 0..255 -> logits``: normalisation, then the model's BatchNorm-folded form
    (``model`` itself when it is folded already).

    ``preprocessing`` (a model directory's ``preprocessing.json``, e.g. Keras weights'
    [-1, 1] scaling) replaces the ImageNet normalisation of the training pipeline.
    """
    preprocessing = preprocessing or IMAGENET
    if model.num_classes is None:
        raise errors.UserError("Export needs a model with a classifier (num_classes is None).")
    if getattr(model, "folded", False):  # already the inference form (deployment.int8.prepare)
        folded, folded_variables = model, variables
    else:
        folded, folded_variables = fold_batchnorm(model.clone(dtype=jnp.float32, param_dtype=jnp.float32), variables)
    folded_variables = jax.tree.map(jnp.asarray, folded_variables)

    def forward(images):
        return folded.apply(folded_variables, preprocessing.normalize(images.astype(jnp.float32)), train=False)

    return forward


# ----------------------------------------------------------------------------- LiteRT


def _require(module: str, extra: str = "export"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise errors.UserError(f"This needs {module.split('.')[0]}: pip install -e '.[{extra}]'.") from None


def to_tflite(
    model: nn.Module,
    variables: dict,
    image_size: int,
    quantize: str = "none",
    io_dtype: str = "float32",
    calibration: Iterable[np.ndarray] | None = None,
    saved_model_dir: str | None = None,
    preprocessing: Preprocessing | None = None,
) -> bytes:
    """The ``.tflite`` flatbuffer of the model at batch 1 and ``image_size`` (see the module docstring).

    ``calibration`` yields RGB 0..255 images of shape ``(1, H, W, 3)`` for ``quantize='int8'``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        converter = tflite_converter(
            model,
            variables,
            image_size,
            saved_model_dir or os.path.join(scratch, "saved_model"),
            quantize,
            io_dtype,
            calibration,
            preprocessing,
        )
        with host.native_output_held():  # the converter's log lines, shown only if it fails
            return converter.convert()


def tflite_converter(
    model: nn.Module,
    variables: dict,
    image_size: int,
    saved_model_dir: str,
    quantize: str = "none",
    io_dtype: str = "float32",
    calibration: Iterable[np.ndarray] | None = None,
    preprocessing: Preprocessing | None = None,
):
    """The configured ``tf.lite.TFLiteConverter`` behind :func:`to_tflite`, reading a SavedModel it writes to
    ``saved_model_dir`` (which must outlive it): for tools such as TensorFlow's ``QuantizationDebugger``."""
    if quantize not in QUANTIZE:
        raise errors.UserError(f"--quantize must be one of {QUANTIZE}, got {quantize!r}.")
    if io_dtype not in ("float32", "int8"):
        raise errors.UserError(f"--io_dtype must be float32 or int8, got {io_dtype!r}.")
    if io_dtype == "int8" and quantize != "int8":
        raise errors.UserError("--io_dtype int8 needs --quantize int8 (a float model has float inputs).")
    if quantize == "int8" and calibration is None:
        raise errors.UserError("--quantize int8 needs calibration images: pass --config with the training dataset.")
    tf = _require("tensorflow")
    from jax.experimental import jax2tf

    forward = inference_function(model, variables, preprocessing)
    module = tf.Module()
    module.serve = tf.function(
        jax2tf.convert(forward, with_gradient=False),
        autograph=False,
        input_signature=[tf.TensorSpec((1, image_size, image_size, 3), tf.float32, name="images")],
    )
    tf.saved_model.save(module, saved_model_dir, signatures={"serving_default": module.serve})
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
        images = list(calibration)

        def representative_dataset():
            for image in images:
                yield [np.asarray(image, np.float32).reshape(1, image_size, image_size, 3)]

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_dtype == "int8":
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    return converter


class TFLiteModel:
    """A ``.tflite`` file in the LiteRT interpreter: ``model(images_rgb_0_255) -> float32 logits``.

    Quantized inputs and outputs are (de)quantized with the file's own scales.
    """

    def __init__(self, path_or_bytes: str | bytes, num_threads: int | None = None, delegates: bool = True):
        interpreter_module = _require("ai_edge_litert.interpreter")
        kind = interpreter_module.OpResolverType
        source = {"model_content": path_or_bytes} if isinstance(path_or_bytes, bytes) else {"model_path": path_or_bytes}
        with host.native_output_held():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
            self.interpreter = interpreter_module.Interpreter(
                **source,
                num_threads=num_threads,
                experimental_op_resolver_type=kind.AUTO if delegates else kind.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    @property
    def image_size(self) -> int:
        return int(self.input["shape"][1])

    def ops(self) -> list[dict]:
        return self.interpreter._get_ops_details()

    def tensor(self, index: int) -> dict:
        return self.interpreter._get_tensor_details(index, 0)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        outputs = []
        for image in np.asarray(images, np.float32):
            x = image[None]
            if self.input["dtype"] != np.float32:
                scale, zero = self.input["quantization"]
                x = np.clip(np.round(x / scale + zero), -128, 127).astype(self.input["dtype"])
            self.interpreter.set_tensor(self.input["index"], x)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output["index"])
            if self.output["dtype"] != np.float32:
                scale, zero = self.output["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            outputs.append(y[0])
        return np.stack(outputs)


def to_int8_tflite(
    model: nn.Module,
    variables: dict,
    image_size: int,
    io_dtype: str,
    images: np.ndarray,
    preprocessing: Preprocessing | None = None,
    recipe: int8.Recipe | None = None,
) -> bytes:
    """The full-integer ``.tflite`` of the model calibrated on ``images`` (RGB 0..255, (N, H, W, 3)) as
    ``recipe`` says: equalization and bias correction before conversion, chosen ranges written after."""
    recipe = (recipe or int8.Recipe()).check()
    preprocessing = preprocessing or IMAGENET
    prepared = int8.prepare(model, variables, preprocessing, np.asarray(images, np.float32), recipe)
    calibration = [image[None] for image in prepared.calibration]
    data = to_tflite(
        prepared.model, prepared.variables, image_size, "int8", io_dtype, calibration, preprocessing=preprocessing
    )
    if prepared.ranges is not None:
        data = tflite_ranges.write_ranges(data, prepared.model.network(), prepared.ranges)
    return data


# ----------------------------------------------------------------------------- StableHLO


def to_stablehlo(
    model: nn.Module, variables: dict, image_size: int, preprocessing: Preprocessing | None = None
) -> bytes:
    """A serialized ``jax.export`` artifact with a symbolic batch dimension (RGB 0..255 in, logits out)."""
    forward = inference_function(model, variables, preprocessing)
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    return jax.export.export(jax.jit(forward))(spec).serialize()


def load_stablehlo(data: bytes) -> Callable[[Any], jax.Array]:
    return jax.export.deserialize(bytearray(data)).call


# ----------------------------------------------------------------------------- ONNX


def to_onnx(model: nn.Module, variables: dict, image_size: int, preprocessing: Preprocessing | None = None) -> bytes:
    """An ONNX model (through jax2onnx) with a symbolic batch dimension: RGB 0..255 NHWC in, logits out."""
    jax2onnx = _require("jax2onnx")
    forward = inference_function(model, variables, preprocessing)
    proto = jax2onnx.to_onnx(
        forward, [("batch", image_size, image_size, 3)], model_name="mobilenet", input_names=["images"]
    )
    return proto.SerializeToString()


class ONNXModel:
    """An ONNX file in onnxruntime: ``model(images_rgb_0_255) -> logits``."""

    def __init__(self, path_or_bytes: str | bytes):
        ort = _require("onnxruntime")
        self.session = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.asarray(images, np.float32)})[0]


# ----------------------------------------------------------------------------- calibration and CLI


def training_examples(config, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` decodable training images through the evaluation preprocessing (RGB 0..255) and labels."""
    from mobilenet_jax.data import input_pipeline  # TensorFlow: only to read a dataset

    info = input_pipeline.get_dataset(config.dataset, config.data_dir, config.manual_dir)
    input_pipeline.check_split(info, config.train_split)
    dataset = input_pipeline.create_eval_dataset(
        info, config.train_split, global_batch_size=1, image_size=config.image_size, method=config.eval_preprocessing
    )
    images, labels = [], []
    for batch in dataset.take(count):
        if float(batch["mask"][0]) > 0:
            images.append(IMAGENET.denormalize(np.asarray(batch["image"])))
            labels.append(int(batch["label"][0]))
    if not images:
        raise errors.DatasetError(f"No decodable images in split {config.train_split!r}.")
    return np.concatenate(images), np.asarray(labels)


def calibration_images(config, count: int = 300) -> list[np.ndarray]:
    """``count`` training images through the evaluation preprocessing, as RGB 0..255, batch 1 each."""
    images, _ = training_examples(config, count)
    return [image[None] for image in images]


def _int8_file(model, variables, config, image_size, io_dtype, preprocessing, recipe, calibration_count):
    """``(data, how)``: the full-integer file of :func:`export` and the report's words on its calibration."""
    recipe = (recipe or int8.Recipe()).check()
    from_dataset = recipe.calibration == "dataset" or (recipe.calibration == "auto" and config is not None)
    if from_dataset and config is None:
        raise errors.UserError(
            "--calibration dataset needs --config naming the training dataset (a training workdir supplies "
            "its own); --calibration synthetic needs no data."
        )
    if from_dataset:
        images = np.concatenate(calibration_images(config, calibration_count))
    else:
        images = int8.synthetic_calibration(model, variables, preprocessing or IMAGENET, image_size, recipe)
    data = to_int8_tflite(model, variables, image_size, io_dtype, images, preprocessing, recipe)
    if qat.learned_ranges(variables) is not None:
        return data, ", the ranges learned by quantization-aware training"
    shown = ("ranges", "bias_correction", "equalize") + (() if from_dataset else ("synthetic_steps",))
    settings = recipe._asdict()
    if settings["ranges"] != "minmax" and not int8.writes_ranges(model.network(), recipe):
        settings["ranges"] = "minmax (the converter's: squeeze-excitation networks keep them)"
    return data, f", {len(images)} {'dataset' if from_dataset else 'synthetic'} calibration images, " + ", ".join(
        f"{k} {v}" for k, v in settings.items() if k in shown
    )


def export(
    source: str,
    out: str,
    *,
    fmt: str = "tflite",
    quantize: str = "none",
    io_dtype: str = "float32",
    image_size: int | None = None,
    config=None,
    weights: str = "ema",
    step: int | None = None,
    calibration_count: int = 300,
    recipe: int8.Recipe | None = None,
) -> str:
    """Writes SOURCE's model to ``out`` (a ``.tflite`` file, or a StableHLO file) and returns a one-line report.

    ``recipe`` says how int8 is calibrated (:mod:`mobilenet_jax.deployment.int8`).
    """
    from mobilenet_jax.weights import checkpoint

    if fmt not in FORMATS:
        raise errors.UserError(f"--format must be one of {FORMATS}, got {fmt!r}.")
    if os.path.isdir(out):
        raise errors.UserError(f"{out} is a directory; name the file to write.")
    model, variables = checkpoint.load_any(source, weights=weights, step=step)
    if config is None:  # a workdir remembers the config it was trained with
        config = checkpoint.read_config(source)
    image_size = image_size or (config.image_size if config is not None else 224)
    if image_size < 8:
        raise errors.UserError(f"--image_size must be at least 8 pixels, got {image_size}.")
    preprocessing = checkpoint.read_preprocessing(source)
    if fmt in ("stablehlo", "onnx"):
        if quantize != "none" or io_dtype != "float32":
            raise errors.UserError(f"--format {fmt} exports float32 only; drop --quantize and --io_dtype.")
        data = (to_stablehlo if fmt == "stablehlo" else to_onnx)(model, variables, image_size, preprocessing)
    else:
        how = ""
        if quantize == "int8":
            data, how = _int8_file(
                model, variables, config, image_size, io_dtype, preprocessing, recipe, calibration_count
            )
        else:
            data = to_tflite(model, variables, image_size, quantize, io_dtype, preprocessing=preprocessing)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as f:
        f.write(data)
    return f"Wrote {out} ({fmt}, quantize {quantize}, {image_size}x{image_size}, {len(data) / 1e6:.2f} MB{how})"


def main(argv: list[str]) -> None:
    from absl import flags

    from mobilenet_jax import host

    FLAGS = flags.FLAGS
    cli.quiet_logging()
    if len(argv) != 3:
        cli.exit_with("usage: python -m mobilenet_jax.export SOURCE OUT [--quantize ...] [--format ...].", 2)
    host.configure_cpu_allocator()

    def run() -> None:
        config = FLAGS.config
        print(
            export(
                argv[1],
                argv[2],
                fmt=FLAGS.format,
                quantize=FLAGS.quantize,
                io_dtype=FLAGS.io_dtype,
                image_size=FLAGS.image_size,
                config=config,
                weights=FLAGS.weights,
                step=FLAGS.step,
                calibration_count=FLAGS.calibration_images,
                recipe=int8.Recipe(
                    calibration=FLAGS.calibration,
                    ranges=FLAGS.ranges,
                    bias_correction=FLAGS.bias_correction,
                    equalize=FLAGS.equalize,
                    synthetic_images=FLAGS.synthetic_images,
                    synthetic_steps=FLAGS.synthetic_steps,
                ),
            )
        )

    cli.run(run)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Training config: dataset for int8 calibration, image size (default: a workdir's config.json)."
    )
    flags.DEFINE_string("format", "tflite", "tflite, stablehlo or onnx.")
    flags.DEFINE_string("quantize", "none", "none (float32), int8 (full integer) or dynamic (int8 weights).")
    flags.DEFINE_string("io_dtype", "float32", "float32 or int8 inputs and outputs (int8 needs --quantize int8).")
    flags.DEFINE_integer("image_size", None, "Input size (default: the config's image_size, else 224).")
    flags.DEFINE_enum("weights", "ema", ["ema", "live"], "Which weights of a training checkpoint to export.")
    flags.DEFINE_integer("step", None, "Export this checkpoint step of a workdir (default: the newest good one).")
    flags.DEFINE_integer("calibration_images", 300, "Training images used to calibrate int8 quantization.")
    defaults = int8.Recipe()
    flags.DEFINE_enum(
        "calibration", defaults.calibration, list(int8.CALIBRATIONS),
        "int8 calibration images: the config's dataset, images synthesized from the model's BatchNorm statistics, "
        "or auto (the dataset when a config names one).",
    )  # fmt: skip
    flags.DEFINE_enum("ranges", defaults.ranges, ["minmax", "percentile", "mse"], "int8 activation ranges.")
    flags.DEFINE_boolean("bias_correction", defaults.bias_correction, "Correct biases for int8 weights' mean shift.")
    flags.DEFINE_boolean("equalize", defaults.equalize, "Cross-layer equalization (ReLU6 becomes ReLU).")
    flags.DEFINE_integer("synthetic_images", defaults.synthetic_images, "How many synthetic calibration images.")
    flags.DEFINE_integer("synthetic_steps", defaults.synthetic_steps, "Optimization steps per synthetic batch.")


def run_command() -> None:
    """``mobilenet-jax export`` and ``python -m`` this module: its flags, then :func:`main`."""
    cli.run_absl(_define_flags, main)


if __name__ == "__main__":
    run_command()
