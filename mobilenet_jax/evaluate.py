"""Top-1/top-5 over a whole split: ``python -m mobilenet_jax.evaluate --config ... --workdir DIR``.

Weights come from one of:
* ``--workdir DIR``: the newest good checkpoint of a training run (EMA weights unless ``--weights=live``);
* ``--model_dir DIR``: a directory written by ``python -m mobilenet_jax.convert``;
* ``--torch_weights FILE.pth``: a PyTorch state dict, converted on the fly.

The dataset, split and resolution come from the config. For converted torchvision
weights, ``--config.eval_preprocessing=torchvision`` (the default with
``--torch_weights``) evaluates as torchvision does: resize 256, center crop 224,
bilinear, ImageNet mean/std. The command only reads: it creates nothing in a workdir.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from mobilenet_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config (dataset, split, image size).", lock_config=False)
flags.DEFINE_string("workdir", None, "Training workdir whose newest good checkpoint to evaluate.")
flags.DEFINE_string("model_dir", None, "Converted model directory (python -m mobilenet_jax.convert).")
flags.DEFINE_string("torch_weights", None, "PyTorch .pth state dict to convert and evaluate.")
flags.DEFINE_enum("weights", "ema", ["ema", "live"], "Which weights of a training checkpoint to evaluate.")


def load_weights(
    config,
    *,
    workdir: str | None = None,
    model_dir: str | None = None,
    torch_weights: str | None = None,
    weights: str = "ema",
):
    """``(model, variables)`` from exactly one source, computing in the config's precision."""
    import jax.numpy as jnp

    from mobilenet_jax import checkpoint, convert

    sources = [s for s in (workdir, model_dir, torch_weights) if s]
    if len(sources) != 1:
        raise errors.UserError("Give exactly one of --workdir, --model_dir and --torch_weights.")
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    if torch_weights:
        model, variables = convert.from_torch(torch_weights)
        return model.clone(dtype=dtype), variables
    return checkpoint.load_any(sources[0], weights=weights, dtype=dtype)


def run(config, **sources) -> dict:
    """Evaluates the weights ``sources`` name (see :func:`load_weights`) on ``config``'s eval split."""
    import jax

    from mobilenet_jax import distributed, input_pipeline, steps

    model, variables = load_weights(config, **sources)
    info = input_pipeline.get_dataset(config.dataset, config.data_dir, config.manual_dir)
    if model.num_classes != info.num_classes:
        raise errors.UserError(
            f"The weights have {model.num_classes} classes but {config.dataset} has {info.num_classes}."
        )
    mesh = distributed.make_mesh()
    distributed.check_batch_size(config.batch_size, mesh)
    variables = jax.device_put(variables, distributed.replicated(mesh))
    dataset, total = input_pipeline.eval_dataset(config, info)
    return steps.evaluate(steps.make_eval_step(mesh, model), variables, dataset, mesh, total)


def main() -> None:
    from mobilenet_jax import host

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    host.configure_cpu_allocator()
    if FLAGS.torch_weights:
        host.import_torch_before_tensorflow()
    import tensorflow as tf

    tf.config.experimental.set_visible_devices([], "GPU")
    config = FLAGS.config
    if FLAGS.torch_weights and "eval_preprocessing" not in config_flags.get_override_values(FLAGS["config"]):
        config.eval_preprocessing = "torchvision"
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


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(errors.absl_main(main), flags_parser=errors.parse_absl_flags)
