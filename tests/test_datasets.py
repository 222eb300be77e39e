"""The embedded shapes dataset: deterministic, and not separable by colour statistics."""

import numpy as np

from mobilenet_jax.data.datasets import shapes


def _images(count, seed, size=32):
    labels = np.arange(count) % len(shapes.CLASSES)
    images = np.stack([shapes.render(int(y), size, np.random.default_rng([seed, i])) for i, y in enumerate(labels)])
    return images, labels


def test_rendering_is_deterministic():
    a = shapes.render(3, 32, np.random.default_rng([1, 32, 7]))
    b = shapes.render(3, 32, np.random.default_rng([1, 32, 7]))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_colour_statistics_do_not_predict_the_class():
    """Nearest class centroid on per-image colour mean and spread stays near chance (10%)."""
    train, train_labels = _images(400, seed=11)
    test, test_labels = _images(400, seed=12)

    def features(images):
        pixels = images.reshape(len(images), -1, 3).astype(np.float32)
        return np.concatenate([pixels.mean(1), pixels.std(1)], axis=1)

    f_train, f_test = features(train), features(test)
    mean, std = f_train.mean(0), f_train.std(0)
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    centroids = np.stack([f_train[train_labels == c].mean(0) for c in range(len(shapes.CLASSES))])
    predictions = np.argmin(((f_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predictions == test_labels).mean() < 0.25
