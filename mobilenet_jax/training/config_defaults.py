"""The fields every training config has, with the defaults shared by configs/v1.py and configs/v2.py.

In the package, so that a config file loaded by path from any directory imports it without editing ``sys.path``.

Field names follow Flax's ImageNet example where they overlap. The architecture is
all in ``config.model`` (the fields of ``model.json``); everything else is data,
optimisation and bookkeeping.
"""

import ast
from typing import Any

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every field, with the defaults v1.py and v2.py share: model and data, optimisation, bookkeeping."""
    config = ml_collections.ConfigDict()
    _model_and_data(config)
    _optimisation(config)
    _bookkeeping(config)
    return config


def _model_and_data(config: ml_collections.ConfigDict) -> None:
    # Model: every field of the architecture, passed to its class (MobileNetV1/V2 add theirs).
    config.model = ml_collections.ConfigDict()
    config.model.architecture = "MobileNetV1"
    config.model.width = 1.0  # width multiplier alpha
    config.model.bn_momentum = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch
    # PyTorch's; with the fan-out init, depthwise outputs have variance ~2/C, so 1e-3 would swamp them.
    config.model.bn_epsilon = 1e-5
    config.model.depthwise_impl = (
        "auto"  # per backend; 'xla', 'shift' or 'ffi' (CPU kernels) to force (same parameters)
    )
    config.cross_replica_bn = False  # BN statistics over the whole global batch instead of per device

    # Data.
    config.dataset = "imagenet2012"  # a TFDS name, or 'folder' with data_dir=ROOT (ROOT/SPLIT/CLASS/*.jpg)
    # TFDS data_dir (None: TFDS's default ~/tensorflow_datasets); placeholders stay
    # overridable from the command line while None.
    config.data_dir = ml_collections.config_dict.placeholder(str)
    config.manual_dir = ml_collections.config_dict.placeholder(str)  # manually downloaded archives (imagenet2012)
    config.train_split = "train"
    config.eval_split = "validation"
    config.image_size = 224  # the resolution multiplier, as a size
    config.crop_area_range = (0.08, 1.0)  # Inception-style random-resized crop
    config.eval_preprocessing = "center_crop"  # 'center_crop' (0.875, TF) or 'torchvision' (resize 256, crop 224)
    config.shuffle_buffer_size = 16_384
    config.cache = False  # cache encoded images in memory (small datasets)


def _optimisation(config: ml_collections.ConfigDict) -> None:
    # Optimisation (TF's RMSProp: decay 0.9, momentum 0.9, epsilon 1.0 inside the sqrt, accumulator starts at 1).
    config.batch_size = 1024  # global, over all devices and hosts
    # Peak learning rate per lr_batch_size images; the run uses
    # learning_rate * batch_size / lr_batch_size, so --config.batch_size rescales it.
    config.learning_rate = 0.045
    config.lr_batch_size = 96
    config.warmup_epochs = 5.0  # linear warmup for large batches (Goyal et al., 2017)
    config.lr_decay_factor = 0.98
    config.lr_decay_epochs = 2.5
    config.rmsprop_decay = 0.9
    config.rmsprop_momentum = 0.9
    config.rmsprop_epsilon = 1.0
    config.weight_decay = 4e-5  # L2, not on depthwise kernels, BN parameters or biases
    config.label_smoothing = 0.0
    config.ema_decay = 0.9999  # evaluation also reports the moving average of the weights
    config.num_epochs = 300.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.half_precision = True  # bfloat16 compute, float32 parameters and optimizer state
    # A model directory (convert, prune), workdir or published model's name (e.g.
    # 'timm/mobilenetv2_100.ra_in1k'; mobilenet-jax summary --list_pretrained) to start from. Its model.json gives the
    # architecture (width, profile, pruned channels); config.model.architecture must match,
    # and only the training fields (bn_momentum, dropout_rate) come from config.model.
    config.init_from = ""
    # Knowledge distillation (Hinton et al., 2015, https://arxiv.org/abs/1503.02531): a model
    # directory, workdir or published model's name whose logits the student learns from, with the loss
    # alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy.
    # Defaults T = 4, alpha = 0.9 are our choice after Hinton et al. (a raised temperature,
    # most of the weight on the soft targets). The teacher runs in inference mode on the
    # student's augmented batch and is neither trained nor checkpointed.
    config.teacher = ""
    config.distill_temperature = 4.0
    config.distill_alpha = 0.9
    # Quantization-aware training (Jacob et al. 2018, https://arxiv.org/abs/1712.05877;
    # mobilenet_jax.compression.qat): fine-tune, usually init_from a float model, through the int8
    # arithmetic LiteRT runs (per-channel weights, BatchNorm folded, activations at the
    # converter's points); export --quantize int8 then writes the learned ranges. BatchNorm
    # follows the batches and the ranges the batches' min/max for the first epochs given here,
    # then both freeze (the defaults of torchvision's references/classification/train_quantization.py).
    config.quantization_aware = False
    config.qat_freeze_bn_epochs = 3.0
    config.qat_freeze_ranges_epochs = 4.0
    # > 0: skip updates whose gradients are not finite (optax.apply_if_finite), stopping after
    # this many in a row; 0: a non-finite step stops the run before anything is saved.
    config.max_consecutive_nonfinite_skips = 0


def _bookkeeping(config: ml_collections.ConfigDict) -> None:
    config.seed = 0
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1: once per epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.progress_bar = True
    # Persistent XLA compilation cache: a second start of the same config skips compilation ('' = off).
    config.compilation_cache_dir = "~/.cache/mobilenet_jax/xla"


def parse_options(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """Parses a config string ``'quickstart,width=0.5'`` into ``{'quickstart': True, 'width': 0.5}`` over ``defaults``.

    Keys must be among ``defaults``, so a typo is an error, not a silently ignored option.
    """
    values = dict(defaults)
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        key, sep, raw = token.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"Unknown config option {key!r}; known options: {', '.join(sorted(defaults))}.")
        if not sep:
            values[key] = True
            continue
        try:
            values[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            values[key] = raw.strip()
    return values


def apply_options(config: ml_collections.ConfigDict, options: dict) -> ml_collections.ConfigDict:
    """The config-string options both recipes share: quickstart, hard, width, resolution."""
    if options["quickstart"]:
        config = quickstart(config)
    if options.get("hard"):
        config = hard(config)
    if options["width"] is not None:
        config.model.width = float(options["width"])
    if options["resolution"] is not None:
        config.image_size = int(options["resolution"])
    return config


def quickstart(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same recipe, small: the embedded shapes dataset on a laptop CPU in minutes.

    Measured on a 2-core CPU: MobileNetV1 0.5 at 32 px reaches 95.8-97.0% top-1 (EMA)
    on the validation split in 24 epochs, about 5 minutes including dataset generation.
    """
    config.dataset = "mobilenet_shapes/32"
    config.image_size = 32
    config.model.width = 0.5
    config.batch_size = 128
    config.learning_rate = 0.1  # per 128 images, above the recipe's 0.045 per 96: 24 epochs, not 300
    config.lr_batch_size = 128
    config.warmup_epochs = 2.0
    config.lr_decay_factor = 0.9
    config.lr_decay_epochs = 1.0
    config.num_epochs = 24.0
    config.crop_area_range = (0.8, 1.0)  # keep most of each shape in view
    config.shuffle_buffer_size = 12_000
    config.cache = True
    config.half_precision = False  # CPUs have no fast bfloat16
    config.ema_decay = 0.999
    config.log_every_steps = 20
    config.checkpoint_every_steps = 500
    return config


def hard(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The quickstart recipe on the hard shapes: a benchmark on which compression methods differ.

    ``mobilenet_shapes/hard32``: 20 classes, smaller shapes, twice the clutter, part of
    each outline hidden, pixel noise; 24,000 training images, 24 epochs. The quickstart saturates
    (97-98% at every MAC point), so pruning, search and distillation are compared here.
    """
    config = quickstart(config)
    config.dataset = "mobilenet_shapes/hard32"
    config.num_epochs = 24.0
    config.shuffle_buffer_size = 24_000
    return config
