"""Top-1/top-5 over a whole split: ``python -m mobilenet_jax.evaluate --config ... --workdir DIR``.

Weights come from one of:
* ``--workdir DIR``: the newest good checkpoint of a training run (EMA weights unless ``--weights=live``;
  a quantization-aware run is evaluated as its simulated int8);
* ``--model_dir DIR``: a directory written by ``python -m mobilenet_jax.convert``;
* ``--torch_weights FILE.pth``: a PyTorch state dict, converted on the fly;
* ``--tflite FILE.tflite``: an exported file, run in the LiteRT interpreter (with one of
  the above as well, both are evaluated and their top-1 agreement is reported).

The dataset, split and resolution come from the config (``--config``; a training
workdir's own ``config.json`` when it is left out). For converted torchvision
weights, ``--config.eval_preprocessing=torchvision`` (the default with
``--torch_weights``) evaluates as torchvision does: resize 256, center crop 224,
bilinear, ImageNet mean/std. The command only reads: it creates nothing in a workdir.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from mobilenet_jax import cli, errors
from mobilenet_jax.data.preprocessing import IMAGENET

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined when it runs (importing this module defines none)."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Training config (dataset, split, image size); default: a --workdir's config.json.",
        lock_config=False,
    )
    flags.DEFINE_string("workdir", None, "Training workdir whose newest good checkpoint to evaluate.")
    flags.DEFINE_string("model_dir", None, "Converted model directory (python -m mobilenet_jax.convert).")
    flags.DEFINE_string("torch_weights", None, "PyTorch .pth state dict to convert and evaluate.")
    flags.DEFINE_enum("weights", "ema", ["ema", "live"], "Which weights of a training checkpoint to evaluate.")
    flags.DEFINE_string("tflite", None, "A .tflite file (python -m mobilenet_jax.export) for the LiteRT interpreter.")


def load_weights(
    config,
    *,
    workdir: str | None = None,
    model_dir: str | None = None,
    torch_weights: str | None = None,
    weights: str = "ema",
):
    """``(model, variables)`` from exactly one source, computing in the config's precision; a workdir trained with
    quantization-aware training gives its simulated int8 form (``compression.qat.QuantizationAware``)."""
    import jax.numpy as jnp

    from mobilenet_jax.compression import qat
    from mobilenet_jax.weights import checkpoint, convert

    sources = [s for s in (workdir, model_dir, torch_weights) if s]
    if len(sources) != 1:
        raise errors.UserError("Give exactly one of --workdir, --model_dir and --torch_weights.")
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    if torch_weights:
        model, variables = convert.from_torch(torch_weights)
        return model.clone(dtype=dtype), variables
    model, variables = checkpoint.load_any(sources[0], weights=weights, dtype=dtype)
    if qat.learned_ranges(variables) is not None:  # trained quantization-aware: evaluate it as int8 runs it
        model = qat.QuantizationAware(model)
    return model, variables


def run(config, **sources) -> dict:
    """Evaluates the weights ``sources`` name (see :func:`load_weights`) on ``config``'s eval split.

    A model directory with a ``preprocessing.json`` (converted published weights) is
    evaluated as the weights were published: its crop and interpolation, and its input
    scaling (e.g. Keras applications' [-1, 1]: the pipeline's images are re-normalised).
    """
    import functools

    import jax

    from mobilenet_jax.data import input_pipeline
    from mobilenet_jax.training import distributed, steps
    from mobilenet_jax.weights import checkpoint

    model, variables = load_weights(config, **sources)
    info = input_pipeline.get_dataset(config.dataset, config.data_dir, config.manual_dir)
    if model.num_classes != info.num_classes:
        raise errors.UserError(
            f"The weights have {model.num_classes} classes but {config.dataset} has {info.num_classes}."
        )
    mesh = distributed.make_mesh()
    distributed.check_batch_size(config.batch_size, mesh)
    variables = jax.device_put(variables, distributed.replicated(mesh))
    preprocessing = checkpoint.read_preprocessing(sources["model_dir"]) if sources.get("model_dir") else None
    if preprocessing is None:
        dataset, total = input_pipeline.eval_dataset(config, info)
    else:  # the crop, interpolation and normalisation the weights were published with
        dataset, total = input_pipeline.eval_dataset(config, info, preprocessing.eval_crop, preprocessing.interpolation)
        affine = preprocessing.affine_from(IMAGENET)
        if affine is not None:
            dataset = dataset.map(functools.partial(input_pipeline.renormalize, scale=affine[0], shift=affine[1]))
    return steps.evaluate(steps.make_eval_step(mesh, model), variables, dataset, mesh, total)


def evaluate_tflite(config, tflite_path: str, reference=None) -> dict:
    """Top-1/top-5 of a ``.tflite`` file over ``config``'s eval split (batch 1 in the LiteRT interpreter).

    ``reference`` (``images -> logits``, normalised pipeline images in) adds the JAX
    model's figures on the same images and the share of images where both agree on top-1.
    """
    import numpy as np

    from mobilenet_jax.data import input_pipeline
    from mobilenet_jax.deployment import export
    from mobilenet_jax.training import steps

    if not os.path.isfile(tflite_path):
        raise FileNotFoundError(f"No .tflite file at {tflite_path!r}.")
    model = export.TFLiteModel(tflite_path)
    if model.image_size != config.image_size:
        raise errors.UserError(
            f"{tflite_path} takes {model.image_size}x{model.image_size} images but the config's image_size is "
            f"{config.image_size}; pass --config.image_size={model.image_size}."
        )
    info = input_pipeline.get_dataset(config.dataset, config.data_dir, config.manual_dir)
    dataset, total = input_pipeline.eval_dataset(config, info)
    hits = {"tflite": np.zeros(2), "jax": np.zeros(2)}
    count, agree = 0, 0
    for batch in dataset.as_numpy_iterator():
        mask = batch["mask"] > 0
        if not mask.any():
            continue
        images, labels = batch["image"][mask], batch["label"][mask]
        logits = {"tflite": model(IMAGENET.denormalize(images))}
        if reference is not None:
            logits["jax"] = np.asarray(reference(images))
            agree += int(np.sum(logits["jax"].argmax(-1) == logits["tflite"].argmax(-1)))
        for name, values in logits.items():
            hits[name] += [int(np.sum(hit)) for hit in steps.top_k_hits(values, labels)]
        count += int(mask.sum())
    result = {"examples": count, "skipped": total - count}
    for name in logits:
        result[f"{name}_top1"], result[f"{name}_top5"] = hits[name] / max(count, 1)
    if reference is not None:
        result["top1_agreement"] = agree / max(count, 1)
    return result


def _reference(model, variables, model_dir: str | None):
    """``pipeline images -> logits`` of the JAX model, fed as its ``preprocessing.json`` says (if any)."""
    from mobilenet_jax.weights import checkpoint

    inputs = checkpoint.read_preprocessing(model_dir) if model_dir else None
    affine = None if inputs is None else inputs.affine_from(IMAGENET)
    if affine is None:
        return lambda images: model.apply(variables, images, train=False)
    return lambda images: model.apply(variables, images * affine[0] + affine[1], train=False)


def _tflite_report(config, result: dict) -> str:
    parts = [
        f"{name}: top-1 {100 * result[name + '_top1']:.2f}%, top-5 {100 * result[name + '_top5']:.2f}%"
        for name in ("tflite", "jax")
        if name + "_top1" in result
    ]
    if "top1_agreement" in result:
        parts.append(f"top-1 agreement {100 * result['top1_agreement']:.2f}%")
    return f"{config.dataset} {config.eval_split} over {result['examples']} images | " + " | ".join(parts)


def main() -> None:
    from mobilenet_jax import host

    cli.quiet_logging()
    host.configure_cpu_allocator()
    if FLAGS.torch_weights:
        host.import_torch_before_tensorflow()
    import tensorflow as tf

    tf.config.experimental.set_visible_devices([], "GPU")
    config = FLAGS.config
    if config is None:  # a training workdir remembers its config; other sources name none
        if not FLAGS.workdir:
            raise errors.UserError("Give --config naming the dataset (only a training --workdir supplies its own).")
        from mobilenet_jax.weights import checkpoint

        config = checkpoint.config_for(FLAGS.workdir, None, "evaluation")
    if FLAGS.torch_weights and "eval_preprocessing" not in config_flags.get_override_values(FLAGS["config"]):
        config.eval_preprocessing = "torchvision"
    if FLAGS.tflite:
        reference = None
        if FLAGS.workdir or FLAGS.model_dir or FLAGS.torch_weights:
            import jax

            model, variables = load_weights(
                config,
                workdir=FLAGS.workdir,
                model_dir=FLAGS.model_dir,
                torch_weights=FLAGS.torch_weights,
                weights=FLAGS.weights,
            )
            reference = jax.jit(_reference(model, variables, FLAGS.model_dir))
        print(_tflite_report(config, evaluate_tflite(config, FLAGS.tflite, reference)))
        return
    result = run(
        config,
        workdir=FLAGS.workdir,
        model_dir=FLAGS.model_dir,
        torch_weights=FLAGS.torch_weights,
        weights=FLAGS.weights,
    )
    skipped = f", {result['skipped']} undecodable images skipped" if result.get("skipped") else ""
    print(
        f"{config.dataset} {config.eval_split}: top-1 {100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}%, "
        f"loss {result['loss']:.4f} over {result['examples']} images{skipped}"
    )


def run_command() -> None:
    """``mobilenet-jax evaluate`` and ``python -m`` this module: its flags, then :func:`main`."""
    cli.run_absl(_define_flags, cli.absl_main(main))


if __name__ == "__main__":
    run_command()
