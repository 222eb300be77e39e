"""MobileNetV1 on ImageNet (imagenet2012 through TFDS) at 224 px.

Sources of the recipe:
* architecture, width multiplier and resolution: Howard et al., 2017, "MobileNets",
  https://arxiv.org/abs/1704.04861 (Tables 1, 6, 7); training with RMSprop, little
  regularisation and augmentation, no label smoothing or dropout for V1 (Section 4);
* optimiser: TF-slim's train_image_classifier.py defaults used for the released
  MobileNets (RMSProp decay 0.9, momentum 0.9, epsilon 1.0; weight decay 4e-5);
  learning rate 0.045 per 96 images decayed by 0.98 every 2.5 epochs, moving average
  0.9999 (TF-slim's MobileNet README);
* warmup: Goyal et al., 2017, https://arxiv.org/abs/1706.02677, for the large batch.
The number of epochs is not given by the papers; 300 is our choice.

Run:
  python train.py --config configs/v1.py --workdir /tmp/mobilenet_v1
  python train.py --config configs/v1.py:width=0.5,resolution=160 --workdir /tmp/v1_050_160
  python train.py --config configs/v1.py:profile=0.5flops --workdir /tmp/v1_amc
  python train.py --config configs/v1.py:quickstart --workdir /tmp/quickstart
  python train.py --config configs/v1.py:hard --workdir /tmp/hard   # 20-class shapes: tells compression methods apart

Expected: 70.6% top-1 for 1.0-224, 63.7% for 0.5-224 (paper Table 6); the
quickstart reaches >= 95% top-1 on the embedded shapes dataset in minutes on a CPU.
"""

from mobilenet_jax.training import config_defaults as common


def get_config(arg=None):
    options = common.parse_options(arg, quickstart=False, hard=False, width=None, resolution=None, profile="normal")
    config = common.base_config()
    config.model.architecture = "MobileNetV1"
    config.model.profile = options["profile"]
    return common.apply_options(config, options)
