"""tf.data input pipelines for ImageNet-style classification with TFDS.

Training: Inception-style random-resized crop (fused with JPEG decoding) and a
horizontal flip; evaluation: a 0.875 center crop and a resize (or torchvision's
resize-256/crop-224). All randomness is stateless and keyed by (seed, epoch,
example index), so the data order and the augmentations of a run depend on nothing
but the config: a resumed run sees exactly the batches an uninterrupted one would,
and N processes together see the same global batches as one process.

Undecodable images are not a crash: files that are not JPEG/PNG/GIF/BMP come out as
blank examples with ``mask == 0``, which the steps leave out and count; a file with a
valid header and a corrupt body is dropped from the stream (evaluation counts it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mobilenet_jax.data.preprocessing import EVAL_CROPS, IMAGENET, INTERPOLATIONS
from mobilenet_jax.errors import DatasetError
from mobilenet_jax.training.distributed import as_numpy  # noqa: F401 (the pipeline's batches, as NumPy)

# What the pipeline feeds: ImageNet statistics on the 0..255 scale, as torchvision normalises.
MEAN_RGB = IMAGENET.mean_rgb
STDDEV_RGB = IMAGENET.stddev_rgb
EVAL_CROP_FRACTION = IMAGENET.crop_fraction
EVAL_METHODS = EVAL_CROPS
_MAX_EPOCHS = 1_000_000


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs to know of a TFDS image-classification dataset."""

    builder: tfds.core.DatasetBuilder
    image_key: str
    label_key: str
    num_classes: int


def get_dataset(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> DatasetInfo:
    """Returns the builder of a TFDS dataset (prepared if it needs no download) or an image folder.

    ``name`` is a TFDS name (``'imagenet2012'``, ``'mobilenet_shapes/64'``, ...) or
    ``'folder'`` for ``data_dir/SPLIT/CLASS/*.jpg``.
    """
    from mobilenet_jax.data.datasets import shapes  # noqa: F401  (registers mobilenet_shapes)

    if name == "folder":
        if not data_dir or not os.path.isdir(data_dir):
            raise DatasetError(
                f"dataset='folder' needs data_dir set to a ROOT/SPLIT/CLASS/*.jpg directory, got {data_dir!r}."
            )
        builder = _image_folder(data_dir)
    else:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise DatasetError(f"Unknown dataset {name!r}: not a TFDS dataset name and not 'folder'.") from None
        if not builder.is_prepared() and not _is_mocked(builder):
            _prepare(builder, name, manual_dir)
    keys = builder.info.supervised_keys or ("image", "label")
    image_key, label_key = keys[0], keys[1]
    features = builder.info.features
    if image_key not in features or not hasattr(features[label_key], "num_classes"):
        raise DatasetError(f"Dataset {name!r} is not an image-classification dataset (no image and class label).")
    return DatasetInfo(builder, image_key, label_key, int(features[label_key].num_classes))


def _image_folder(root: str) -> tfds.core.DatasetBuilder:
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not splits:
        raise DatasetError(f"Image folder {root} has no split folders; expected ROOT/train/CLASS/*.jpg.")
    builder = tfds.ImageFolder(root)
    if not builder.info.splits or not any(s.num_examples for s in builder.info.splits.values()):
        raise DatasetError(f"Image folder {root} holds no images in ROOT/SPLIT/CLASS/*.jpg ({', '.join(splits)}).")
    return builder


def check_split(info: DatasetInfo, split: str) -> None:
    """Raises one sentence when ``split`` is not among the dataset's splits."""
    splits = info.builder.info.splits
    base = split.split("[", 1)[0]
    if splits and base not in splits and not _is_mocked(info.builder):
        if isinstance(info.builder, tfds.ImageFolder):
            raise DatasetError(
                f"Image folder {info.builder.data_dir} has no {base}/ folder (it has {', '.join(sorted(splits))}/); "
                f"add ROOT/{base}/CLASS/*.jpg or set the config's train_split/eval_split."
            )
        raise DatasetError(
            f"Dataset {info.builder.name!r} has no split {base!r} (it has {', '.join(sorted(splits))}); "
            "set the config's train_split/eval_split."
        )


def _is_mocked(builder: tfds.core.DatasetBuilder) -> bool:
    # Under tfds.testing.mock_data, as_dataset is patched and no files are needed.
    return "mock" in getattr(type(builder).as_dataset, "__qualname__", "")


def _prepare(builder: tfds.core.DatasetBuilder, name: str, manual_dir: str | None) -> None:
    if builder.name == "mobilenet_shapes":
        builder.download_and_prepare()  # generated locally, no network
        return
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as error:  # AssertionError / NonMatchingChecksumError / network errors
        default_manual = os.path.join(os.path.dirname(os.path.dirname(builder.data_dir)), "downloads", "manual")
        hint = (
            f"place its archives in the manual download directory ({manual_dir or default_manual}, "
            f"or set config.manual_dir), as TFDS documents for {name}"
            if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
            else f"run `tfds build {name}` on a machine with network access and copy the data_dir here"
        )
        raise DatasetError(f"Dataset {name!r} is not prepared in {builder.data_dir}; {hint}.") from error


def num_examples(info: DatasetInfo, split: str) -> int:
    """Number of examples in ``split`` (read from the dataset, so mocked data work too)."""
    splits = info.builder.info.splits
    try:
        return int(splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
        cardinality = int(info.builder.as_dataset(split=split).cardinality())
        if cardinality < 0:
            raise DatasetError(f"Cannot tell how many examples split {split!r} has.") from None
        return cardinality


# ----------------------------------------------------------------------------- image functions


def renormalize(batch: dict, scale: np.ndarray, shift: np.ndarray) -> dict:
    """A batch of :func:`normalize`'d images through an affine of ``Preprocessing.affine_from``."""
    return {**batch, "image": batch["image"] * tf.constant(scale) + tf.constant(shift)}


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8/float RGB on 0..255 -> float32 standardised with the ImageNet mean and std."""
    image = tf.cast(image, tf.float32)
    return (image - tf.constant(MEAN_RGB, tf.float32)) / tf.constant(STDDEV_RGB, tf.float32)


def is_decodable(encoded: tf.Tensor) -> tf.Tensor:
    """True for bytes that start like a JPEG, PNG, GIF or BMP file."""
    head = tf.strings.substr(encoded, 0, 8)
    return tf.logical_or(
        tf.logical_or(tf.io.is_jpeg(encoded), tf.equal(head, b"\x89PNG\r\n\x1a\n")),
        tf.logical_or(
            tf.equal(tf.strings.substr(encoded, 0, 4), b"GIF8"), tf.equal(tf.strings.substr(encoded, 0, 2), b"BM")
        ),
    )


def _image_shape(encoded: tf.Tensor) -> tf.Tensor:
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.image.extract_jpeg_shape(encoded)[:2],
        lambda: tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))[:2],
    )


def _decode_window(encoded: tf.Tensor, offset_y, offset_x, height, width) -> tf.Tensor:
    """Decodes only the crop window for JPEGs (fused), the whole image otherwise."""
    window = tf.stack([offset_y, offset_x, height, width])

    def jpeg():
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3, try_recover_truncated=True)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.image.crop_to_bounding_box(image, offset_y, offset_x, height, width)

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def random_resized_crop(
    encoded: tf.Tensor,
    seed: tf.Tensor,
    image_size: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Inception-style crop of an encoded image, resized to ``image_size`` (float32, 0..255).

    A crop covering ``area_range`` of the image with an aspect ratio in
    ``aspect_ratio_range`` is sampled (10 attempts, then the whole image).
    """
    shape = _image_shape(encoded)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], 0),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = _decode_window(encoded, begin[0], begin[1], size[0], size[1])
    return tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=False)


def center_crop(
    encoded: tf.Tensor, image_size: int, crop_fraction: float = EVAL_CROP_FRACTION, interpolation: str = "bilinear"
) -> tf.Tensor:
    """Central ``crop_fraction`` square of the shorter side, resized to ``image_size`` (TF/Inception eval)."""
    shape = tf.cast(_image_shape(encoded), tf.float32)
    crop = tf.cast(crop_fraction * tf.reduce_min(shape), tf.int32)
    offset_y = (tf.cast(shape[0], tf.int32) - crop + 1) // 2
    offset_x = (tf.cast(shape[1], tf.int32) - crop + 1) // 2
    image = _decode_window(encoded, offset_y, offset_x, crop, crop)
    return tf.image.resize(image, [image_size, image_size], method=interpolation, antialias=False)


def resize_then_center_crop(
    encoded: tf.Tensor, image_size: int, resize_size: int | None = None, interpolation: str = "bilinear"
) -> tf.Tensor:
    """torchvision's ImageNet evaluation: shorter side to ``resize_size`` (bilinear; timm: bicubic), central crop."""
    resize_size = resize_size or int(round(image_size / EVAL_CROP_FRACTION))
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize_size / tf.reduce_min(shape)
    new_shape = tf.cast(tf.floor(shape * scale), tf.int32)
    new_shape = tf.maximum(new_shape, resize_size)
    image = tf.image.resize(image, new_shape, method=interpolation, antialias=True)
    # torchvision's CenterCrop offset: round((size - crop) / 2), halves to even.
    offsets = tf.cast(tf.round(tf.cast(new_shape - image_size, tf.float32) / 2.0), tf.int32)
    return tf.image.crop_to_bounding_box(image, offsets[0], offsets[1], image_size, image_size)


def preprocess_train(encoded, label, seed, image_size: int, area_range: tuple[float, float]) -> dict:
    """One training example: crop + flip + normalise; blank and masked when undecodable."""
    valid = is_decodable(encoded)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def augment():
        image = random_resized_crop(encoded, crop_seed, image_size, area_range)
        return tf.image.stateless_random_flip_left_right(image, flip_seed)

    image = tf.cond(valid, augment, lambda: tf.zeros([image_size, image_size, 3], tf.float32))
    return {"image": normalize(image), "label": tf.cast(label, tf.int32), "mask": tf.cast(valid, tf.float32)}


def preprocess_eval(
    encoded, label, image_size: int, method: str = "center_crop", interpolation: str = "bilinear"
) -> dict:
    """One evaluation example; ``method`` is 'center_crop' (TF) or 'torchvision', resizing with ``interpolation``."""
    valid = is_decodable(encoded)
    crop = center_crop if method == "center_crop" else resize_then_center_crop
    image = tf.cond(
        valid,
        lambda: crop(encoded, image_size, interpolation=interpolation),
        lambda: tf.zeros([image_size, image_size, 3], tf.float32),
    )
    return {"image": normalize(image), "label": tf.cast(label, tf.int32), "mask": tf.cast(valid, tf.float32)}


# ----------------------------------------------------------------------------- datasets


def _encoded(info: DatasetInfo, split: str) -> tf.data.Dataset:
    read_config = tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1, try_autocache=False)
    ds = info.builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={info.image_key: tfds.decode.SkipDecoding()},
        read_config=read_config,
    )
    return ds.map(lambda ex: (ex[info.image_key], ex[info.label_key]))


@contextlib.contextmanager
def _without_global_seed():
    """TensorFlow's global seed (``tf.random.set_seed``, ``keras.utils.set_random_seed``) joins every op seed.

    The training stream is a function of ``config.seed`` alone, so the global seed is
    cleared while the shuffles are built, then set again. (A global seed of 0 would also
    make ``Dataset.shuffle`` fail on the traced per-epoch seed.)
    """
    from tensorflow.python.eager import context  # no public reader of the global seed

    previous = context.global_seed()
    if previous is None:
        yield
        return
    tf.random.set_seed(None)
    try:
        yield
    finally:
        tf.random.set_seed(previous)


def create_train_dataset(
    info: DatasetInfo,
    split: str,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    area_range: tuple[float, float] = (0.08, 1.0),
    shuffle_buffer_size: int = 16_384,
    cache: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Endless stream of this process's share of each global training batch, from ``start_step`` on.

    Every process reads the split in the same seeded order (a new shuffle per epoch)
    and keeps every ``process_count``-th example: the global batches do not depend on
    the number of processes, and resuming at ``start_step`` skips the examples already
    used without decoding them.
    """
    if global_batch_size % process_count:
        raise DatasetError(f"Global batch {global_batch_size} does not split over {process_count} processes.")
    total = num_examples(info, split)
    if total < global_batch_size:
        raise DatasetError(f"Split {split!r} has {total} examples, fewer than one batch of {global_batch_size}.")
    ds = _encoded(info, split).enumerate()
    if cache:
        ds = ds.cache()

    def epoch(e):
        shuffled = ds.shuffle(shuffle_buffer_size, seed=seed * 7919 + e, reshuffle_each_iteration=False)
        return shuffled.map(lambda index, example: (e, index, example))

    start_epoch, offset = divmod(start_step * global_batch_size, total)
    with _without_global_seed():  # the shuffles are traced here
        stream = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch).skip(offset)
    stream = stream.shard(process_count, process_index)

    def preprocess(e, index, example):
        example_seed = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + e, index])
        return preprocess_train(example[0], example[1], example_seed, image_size, area_range)

    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(os.cpu_count() or 1, 1)
    stream = stream.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    # A file with a valid header but a corrupt body fails inside the decoder: drop it
    # (TF logs a warning) rather than stop the run.
    stream = stream.ignore_errors(log_warning=True)
    stream = stream.batch(global_batch_size // process_count, drop_remainder=True)
    return stream.with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_batches(info: DatasetInfo, split: str, global_batch_size: int, process_count: int = 1) -> int:
    """Number of evaluation batches every process runs (the last one padded)."""
    per_process = -(-num_examples(info, split) // process_count)
    return max(1, -(-per_process // (global_batch_size // process_count)))


def create_eval_dataset(
    info: DatasetInfo,
    split: str,
    *,
    global_batch_size: int,
    image_size: int,
    method: str = "center_crop",
    interpolation: str = "bilinear",
    cache: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """The whole split, once, in this process's batches; padding examples have ``mask == 0``.

    Every process yields :func:`eval_batches` batches, so multi-host evaluation steps
    stay in lockstep even when the split does not divide evenly.
    """
    if method not in EVAL_METHODS:
        raise DatasetError(f"Evaluation preprocessing must be 'center_crop' or 'torchvision', got {method!r}.")
    if interpolation not in INTERPOLATIONS:
        raise DatasetError(f"Evaluation interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}.")
    if global_batch_size % process_count:
        raise DatasetError(f"Global batch {global_batch_size} does not split over {process_count} processes.")
    local_batch = global_batch_size // process_count
    ds = _encoded(info, split).shard(process_count, process_index)
    if cache:
        ds = ds.cache()
    ds = ds.map(
        lambda image, label: preprocess_eval(image, label, image_size, method, interpolation),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    # Corrupt bodies behind valid headers are dropped here; the evaluation counts them
    # as skipped (split size minus images seen).
    ds = ds.ignore_errors(log_warning=True)
    padding = {
        "image": tf.zeros([image_size, image_size, 3], tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0, tf.float32),
    }
    batches = eval_batches(info, split, global_batch_size, process_count)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat()).take(batches * local_batch)
    return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(
    config: ml_collections.ConfigDict, info: DatasetInfo, method: str | None = None, interpolation: str = "bilinear"
) -> tuple[tf.data.Dataset, int]:
    """The evaluation split of a training config, in this process's batches, and its size.

    One builder for the training loop and the evaluation CLI; ``method`` overrides
    ``config.eval_preprocessing`` (e.g. with a converted model's own, see ``preprocessing.json``).
    """
    import jax

    check_split(info, config.eval_split)
    dataset = create_eval_dataset(
        info,
        config.eval_split,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
        method=method or config.eval_preprocessing,
        interpolation=interpolation,
        cache=config.cache,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return dataset, num_examples(info, config.eval_split)
