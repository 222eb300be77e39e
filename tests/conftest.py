"""Test set-up shared by all tests (torch, when installed, is imported before TensorFlow)."""

import gc
import os
import shutil
import tempfile

# Fewer full garbage collections: a worker holds millions of objects (JAX, TensorFlow, torch), and each
# full collection walks them all (test_models.py + test_structure.py: 156 s -> 144 s on 2 cores).
gc.set_threshold(50_000, 20, 100)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA cache for this test run, shared by the xdist workers and the
# processes the tests start: many tests compile the same tiny train step, and a run
# that starts from an empty directory still checks that compiling works.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # the controlling process sets it; workers inherit
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mobilenet_jax_tests_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from mobilenet_jax import host  # noqa: E402

host.import_torch_before_tensorflow()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

CLASSES = ("circle", "square", "star", "t_shape")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """ROOT/{train,validation}/CLASS/*.jpg with shapes images, and one undecodable validation file.

    train: 4 classes x 16 images; validation: 4 x 5 images + 1 broken file (21 entries).
    """
    from PIL import Image

    from mobilenet_jax.data.datasets import shapes

    root = tmp_path_factory.mktemp("folder")
    for split, count in (("train", 16), ("validation", 5)):
        for name in CLASSES:
            directory = root / split / name
            directory.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([len(split), shapes.CLASSES.index(name), i])
                pixels = shapes.render(shapes.CLASSES.index(name), 40 + (i % 3) * 8, rng)
                Image.fromarray(pixels).save(directory / f"{i}.jpg", quality=90)
    (root / "validation" / "circle" / "broken.jpg").write_bytes(b"this is not an image at all")
    return root


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
