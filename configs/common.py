"""The fields every training config has, with the defaults shared by v1.py and v2.py.

Field names follow Flax's ImageNet example where they overlap.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Model.
    config.model = "MobileNetV1"
    config.width = 1.0  # width multiplier alpha
    config.model_args = ml_collections.ConfigDict()  # other architecture fields (profile, dropout_rate, ...)
    config.bn_momentum = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch
    config.bn_epsilon = (
        1e-5  # PyTorch's; with the fan-out init, depthwise outputs have variance ~2/C, so 1e-3 would swamp them
    )
    config.cross_replica_bn = False  # BN statistics over the whole global batch instead of per device
    config.depthwise_impl = "auto"  # per backend; 'xla' or 'shift' to force

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
    config.init_from = ""  # a converted model directory (python -m mobilenet_jax.convert) to start from

    # Bookkeeping.
    config.seed = 0
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1: once per epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.progress_bar = True
    # Persistent XLA compilation cache: a second start of the same config skips compilation ('' = off).
    config.compilation_cache_dir = "~/.cache/mobilenet_jax/xla"
    return config


def apply_options(config: ml_collections.ConfigDict, options: dict) -> ml_collections.ConfigDict:
    """The config-string options both recipes share: quickstart, width, resolution."""
    if options["quickstart"]:
        config = quickstart(config)
    if options["width"] is not None:
        config.width = float(options["width"])
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
    config.width = 0.5
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
