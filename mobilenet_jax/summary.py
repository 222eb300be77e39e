"""Parameter and multiply-add counts, measured on the model itself.

``summarize(model, image_size)`` traces one abstract forward pass (``jax.eval_shape``:
nothing is allocated or compiled) and records the shapes seen by every convolution
and dense layer. Multiply-adds count convolutions and the classifier, as the papers
do; BatchNorm, activations and pooling are not counted.

``python -m mobilenet_jax.summary`` prints the variants of the papers' tables.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mobilenet_jax.models import MobileNetV1, MobileNetV2, MobileNetV3, MobileNetV4
from mobilenet_jax.models.layers import DepthwiseConv, PointwiseConv


class ModelSummary(NamedTuple):
    params: int  # trainable parameters, BN scale/bias included (torchvision's count)
    params_excluding_bn: int  # convolution and classifier weights only (the papers' count)
    macs: int  # multiply-adds for one image


def _layer_macs(module: nn.Module, inputs: jax.ShapeDtypeStruct, outputs: jax.ShapeDtypeStruct) -> int:
    in_channels = inputs.shape[-1]
    out_positions = math.prod(outputs.shape[1:-1])
    if isinstance(module, DepthwiseConv):
        return out_positions * in_channels * module.kernel_size**2
    if isinstance(module, PointwiseConv):
        return out_positions * in_channels * outputs.shape[-1]
    if isinstance(module, nn.Conv):
        kernel = math.prod(module.kernel_size)
        return out_positions * outputs.shape[-1] * kernel * in_channels // module.feature_group_count
    if isinstance(module, nn.Dense):
        return in_channels * outputs.shape[-1]
    return 0


def summarize(model: nn.Module, image_size: int | tuple[int, int] = 224, in_channels: int = 3) -> ModelSummary:
    """Counts the parameters and the multiply-adds of ``model`` on one ``image_size`` image."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    macs = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            macs.append(_layer_macs(context.module, args[0], out))
        return out

    images = jax.ShapeDtypeStruct((1, height, width, in_channels), jnp.float32)
    with nn.intercept_methods(count):
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    sizes = {
        jax.tree_util.keystr(path): math.prod(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    }
    return ModelSummary(
        params=sum(sizes.values()),
        params_excluding_bn=sum(n for path, n in sizes.items() if "bn" not in path),
        macs=sum(macs),
    )


# The papers' rows: (name, model, image size, published params in M, published MACs in M).
PAPER_ROWS = (
    # MobileNetV1 (arXiv:1704.04861), Table 6: width multiplier at 224.
    ("MobileNetV1 1.0-224", MobileNetV1(width=1.0), 224, 4.2, 569),
    ("MobileNetV1 0.75-224", MobileNetV1(width=0.75), 224, 2.6, 325),
    ("MobileNetV1 0.5-224", MobileNetV1(width=0.5), 224, 1.3, 149),
    ("MobileNetV1 0.25-224", MobileNetV1(width=0.25), 224, 0.5, 41),
    # Table 7: resolution multiplier at width 1.0.
    ("MobileNetV1 1.0-192", MobileNetV1(width=1.0), 192, 4.2, 418),
    ("MobileNetV1 1.0-160", MobileNetV1(width=1.0), 160, 4.2, 290),
    ("MobileNetV1 1.0-128", MobileNetV1(width=1.0), 128, 4.2, 186),
    # The AMC profile of the design notes (pruned to about half the MACs).
    ("MobileNetV1 AMC 0.5flops-224", MobileNetV1(profile="0.5flops"), 224, None, None),
    # MobileNetV2 (arXiv:1801.04381), Table 4. The paper's 6.9M for width 1.4 does not
    # follow from its own architecture: TF-slim's released 1.4 model has 6.06M
    # parameters and 582M MACs, which is what this model counts.
    ("MobileNetV2 1.0-224", MobileNetV2(width=1.0), 224, 3.4, 300),
    ("MobileNetV2 1.4-224", MobileNetV2(width=1.4), 224, 6.9, 585),
    ("MobileNetV2 0.5-160", MobileNetV2(width=0.5), 160, None, None),
    ("MobileNetV2 0.35-96", MobileNetV2(width=0.35), 96, None, None),
    # MobileNetV3 (arXiv:1905.02244), Table 3; torchvision lists 5,483,032 and 2,542,856 parameters, which
    # these count exactly. The paper's 0.75 models (TF-slim's) keep the stem at 16 and the dense head layer at
    # 1280/1024: rounding 'keras' (or 'timm'); torchvision's width_mult scales them too.
    ("MobileNetV3-Large 1.0-224", MobileNetV3(variant="large"), 224, 5.4, 219),
    ("MobileNetV3-Large 0.75-224", MobileNetV3(variant="large", width=0.75, rounding="keras"), 224, 4.0, 155),
    ("MobileNetV3-Large min. 1.0-224", MobileNetV3(variant="large", minimal=True), 224, 3.9, 209),
    ("MobileNetV3-Small 1.0-224", MobileNetV3(variant="small"), 224, 2.5, 56),
    ("MobileNetV3-Small 0.75-224", MobileNetV3(variant="small", width=0.75, rounding="keras"), 224, 2.0, 44),
    ("MobileNetV3-Small min. 1.0-224", MobileNetV3(variant="small", minimal=True), 224, None, None),
    # MobileNetV4 (arXiv:2404.10518): conv-small 3.8M / 0.2G at 224, conv-medium 9.7M / 1.0G at 256; timm's
    # mobilenetv4_conv_small/_medium have 3,774,024 and 9,715,512 parameters, which these count exactly.
    ("MobileNetV4-Conv-S 224", MobileNetV4(variant="conv_small"), 224, 3.8, 200),
    ("MobileNetV4-Conv-M 256", MobileNetV4(variant="conv_medium"), 256, 9.7, 1000),
)


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def main(argv: list[str]) -> None:
    """``python -m mobilenet_jax.summary``: the papers' table, one model's counts, or ``--list_pretrained``."""
    from absl import flags

    from mobilenet_jax import cli, errors
    from mobilenet_jax.models import create_model

    FLAGS = flags.FLAGS
    cli.quiet_logging()
    if len(argv) > 1:
        cli.exit_with(f"unexpected argument(s) {argv[1:]}; every option is a --flag.", 2)

    def report() -> None:
        if FLAGS.list_pretrained:
            from mobilenet_jax.weights import pretrained

            print(pretrained.list_pretrained())
            return
        if FLAGS.image_size < 1:
            raise errors.UserError(f"--image_size must be positive, got {FLAGS.image_size}.")
        if FLAGS.model_dir:
            from mobilenet_jax.weights import checkpoint, pretrained

            directory = pretrained.local_source(FLAGS.model_dir)  # a published model's name works too
            rows = [(FLAGS.model_dir, checkpoint.read_model_record(directory), FLAGS.image_size, None, None)]
        elif FLAGS.model:
            model = create_model({"architecture": FLAGS.model, "width": FLAGS.width})
            rows = [(f"{FLAGS.model} {FLAGS.width:g}-{FLAGS.image_size}", model, FLAGS.image_size, None, None)]
        else:
            rows = PAPER_ROWS
        print(f"{'model':30s} {'params (M)':>10s} {'w/o BN':>7s} {'paper':>6s} {'MACs (M)':>9s} {'paper':>6s}")
        for name, model, size, paper_params, paper_macs in rows:
            result = summarize(model, size)
            print(
                f"{name:30s} {result.params / 1e6:10.3f} {result.params_excluding_bn / 1e6:7.3f}"
                f" {_format(paper_params):>6s} {result.macs / 1e6:9.1f} {_format(paper_macs):>6s}"
            )

    cli.run(report)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string(
        "model", None, "MobileNetV1, MobileNetV2, MobileNetV3 or MobileNetV4 (default: the papers' table)."
    )
    flags.DEFINE_float("width", 1.0, "Width multiplier of --model.")
    flags.DEFINE_integer("image_size", 224, "Input size.")
    flags.DEFINE_string("model_dir", None, "A model directory, training workdir or published model's name.")
    flags.DEFINE_bool("list_pretrained", False, "List the published weights that load by name, with their top-1.")


def run_command() -> None:
    """``mobilenet-jax summary`` and ``python -m`` this module: its flags, then :func:`main`."""
    from mobilenet_jax import cli

    cli.run_absl(_define_flags, main)


if __name__ == "__main__":
    run_command()
