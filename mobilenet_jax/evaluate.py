"""Top-1/top-5 over a whole split: ``python -m mobilenet_jax.evaluate --config ... --workdir DIR``.

Weights come from one of:
* ``--workdir DIR``: the latest checkpoint of a training run (EMA weights unless ``--weights=live``);
* ``--model_dir DIR``: a directory written by ``python -m mobilenet_jax.convert``;
* ``--torch_weights FILE.pth``: a PyTorch state dict, converted on the fly.

The dataset, split and resolution come from the config. For converted torchvision
weights, ``--config.eval_preprocessing=torchvision`` (the default with
``--torch_weights``) evaluates as torchvision does: resize 256, center crop 224,
bilinear, ImageNet mean/std.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config (dataset, split, image size).", lock_config=False)
flags.DEFINE_string("workdir", None, "Training workdir whose latest checkpoint to evaluate.")
flags.DEFINE_string("model_dir", None, "Converted model directory (python -m mobilenet_jax.convert).")
flags.DEFINE_string("torch_weights", None, "PyTorch .pth state dict to convert and evaluate.")
flags.DEFINE_enum("weights", "ema", ["ema", "live"], "Which weights of a training checkpoint to evaluate.")


def load_weights(config, num_classes: int):
    """(model, variables) from the flag that names the weights."""
    import jax

    from mobilenet_jax import checkpoint, convert, distributed, training

    sources = [f for f in ("workdir", "model_dir", "torch_weights") if FLAGS[f].value]
    if len(sources) != 1:
        raise ValueError("Give exactly one of --workdir, --model_dir and --torch_weights.")
    dtype = training.create_model(config, num_classes).dtype
    if FLAGS.torch_weights:
        model, variables = convert.from_torch(FLAGS.torch_weights)
        return model.clone(dtype=dtype), variables
    if FLAGS.model_dir:
        return checkpoint.load_model(FLAGS.model_dir, dtype=dtype)
    model = training.create_model(config, num_classes, bn_axis_name=None)
    steps_per_epoch = 1  # the schedule does not change the shapes of the optimizer state
    tx = training.create_optimizer(config, training.create_learning_rate_fn(config, steps_per_epoch))
    abstract = jax.eval_shape(lambda: training.create_train_state(jax.random.PRNGKey(0), model, tx, config.image_size))
    mesh = distributed.make_mesh()
    state = checkpoint.TrainCheckpoints(FLAGS.workdir, async_save=False).restore_latest(
        abstract, distributed.replicated(mesh)
    )
    if state is None:
        raise FileNotFoundError(f"No checkpoint in {FLAGS.workdir}/checkpoints; train first or pass --model_dir.")
    if FLAGS.weights == "ema":
        return model, {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    return model, {"params": state.params, "batch_stats": state.batch_stats}


def run(config) -> dict:
    import jax

    from mobilenet_jax import distributed, input_pipeline, training

    info = input_pipeline.get_dataset(config.dataset, config.data_dir, config.manual_dir)
    model, variables = load_weights(config, info.num_classes)
    if model.num_classes != info.num_classes:
        raise ValueError(f"The weights have {model.num_classes} classes but {config.dataset} has {info.num_classes}.")
    mesh = distributed.make_mesh()
    distributed.check_batch_size(config.batch_size, mesh)
    variables = jax.device_put(variables, distributed.replicated(mesh))
    dataset = input_pipeline.create_eval_dataset(
        info,
        config.eval_split,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
        method=config.eval_preprocessing,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    total = input_pipeline.num_examples(info, config.eval_split)
    return training.evaluate(training.sharded_eval_step(mesh, model), variables, dataset, mesh, total)


def main(argv):
    del argv
    from mobilenet_jax import host

    if host.cpu_only():
        host.keep_freed_memory()
    if FLAGS.torch_weights:
        import torch  # noqa: F401  (before TensorFlow, which otherwise crashes torch's import)
    import tensorflow as tf

    tf.config.experimental.set_visible_devices([], "GPU")
    from mobilenet_jax.input_pipeline import DatasetError

    config = FLAGS.config
    if FLAGS.torch_weights and not any(arg.startswith("--config.eval_preprocessing") for arg in sys.argv):
        config.eval_preprocessing = "torchvision"
    try:
        result = run(config)
    except (DatasetError, ValueError, FileNotFoundError) as error:
        logging.debug("Stopped by an error.", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    skipped = f", {result['skipped']} undecodable images skipped" if result.get("skipped") else ""
    print(
        f"{config.dataset} {config.eval_split}: top-1 {100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}%, "
        f"loss {result['loss']:.4f} over {result['examples']} images{skipped}"
    )


if __name__ == "__main__":
    app.run(main)
