"""MobileNetV2 on ImageNet (imagenet2012 through TFDS) at 224 px.

Sources of the recipe:
* architecture and width multipliers: Sandler et al., 2018, "MobileNetV2",
  https://arxiv.org/abs/1801.04381 (Table 2; training setup in Section 6.1: RMSProp
  with decay 0.9 and momentum 0.9, weight decay 4e-5, initial learning rate 0.045
  decayed by 0.98 per epoch, batch 96 per worker on 16 workers);
* TF-slim's MobileNet README, which trains the released checkpoints with label
  smoothing 0.1, moving average 0.9999, learning rate 0.045 per 96 images and
  decay 0.98 every 2.5 epochs, RMSProp epsilon 1.0; dropout 0.2 before the classifier;
* warmup: Goyal et al., 2017, https://arxiv.org/abs/1706.02677, for the large batch.
The number of epochs is not given by the papers; 300 is our choice.

Run:
  python train.py --config configs/v2.py --workdir /tmp/mobilenet_v2
  python train.py --config configs/v2.py:width=1.4 --workdir /tmp/v2_140
  python train.py --config configs/v2.py:quickstart --workdir /tmp/quickstart_v2

Expected: 72.0% top-1 for 1.0-224, 74.7% for 1.4-224 (paper Table 4).
"""

from mobilenet_jax.training import config_defaults as common


def get_config(arg=None):
    options = common.parse_options(
        arg, quickstart=False, hard=False, width=None, resolution=None, rounding="torchvision"
    )
    config = common.base_config()
    config.model.architecture = "MobileNetV2"
    config.model.dropout_rate = 0.2
    config.model.rounding = options["rounding"]
    config.label_smoothing = 0.1
    return common.apply_options(config, options)
