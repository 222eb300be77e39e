"""``mobilenet-jax convert IN OUT_DIR``: weights from a file or a published name, written as a model directory.

The command of :mod:`mobilenet_jax.weights.convert` (the library has no command-line code):
an orbax checkpoint of the variables, the detected architecture (``model.json``) and the
inputs the weights expect (``preprocessing.json``); ``--list_layouts`` prints what it reads.
"""

from __future__ import annotations

import os

from mobilenet_jax import cli
from mobilenet_jax.data.preprocessing import IMAGENET, KERAS
from mobilenet_jax.weights.convert import describe, list_layouts, load_with_info


def main(argv: list[str]) -> None:
    """``python -m mobilenet_jax.convert IN OUT_DIR``: orbax checkpoint, model.json, preprocessing.json if needed."""
    from absl import flags

    from mobilenet_jax.weights import checkpoint

    FLAGS = flags.FLAGS
    cli.quiet_logging()
    if FLAGS.list_layouts:
        print(list_layouts())
        return
    if len(argv) != 3:
        cli.exit_with(
            "usage: python -m mobilenet_jax.convert IN OUT_DIR [--strides 1,2,...] (or --list_layouts); IN is a "
            "weights file or a published model's name (mobilenet-jax summary --list_pretrained).",
            2,
        )
    source, out_dir = argv[1:]
    strides = None if FLAGS.strides is None else [int(s) for s in FLAGS.strides]

    def convert_and_save() -> None:
        converted = load_with_info(source, strides=strides)
        model = converted.model
        if FLAGS.padding is not None or FLAGS.bn_epsilon is not None:  # what a file cannot say (timm's tf_ models)
            padding = FLAGS.padding or model.padding
            model = model.clone(padding=padding, bn_epsilon=FLAGS.bn_epsilon or model.bn_epsilon)
            converted = converted._replace(model=model)
        checkpoint.save_model(out_dir, converted.model, converted.variables, converted.preprocessing)
        inputs = ""
        if converted.preprocessing is not None:
            inputs = converted.preprocessing
            scale = (
                "ImageNet mean/std"
                if inputs.same_normalization(IMAGENET)
                else f"mean {inputs.mean_rgb} std {inputs.stddev_rgb}"
            )
            scale = "[-1, 1]" if inputs.same_normalization(KERAS) else scale
            inputs = (
                f"; inputs {scale}, evaluated with a {inputs.eval_crop} crop "
                f"({inputs.interpolation}), recorded in preprocessing.json"
            )
        print(
            f"Wrote {describe(converted.model)} from the {converted.layout!r} layout to "
            f"{os.path.abspath(out_dir)}{inputs}"
        )
        if converted.note:
            print(converted.note)

    cli.run(convert_and_save)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_bool("list_layouts", False, "Print the layouts this converter reads.")
    flags.DEFINE_list("strides", None, "MobileNetV1 per-block strides, comma-separated, for non-standard depths.")
    flags.DEFINE_enum(
        "padding", None, ["torch", "tf", "keras_v1"], "Override the padding a file cannot say (timm tf_ models: tf)."
    )
    flags.DEFINE_float("bn_epsilon", None, "Override the BatchNorm epsilon (timm's tf_ models: 1e-3).")


def run_command() -> None:
    """``mobilenet-jax convert`` and ``python -m`` this module: its flags, then :func:`main`."""
    cli.run_absl(_define_flags, main)


if __name__ == "__main__":
    run_command()
