"""MobileNetV3 Large/Small on ImageNet (imagenet2012 through TFDS) at 224 px.

Sources of the recipe:
* architecture, widths and the minimalistic variants: Howard et al., 2019, "Searching
  for MobileNetV3", https://arxiv.org/abs/1905.02244 (Tables 1 and 2; Section 6.1.4);
* training setup, Section 6.1.1 of the paper: RMSProp with momentum 0.9, initial
  learning rate 0.1 at batch size 4096 (128 images per chip on a 4x4 TPU pod), decayed
  by 0.01 every 3 epochs (x 0.99), dropout 0.2 (keep probability 0.8) before the
  classifier, L2 weight decay 1e-5, Inception preprocessing, weight moving average
  0.9999, BatchNorm average decay 0.99 (and TensorFlow's epsilon 1e-3);
* RMSProp epsilon 1.0 and decay 0.9 as TF-slim's train_image_classifier.py defaults
  (as configs/v1.py and v2.py);
* warmup: Goyal et al., 2017, https://arxiv.org/abs/1706.02677, for the large batch.
The number of epochs is not given by the paper; torchvision's reference recipe for its
mobilenet_v3_large weights (references/classification, 74.0% top-1) trains 600, which is used here.

Run:
  python train.py --config configs/v3.py --workdir /tmp/mobilenet_v3_large
  python train.py --config configs/v3.py:variant=small --workdir /tmp/mobilenet_v3_small
  python train.py --config configs/v3.py:variant=large,minimal --workdir /tmp/v3_large_minimal
  python train.py --config configs/v3.py:quickstart --workdir /tmp/quickstart_v3   # V3-Small, embedded shapes

Expected (paper Table 3): 75.2% top-1 for Large 1.0-224, 67.4% for Small 1.0-224,
72.3% and 61.9% for the minimalistic Large and Small.
"""

from mobilenet_jax.training import config_defaults as common


def get_config(arg=None):
    options = common.parse_options(
        arg, quickstart=False, hard=False, width=None, resolution=None, variant=None, minimal=False,
        rounding="torchvision",
    )  # fmt: skip
    config = common.base_config()
    config.model.architecture = "MobileNetV3"
    config.model.variant = options["variant"] or ("small" if options["quickstart"] or options["hard"] else "large")
    config.model.minimal = bool(options["minimal"])
    config.model.rounding = options["rounding"]
    config.model.dropout_rate = 0.2
    config.model.bn_momentum = 0.99
    config.model.bn_epsilon = 1e-3
    config.batch_size = 4096
    config.learning_rate = 0.1
    config.lr_batch_size = 4096
    config.lr_decay_factor = 0.99
    config.lr_decay_epochs = 3.0
    config.weight_decay = 1e-5
    config.num_epochs = 600.0
    config = common.apply_options(config, options)
    if options["quickstart"] or options["hard"]:
        # The quickstart's recipe, with MobileNetV3-Small at full width (1.2M multiply-adds at 32 px, a
        # third of the quickstart MobileNetV1 0.5's) and BatchNorm statistics that follow its 2,000 steps.
        config.model.width = 1.0 if options["width"] is None else float(options["width"])
        config.model.bn_momentum = 0.9
    return config
