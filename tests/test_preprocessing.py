"""The preprocessing value type: arithmetic against hand-computed values, records, errors, and TF-free imports."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mobilenet_jax.data import preprocessing
from mobilenet_jax.data.preprocessing import IMAGENET, KERAS, Preprocessing, PreprocessingError


def test_normalisation_and_the_affine_between_two_of_them():
    rgb = np.array([[0.0, 127.5, 255.0]], np.float32)
    # torchvision's numbers: (x / 255 - mean) / std with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
    expected = (rgb / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(IMAGENET.normalize(rgb), expected, rtol=1e-6)
    np.testing.assert_allclose(KERAS.normalize(rgb), [[-1.0, 0.0, 1.0]])
    np.testing.assert_allclose(IMAGENET.denormalize(IMAGENET.normalize(rgb)), rgb, atol=1e-4)
    scale, shift = KERAS.affine_from(IMAGENET)  # pipeline images -> Keras inputs
    np.testing.assert_allclose(IMAGENET.normalize(rgb) * scale + shift, KERAS.normalize(rgb), atol=1e-5)
    assert IMAGENET.affine_from(Preprocessing(eval_crop="torchvision")) is None  # same normalisation


def test_records_round_trip_and_old_files_still_read(tmp_path):
    timm = preprocessing.TIMM
    timm.write(tmp_path)
    assert preprocessing.read(tmp_path) == timm
    # A record written before crop_fraction existed (the Keras converter's of the previous release).
    old = {"mean_rgb": [127.5] * 3, "stddev_rgb": [127.5] * 3, "eval_preprocessing": "center_crop"}
    (tmp_path / "preprocessing.json").write_text(json.dumps(old))
    assert preprocessing.read(tmp_path) == KERAS
    assert preprocessing.read(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "record, message",
    [
        ({"mean_rgb": [1, 2], "stddev_rgb": [1, 1, 1]}, "three means and three positive standard deviations"),
        ({"mean_rgb": [0] * 3, "stddev_rgb": [1, 0, 1]}, "three means and three positive standard deviations"),
        ({"mean_rgb": [0] * 3, "stddev_rgb": [1] * 3, "interpolation": "nearest"}, "interpolation must be one of"),
        ({"mean_rgb": [0] * 3, "stddev_rgb": [1] * 3, "eval_preprocessing": "random"}, "eval_crop must be one of"),
        ({"mean_rgb": [0] * 3, "stddev_rgb": [1] * 3, "scale": 2}, r"Unknown preprocessing field\(s\) \['scale'\]"),
        ({"stddev_rgb": [1] * 3}, "needs mean_rgb and stddev_rgb"),
    ],
)
def test_bad_records_are_one_sentence_naming_the_file(tmp_path, record, message):
    (tmp_path / "preprocessing.json").write_text(json.dumps(record))
    with pytest.raises(PreprocessingError, match=message) as error:
        preprocessing.read(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_models_converters_train_step_and_stablehlo_export_do_not_import_tensorflow():
    code = (
        "import sys\n"
        "import mobilenet_jax, mobilenet_jax.models, mobilenet_jax.weights.convert\n"
        "import mobilenet_jax.weights.convert_keras\n"
        "import mobilenet_jax.training.steps, mobilenet_jax.compression.distill, mobilenet_jax.compression.prune\n"
        "import mobilenet_jax.deployment.export, mobilenet_jax.weights.checkpoint, mobilenet_jax.evaluate\n"
        "import mobilenet_jax.summary, mobilenet_jax.convert, mobilenet_jax.prune, mobilenet_jax.export\n"
        "from mobilenet_jax import export, MobileNetV1\n"
        "import jax, jax.numpy as jnp\n"
        "model = MobileNetV1(num_classes=3, width=0.25)\n"
        "variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))\n"
        "export.to_stablehlo(model, variables, 16)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'tf_keras')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
