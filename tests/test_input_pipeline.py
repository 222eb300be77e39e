"""tf.data input functions: shapes, ranges, normalisation, crops, determinism, padding, bad images."""

import io
import itertools

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mobilenet_jax.data import input_pipeline as ip


def encode(pixels: np.ndarray, fmt: str = "JPEG") -> tf.Tensor:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=95)
    return tf.constant(buffer.getvalue())


@pytest.fixture(scope="module")
def gradient_image():
    """A 60x90 image whose red channel encodes the column and green the row."""
    rows, cols = np.mgrid[0:60, 0:90]
    pixels = np.stack([cols * 255 // 89, rows * 255 // 59, np.full_like(rows, 128)], -1).astype(np.uint8)
    return pixels


def test_normalize_uses_imagenet_statistics():
    image = tf.constant(np.array(ip.MEAN_RGB, np.float32).reshape(1, 1, 3))
    np.testing.assert_allclose(ip.normalize(image).numpy(), 0.0, atol=1e-6)
    white = ip.normalize(tf.fill([1, 1, 3], 255.0)).numpy().ravel()
    np.testing.assert_allclose(white, (255 - np.array(ip.MEAN_RGB)) / np.array(ip.STDDEV_RGB), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_random_resized_crop_shape_range_and_determinism(gradient_image, fmt):
    encoded = encode(gradient_image, fmt)
    seed = tf.constant([3, 7], tf.int64)
    a = ip.random_resized_crop(encoded, seed, 32).numpy()
    b = ip.random_resized_crop(encoded, seed, 32).numpy()
    c = ip.random_resized_crop(encoded, tf.constant([4, 7], tf.int64), 32).numpy()
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 255
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_resized_crop_respects_the_area_range(gradient_image):
    encoded = encode(gradient_image, "PNG")
    for seed in range(20):
        image = ip.random_resized_crop(encoded, tf.constant([seed, 0], tf.int64), 16, area_range=(0.9, 1.0)).numpy()
        # The red channel spans the columns seen: nearly the full width at >= 90% area.
        assert image[..., 0].max() - image[..., 0].min() > 0.8 * 255


def test_center_crop_takes_the_central_875(gradient_image):
    image = ip.center_crop(encode(gradient_image, "PNG"), 28).numpy()
    assert image.shape == (28, 28, 3)
    crop = int(0.875 * 60)  # of the shorter side, centred
    expected_cols = (90 - crop + 1) // 2, (90 - crop + 1) // 2 + crop - 1
    red_seen = image[..., 0].min(), image[..., 0].max()
    assert abs(red_seen[0] - expected_cols[0] * 255 / 89) < 8 and abs(red_seen[1] - expected_cols[1] * 255 / 89) < 8


def test_torchvision_eval_resizes_then_crops(gradient_image):
    image = ip.resize_then_center_crop(encode(gradient_image, "PNG"), 32, resize_size=40).numpy()
    assert image.shape == (32, 32, 3)
    # 60x90 -> 40x60, centre 32x32: columns 14..45 of 60, i.e. 21%..76% of the width.
    assert abs(image[..., 0].min() / 255 - 14 / 60) < 0.06 and abs(image[..., 0].max() / 255 - 46 / 60) < 0.06


def test_same_result_eagerly_and_inside_tf_data(gradient_image):
    encoded = encode(gradient_image)
    seed = tf.constant([1, 2], tf.int64)
    eager = ip.preprocess_train(encoded, 3, seed, 24, (0.3, 1.0))
    ds = tf.data.Dataset.from_tensors((encoded, 3, seed)).map(
        lambda e, label, s: ip.preprocess_train(e, label, s, 24, (0.3, 1.0))
    )
    graph = next(iter(ds))
    for key in ("image", "label", "mask"):
        np.testing.assert_allclose(eager[key].numpy(), graph[key].numpy(), atol=1e-5)
    eval_eager = ip.preprocess_eval(encoded, 3, 24)
    eval_graph = next(iter(tf.data.Dataset.from_tensors(encoded).map(lambda e: ip.preprocess_eval(e, 3, 24))))
    np.testing.assert_allclose(eval_eager["image"].numpy(), eval_graph["image"].numpy(), atol=1e-5)


def test_undecodable_bytes_become_a_masked_blank_example():
    example = ip.preprocess_train(tf.constant(b"garbage bytes"), 1, tf.constant([0, 0], tf.int64), 16, (0.08, 1.0))
    assert float(example["mask"]) == 0.0 and example["image"].shape == (16, 16, 3)
    assert float(ip.preprocess_eval(tf.constant(b"GIF"), 1, 16)["mask"]) == 0.0


def test_folder_dataset_eval_covers_the_whole_split_with_padding(image_folder):
    info = ip.get_dataset("folder", str(image_folder))
    assert info.num_classes == 4
    assert ip.num_examples(info, "validation") == 21
    batches = list(ip.create_eval_dataset(info, "validation", global_batch_size=8, image_size=16))
    assert len(batches) == 3  # 21 entries -> 8 + 8 + 5 padded to 8
    masks = np.concatenate([b["mask"].numpy() for b in batches])
    assert masks.sum() == 20  # the broken file is counted out, not a crash
    assert masks[-3:].sum() == 0


def test_eval_split_over_processes_stays_in_lockstep(image_folder):
    info = ip.get_dataset("folder", str(image_folder))
    parts = [
        list(
            ip.create_eval_dataset(
                info, "validation", global_batch_size=8, image_size=16, process_index=i, process_count=2
            )
        )
        for i in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == ip.eval_batches(info, "validation", 8, 2)
    assert sum(float(b["mask"].numpy().sum()) for p in parts for b in p) == 20


def test_train_stream_is_the_same_for_any_process_count_and_resumes_exactly(image_folder):
    info = ip.get_dataset("folder", str(image_folder))
    kwargs = dict(global_batch_size=8, image_size=16, seed=5, area_range=(0.5, 1.0), shuffle_buffer_size=64)
    one = list(itertools.islice(ip.create_train_dataset(info, "train", **kwargs), 12))
    two = [
        list(itertools.islice(ip.create_train_dataset(info, "train", process_index=i, process_count=2, **kwargs), 12))
        for i in range(2)
    ]
    for step in range(12):
        whole = one[step]["image"].numpy()
        halves = np.concatenate([two[0][step]["image"].numpy(), two[1][step]["image"].numpy()])
        # The same examples with the same augmentations, grouped per process.
        order = lambda x: np.argsort(x.reshape(len(x), -1).sum(1))  # noqa: E731
        np.testing.assert_allclose(whole[order(whole)], halves[order(halves)], atol=1e-4)
    resumed = list(itertools.islice(ip.create_train_dataset(info, "train", start_step=8, **kwargs), 4))
    for step in range(4):
        np.testing.assert_array_equal(resumed[step]["image"].numpy(), one[8 + step]["image"].numpy())
    # Epochs are reshuffled: 64 images / 8 = 8 steps per epoch.
    assert not np.array_equal(one[0]["label"].numpy(), one[8]["label"].numpy()) or not np.array_equal(
        one[1]["label"].numpy(), one[9]["label"].numpy()
    )
    # A global TensorFlow seed (keras.utils.set_random_seed(0) in a user's script) changes nothing.
    from tensorflow.python.eager import context

    tf.random.set_seed(0)
    try:
        seeded = list(itertools.islice(ip.create_train_dataset(info, "train", **kwargs), 2))
        assert context.global_seed() == 0  # set again afterwards
    finally:
        tf.random.set_seed(None)
    for step in range(2):
        np.testing.assert_array_equal(seeded[step]["image"].numpy(), one[step]["image"].numpy())


def test_unknown_dataset_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(ip.DatasetError, match="Unknown dataset 'no_such_dataset'"):
        ip.get_dataset("no_such_dataset")
    with pytest.raises(ip.DatasetError, match="needs data_dir"):
        ip.get_dataset("folder", str(tmp_path / "missing"))
    with pytest.raises(ip.DatasetError, match="has no split folders; expected ROOT/train/CLASS"):
        ip.get_dataset("folder", str(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ip.DatasetError, match="holds no images"):
        ip.get_dataset("folder", str(tmp_path))


def test_folder_without_the_configured_split_names_the_folder(image_folder, tmp_path):
    import shutil

    shutil.copytree(image_folder / "validation", tmp_path / "validation")
    info = ip.get_dataset("folder", str(tmp_path))
    ip.check_split(info, "validation")
    with pytest.raises(ip.DatasetError, match=r"has no train/ folder \(it has validation/\)"):
        ip.check_split(info, "train")


def test_unprepared_imagenet_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ip.DatasetError, match="not prepared.*manual download directory"):
        ip.get_dataset("imagenet2012", data_dir=str(tmp_path))


def test_corrupt_body_behind_a_valid_header_is_skipped_not_a_crash(tmp_path, gradient_image):
    """A PNG whose data is damaged: evaluation drops it and the run goes on."""
    from PIL import Image as PILImage

    root = tmp_path / "folder"
    for split in ("train", "validation"):
        for name in ("a", "b"):
            directory = root / split / name
            directory.mkdir(parents=True)
            for i in range(3):
                PILImage.fromarray(gradient_image).save(directory / f"{i}.png")
    good = (root / "validation" / "a" / "0.png").read_bytes()
    (root / "validation" / "a" / "0.png").write_bytes(good[:60] + b"\x00" * 200 + good[260:])
    info = ip.get_dataset("folder", str(root))
    batches = list(ip.create_eval_dataset(info, "validation", global_batch_size=4, image_size=16))
    assert sum(float(b["mask"].numpy().sum()) for b in batches) == 5  # 6 files, 1 corrupt
    train = ip.create_train_dataset(info, "train", global_batch_size=2, image_size=16, seed=0, shuffle_buffer_size=8)
    assert len(list(itertools.islice(train, 6))) == 6
