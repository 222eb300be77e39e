"""How faithful is the int8 LiteRT file to the float model, on natural images?

    python benchmarks/int8_fidelity.py                                   # torchvision's ImageNet MobileNetV2
    python benchmarks/int8_fidelity.py --model timm/mobilenetv2_100.ra_in1k --images ~/photos --json out.json
    python benchmarks/int8_fidelity.py --model /tmp/quickstart --qat /tmp/quickstart_qat   # trained here

The model is a published name (``mobilenet_jax.pretrained``; its file must be in its cache),
a model directory or a training workdir. A training workdir (and no ``--images``) is measured on
its own dataset: 300 training images calibrate, the validation split evaluates, and its labels
add each file's top-1; ``--qat DIR`` adds the int8 file of a workdir fine-tuned from it with
``--config.quantization_aware=True`` (its learned ranges), against the float model and against
its own simulated int8. Otherwise the images are every ``.png``/``.jpg`` under
``--images`` (default: scikit-image's colour photos and, where Debian's
``tuxpaint-stamps-default`` is installed, its ~800 pictures of animals and objects, composited
on white). Each image is cut as the model's preprocessing says (resize, central crop); a
fixed hash of the file name puts it in the calibration set or the evaluation set, so the two
never share an image.

For each method, the int8 file (per-channel weights, int8 activations, float32 input and
output) is compared with the float JAX model on the evaluation images: top-1 agreement and
the mean over images of the correlation between the two logit vectors, and how often the
int8 output's two largest logits are equal (a tie its output scale cannot resolve), and the
agreement on the confident subset: images where the float model gives its top-1 a softmax
probability of at least 0.5. Methods:

* ``ptq``: the LiteRT converter's own post-training quantization (min/max ranges), calibrated
  on the calibration images;
* ``ptq+bc``, ``ptq+bc+percentile``: the same images with bias correction, then with
  99.99th-percentile ranges written into the file (:mod:`mobilenet_jax.deployment.int8`);
* ``synthetic``: min/max ranges from images synthesized from the model's BatchNorm statistics
  (no real data at all), then ``synthetic+bc+percentile`` (what ``export --quantize int8``
  does for a model directory without a dataset) and ``synthetic+cle+bc+percentile`` (with
  cross-layer equalization, whose ReLU6 -> ReLU change alone moves the float model);
* ``float, +-1 pixel noise``: not int8 at all, the float model on the evaluation images with
  uniform noise of at most one grey level added: how stable the float model's own top-1 is on
  these images, the scale against which int8's disagreement reads.

Anchors: the TFLite figures for MobileNetV2, PTQ 63.7 and QAT 70.9 top-1 against 71.9 float;
torchvision's QAT MobileNetV2 71.658 against 71.878.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mobilenet_jax import host  # noqa: E402

host.import_torch_before_tensorflow()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mobilenet_jax.compression import quantization  # noqa: E402
from mobilenet_jax.data.preprocessing import IMAGENET  # noqa: E402
from mobilenet_jax.deployment import export, int8  # noqa: E402
from mobilenet_jax.weights import checkpoint, pretrained  # noqa: E402

TUXPAINT = "/usr/share/tuxpaint/stamps"
CONFIDENT = 0.5  # images whose float top-1 has at least this softmax probability form the confident subset


def natural_images(folder: str | None) -> list[tuple[str, Image.Image]]:
    """``(name, RGB image)`` for every picture found, RGBA composited on white."""
    found = []
    roots = [folder] if folder else [TUXPAINT] if os.path.isdir(TUXPAINT) else []
    for root in roots:
        for directory, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if name.lower().endswith((".png", ".jpg", ".jpeg")):
                    found.append(os.path.join(directory, name))
    images = []
    for path in found:
        try:
            image = Image.open(path)
            image.load()
        except OSError:
            continue
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        images.append((path, image.convert("RGB")))
    if folder is None:
        import skimage.data

        for name in (
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "cat",
            "retina",
            "hubble_deep_field",
            "immunohistochemistry",
        ):
            images.append((f"skimage:{name}", Image.fromarray(getattr(skimage.data, name)())))
    return images


def center_crop(image: Image.Image, size: int, crop_fraction: float, interpolation: str) -> np.ndarray:
    """The evaluation cut: shorter side to ``size / crop_fraction``, then the central ``size`` square."""
    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    width, height = image.size
    scale = (size / crop_fraction) / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), resample)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.float32)


def split(images, size, inputs, calibration_share):
    calibration, evaluation = [], []
    for name, image in images:
        crop = center_crop(image, size, inputs.crop_fraction, inputs.interpolation)
        bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (calibration if bucket < calibration_share else evaluation).append(crop)
    return np.stack(calibration), np.stack(evaluation)


def compare(float_logits: np.ndarray, int8_logits: np.ndarray, labels: np.ndarray | None = None) -> dict:
    same = float_logits.argmax(-1) == int8_logits.argmax(-1)
    agreement = float(np.mean(same))
    confident = np.asarray(jax.nn.softmax(float_logits, axis=-1)).max(-1) >= CONFIDENT
    correlation = float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(float_logits, int8_logits, strict=True)]))
    top2 = np.sort(int8_logits, axis=-1)[:, -2:]
    ties = float(np.mean(top2[:, 0] == top2[:, 1]))  # the int8 output cannot tell its two best classes apart
    labelled = {} if labels is None else {"top1": float(np.mean(int8_logits.argmax(-1) == labels))}
    return {
        **labelled,
        "top1_agreement": agreement,
        "logit_correlation": correlation,
        "top1_ties": ties,
        "confident_images": int(confident.sum()),
        "top1_agreement_confident": float(np.mean(same[confident])) if confident.any() else float("nan"),
    }


def report(method: str, figures: dict) -> None:
    print(
        f"{method:28s} " + (f"top-1 {figures['top1']:.2%}, " if "top1" in figures else "") + "top-1 agreement "
        f"{figures['top1_agreement']:.2%}, "
        f"on the {figures['confident_images']} confident images {figures['top1_agreement_confident']:.2%}, "
        f"mean logit correlation {figures['logit_correlation']:.4f}, "
        f"top-2 logits tied on {figures['top1_ties']:.1%} ({figures['seconds']} s)"
    )


def dataset_images(directory: str, count: int):
    """``(calibration, evaluation, labels, size)`` from a training workdir's own dataset (its config.json): ``count``
    training images to calibrate and the validation split with its labels, as RGB 0..255."""
    from mobilenet_jax.data import input_pipeline

    config = checkpoint.read_config(directory)
    info = input_pipeline.get_dataset(config.dataset, config.data_dir, config.manual_dir)
    dataset, _ = input_pipeline.eval_dataset(config, info)
    images, labels = [], []
    for batch in dataset.as_numpy_iterator():
        keep = batch["mask"] > 0
        images.append(IMAGENET.denormalize(batch["image"][keep]))
        labels.append(batch["label"][keep])
    calibration = np.concatenate(export.calibration_images(config, count))
    return calibration, np.concatenate(images), np.concatenate(labels), config.image_size


def qat_row(directory: str, calibration, evaluation, float_logits, labels, inputs) -> dict:
    """A quantization-aware workdir's int8 file against the float model, and against its own simulated int8."""
    from mobilenet_jax.compression import qat

    model, variables = checkpoint.load_any(directory)
    if qat.learned_ranges(variables) is None:
        raise SystemExit(f"{directory} was not trained with --config.quantization_aware=True.")
    start = time.time()
    size = evaluation.shape[1]
    data = export.to_int8_tflite(model, variables, size, "float32", calibration, inputs)
    int8_logits = export.TFLiteModel(data)(evaluation)
    simulate = jax.jit(qat.QuantizationAware(model).apply)
    simulated = np.concatenate(
        [
            np.asarray(simulate(variables, IMAGENET.normalize(evaluation[i : i + 64])))
            for i in range(0, len(evaluation), 64)
        ]
    )
    row = compare(float_logits, int8_logits, labels)
    row["top1_agreement_with_qat_model"] = float(np.mean(simulated.argmax(-1) == int8_logits.argmax(-1)))
    if labels is not None:
        row["qat_model_top1"] = float(np.mean(simulated.argmax(-1) == labels))
    row["seconds"] = round(time.time() - start, 1)
    return row


def per_layer_errors(model, variables, inputs, images, recipe, evaluation) -> dict:
    """Per quantization point, the SQNR (dB) of the simulated int8 network of ``recipe`` (calibrated on ``images``)
    against the float network, accumulated and from the point's own range (``quantization.point_errors``), over
    the first 128 evaluation pictures."""
    prepared = int8.prepare(model, variables, inputs, images, recipe)
    params = jax.tree.map(jax.numpy.asarray, prepared.variables["params"])
    batches = [evaluation[i : i + 16] for i in range(0, min(len(evaluation), 128), 16)]
    return quantization.point_errors(model.network(), params, batches, inputs, prepared.ranges, model.padding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="torchvision/mobilenet_v2", help="published name, model directory or workdir"
    )
    parser.add_argument("--images", default=None, help="folder of .png/.jpg pictures (default: tuxpaint + skimage)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calibration_share", type=float, default=0.2, help="share of images used to calibrate")
    parser.add_argument("--max_images", type=int, default=0, help="use at most this many pictures (0: all)")
    parser.add_argument("--json", default=None, help="write the figures here too")
    parser.add_argument("--per_layer", action="store_true", help="also each int8 point's SQNR (simulated)")
    parser.add_argument("--synthetic_images", type=int, default=32, help="how many synthetic calibration images")
    parser.add_argument(
        "--qat", default=None, help="a workdir trained quantization-aware from --model (a workdir): adds its row"
    )
    args = parser.parse_args()

    directory = pretrained.local_source(args.model)
    model, variables = checkpoint.load_any(directory)
    inputs = checkpoint.read_preprocessing(directory) or IMAGENET
    labels = None
    if checkpoint.read_config(directory) is not None and args.images is None:  # trained here: its own dataset
        calibration, evaluation, labels, args.size = dataset_images(directory, 300)
        source = f"{checkpoint.read_config(directory).dataset} validation split"
    else:
        images = natural_images(args.images)
        if args.max_images:
            images = images[: args.max_images]
        calibration, evaluation = split(images, args.size, inputs, args.calibration_share)
        source = args.images or "tuxpaint+skimage"
    print(f"{args.model}: {len(calibration)} calibration and {len(evaluation)} evaluation images at {args.size}")

    forward = jax.jit(export.inference_function(model, variables, inputs))
    float_logits = np.concatenate([np.asarray(forward(evaluation[i : i + 32])) for i in range(0, len(evaluation), 32)])
    if labels is not None:
        print(f"float model: top-1 {np.mean(float_logits.argmax(-1) == labels):.2%}")
    start = time.time()
    synthetic = quantization.synthetic_images(model, variables, inputs, args.synthetic_images, args.size)
    print(f"{len(synthetic)} synthetic calibration images in {time.time() - start:.0f} s")
    plain = int8.Recipe(ranges="minmax", bias_correction=False)
    methods = {
        "ptq": (calibration, plain),
        "ptq+bc": (calibration, plain._replace(bias_correction=True)),
        "ptq+bc+percentile": (calibration, int8.Recipe()),
        "synthetic": (synthetic, plain),
        "synthetic+bc+percentile": (synthetic, int8.Recipe()),
        "synthetic+cle+bc+percentile": (synthetic, int8.Recipe(equalize=True)),
    }
    results = {}
    for method, (images, recipe) in methods.items():
        start = time.time()
        data = export.to_int8_tflite(model, variables, args.size, "float32", images, inputs, recipe)
        results[method] = {**compare(float_logits, export.TFLiteModel(data)(evaluation), labels), "seconds": 0.0}
        results[method]["seconds"] = round(time.time() - start, 1)
        report(method, results[method])
    noise = np.random.default_rng(0).uniform(-1, 1, evaluation.shape).astype(np.float32)
    noisy = np.clip(evaluation + noise, 0, 255)
    noisy_logits = np.concatenate([np.asarray(forward(noisy[i : i + 32])) for i in range(0, len(noisy), 32)])
    results["float, +-1 pixel noise"] = {**compare(float_logits, noisy_logits, labels), "seconds": 0.0}
    report("float, +-1 pixel noise", results["float, +-1 pixel noise"])
    if labels is not None:
        results["float"] = {**compare(float_logits, float_logits, labels), "seconds": 0.0}
    if args.qat:
        results["qat"] = qat_row(args.qat, calibration, evaluation, float_logits, labels, inputs)
        report("qat", results["qat"])
        print(
            f"qat: top-1 agreement with the simulated QAT model {results['qat']['top1_agreement_with_qat_model']:.2%}"
        )
    layers = {}
    if args.per_layer:
        for method in ("ptq+bc+percentile", "synthetic+bc+percentile"):
            layers[method] = per_layer_errors(model, variables, inputs, *methods[method], evaluation)
        print("SQNR in dB, accumulated / the point's own range:", ", ".join(layers))
        for point in layers[method]:
            print(
                f"{point:20s}",
                "  ".join(f"{e[point]['accumulated']:5.1f} / {e[point]['own']:5.1f}" for e in layers.values()),
            )
    if args.json:
        record = {
            "model": args.model,
            "images": {
                "calibration": len(calibration),
                "evaluation": len(evaluation),
                "source": source,
            },
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__},
            "results": results,
            "per_layer_sqnr_db": layers,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
