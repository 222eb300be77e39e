"""Training pieces against hand-computed references, and short end-to-end runs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from configs import v1, v2, v3
from mobilenet_jax import MobileNetV1, MobileNetV2, MobileNetV3, evaluate
from mobilenet_jax.errors import ConfigError
from mobilenet_jax.training import loop as training
from mobilenet_jax.training import optim, steps
from mobilenet_jax.weights import checkpoint
from tests import variables as random_init

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(config, **overrides):
    """The config made small enough for a CPU test."""
    config.model.width = 0.25
    config.image_size = 32
    config.batch_size = 8
    config.num_train_steps = 3
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.half_precision = False
    config.progress_bar = False
    config.shuffle_buffer_size = 64
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_learning_rate_schedule_values():
    config = v1.get_config()
    config.learning_rate, config.warmup_epochs, config.lr_decay_epochs, config.lr_decay_factor = 0.1, 2, 1, 0.5
    config.batch_size = config.lr_batch_size = 96
    lr = optim.create_learning_rate_fn(config, steps_per_epoch=10)
    expected = {0: 0.0, 5: 0.025, 10: 0.05, 20: 0.1, 29: 0.1, 30: 0.05, 39: 0.05, 45: 0.025, 60: 0.00625}
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, abs=1e-7), step
    config.warmup_epochs = 0
    assert float(optim.create_learning_rate_fn(config, 10)(0)) == pytest.approx(0.1)


def test_recipes_scale_the_learning_rate_with_the_batch():
    config = v2.get_config()
    assert optim.peak_learning_rate(config) == pytest.approx(0.045 * 1024 / 96)
    config.batch_size = 512  # an override rescales the rate
    assert optim.peak_learning_rate(config) == pytest.approx(0.045 * 512 / 96)
    assert optim.peak_learning_rate(v1.get_config("quickstart")) == pytest.approx(0.1)
    assert config.label_smoothing == 0.1 and config.model.dropout_rate == 0.2
    assert v1.get_config("width=0.5,resolution=160").image_size == 160
    assert v1.get_config("width=0.5,resolution=160").model.width == 0.5
    assert v1.get_config("profile=0.5flops").model.profile == "0.5flops"
    with pytest.raises(ValueError, match="Unknown config option 'alpha'"):
        v1.get_config("alpha=0.5")
    # MobileNetV3's paper: 0.1 per 4096 images, x0.99 every 3 epochs, weight decay 1e-5, BatchNorm decay 0.99.
    large = v3.get_config()
    assert (large.model.variant, large.model.bn_momentum, large.model.bn_epsilon) == ("large", 0.99, 1e-3)
    assert optim.peak_learning_rate(large) == pytest.approx(0.1)
    assert (large.lr_decay_factor, large.lr_decay_epochs, large.weight_decay) == (0.99, 3.0, 1e-5)
    quick = v3.get_config("quickstart")
    assert (quick.model.variant, quick.model.width, quick.dataset) == ("small", 1.0, "mobilenet_shapes/32")
    assert v3.get_config("variant=large,minimal").model.minimal


def test_rmsprop_matches_tensorflow_by_hand():
    """Two steps of TF's RMSProp (ms starts at 1, eps in the sqrt, momentum on lr * step) plus L2."""
    config = v1.get_config()
    config.weight_decay, config.rmsprop_epsilon = 0.01, 1.0
    lr = 0.2
    tx = optim.create_optimizer(config, optax.constant_schedule(lr))
    params = {"conv_pw": {"kernel": jnp.array([1.0, -2.0])}, "bn": {"scale": jnp.array([0.5])}}
    grads = [
        {"conv_pw": {"kernel": jnp.array([0.3, 0.1])}, "bn": {"scale": jnp.array([-0.4])}},
        {"conv_pw": {"kernel": jnp.array([-0.2, 0.5])}, "bn": {"scale": jnp.array([0.1])}},
    ]
    state = tx.init(params)
    w, s = np.array([1.0, -2.0]), np.array([0.5])
    ms_w, ms_s, mom_w, mom_s = np.ones(2), np.ones(1), np.zeros(2), np.zeros(1)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        gw = np.asarray(g["conv_pw"]["kernel"]) + 0.01 * w  # L2 on the kernel only
        gs = np.asarray(g["bn"]["scale"])  # no decay on BatchNorm
        ms_w, ms_s = 0.9 * ms_w + 0.1 * gw**2, 0.9 * ms_s + 0.1 * gs**2
        mom_w, mom_s = 0.9 * mom_w + lr * gw / np.sqrt(ms_w + 1.0), 0.9 * mom_s + lr * gs / np.sqrt(ms_s + 1.0)
        w, s = w - mom_w, s - mom_s
        np.testing.assert_allclose(params["conv_pw"]["kernel"], w, rtol=1e-6)
        np.testing.assert_allclose(params["bn"]["scale"], s, rtol=1e-6)


@pytest.mark.parametrize(
    "model", [MobileNetV1(width=0.25), MobileNetV2(width=0.35), MobileNetV3(variant="small", width=0.5)]
)
def test_weight_decay_mask(model):
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    mask = optim.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["['stem_conv']['kernel']"] and flat["['classifier']['kernel']"]
    assert (
        flat["['block_1']['conv_pw']['kernel']"]
        if isinstance(model, MobileNetV1)
        else flat["['block_1']['conv_pwl']['kernel']"]
    )
    assert not flat["['classifier']['bias']"]
    for path, decays in flat.items():
        if "conv_dw" in path or "bn" in path or path.endswith("['bias']"):
            assert not decays, path
    assert sum(flat.values()) == sum(1 for p in flat if p.endswith("['kernel']") and "conv_dw" not in p)


@pytest.mark.slow
def test_train_and_evaluate_imagenet_config_on_mock_data(tmp_path):
    config = tiny(v1.get_config(), half_precision=True)  # the recipe's bfloat16 path
    with tfds.testing.mock_data(num_examples=20):
        state, results = training.train_and_evaluate(config, str(tmp_path))
        # The final EMA figures are those of the EMA weights saved in the last checkpoint.
        assert evaluate.run(config, workdir=str(tmp_path)) == pytest.approx(results["validation_ema"])
    assert int(state.step) == 3
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert {"loss", "top1", "top5", "learning_rate", "images_per_sec"} <= set(train[0])
    evals = [r for r in records if r["split"] == "validation"]
    assert evals[-1]["examples"] == 20  # the whole split: 8 + 8 + 4 padded, nothing dropped
    assert results["validation"]["examples"] == 20
    assert os.listdir(tmp_path / "tensorboard") and (tmp_path / "model.json").exists()
    assert checkpoint.TrainCheckpoints(str(tmp_path)).latest_step() == 3


def test_bad_config_values_are_clear_errors(tmp_path):
    for field, value, message in [
        ("learning_rate", -1.0, "learning_rate must be positive"),
        ("crop_area_range", (0.9, 0.1), "crop_area_range"),
        ("crop_area_range", ("oops",), "crop_area_range must be two numbers"),
        ("model.width", 0.0, "model.width must be positive"),
        ("model.architecture", "ResNet50", "model.architecture must be one of"),
        ("label_smoothing", 1.5, "label_smoothing"),
    ]:
        config = tiny(v1.get_config())
        node, _, name = field.rpartition(".")
        setattr(config[node] if node else config, name, value)
        with pytest.raises(ConfigError, match=message):
            training.train_and_evaluate(config, str(tmp_path))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(PermissionError, match="Cannot create workdir"):
        training.train_and_evaluate(tiny(v1.get_config()), str(not_a_dir / "run"))


@pytest.mark.slow
def test_cli_errors_are_one_sentence(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/v1.py",
            "--workdir",
            str(tmp_path),
            "--config.dataset=no_such_set",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "error: Unknown dataset 'no_such_set'" in result.stderr and "Traceback" not in result.stderr


def test_init_from_converted_weights_with_a_new_head(tmp_path, image_folder):
    source = MobileNetV1(num_classes=10, width=0.25)
    variables = random_init.initial(source, 32, seed=3)
    checkpoint.save_model(tmp_path / "converted", source, variables)
    config = tiny(v1.get_config(), dataset="folder", data_dir=str(image_folder), init_from=str(tmp_path / "converted"))
    model = steps.create_model(config, num_classes=4)
    loaded = training.initial_variables(config, model, 32, jax.random.key(0))
    np.testing.assert_array_equal(
        loaded["params"]["block_5"]["conv_pw"]["kernel"], variables["params"]["block_5"]["conv_pw"]["kernel"]
    )
    np.testing.assert_array_equal(loaded["batch_stats"]["stem_bn"]["mean"], variables["batch_stats"]["stem_bn"]["mean"])
    assert loaded["params"]["classifier"]["kernel"].shape == (256, 4)
    config.model.width = 0.5
    with pytest.raises(ConfigError, match="different architecture"):
        training.initial_variables(config, steps.create_model(config, 4), 32, jax.random.key(0))


@pytest.mark.slow
def test_evaluate_cli_on_a_training_workdir(tmp_path, image_folder):
    config = tiny(v1.get_config(), dataset="folder", data_dir=str(image_folder), num_train_steps=2)
    training.train_and_evaluate(config, str(tmp_path))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobilenet_jax.evaluate",
            "--workdir",  # its config.json names the dataset, image size and precision
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "folder validation: top-1" in result.stdout
    assert "over 20 images, 1 undecodable images skipped" in result.stdout


def test_configs_load_from_another_working_directory(tmp_path):
    """config_flags loads configs/v1.py by path; it must import its sibling from any directory."""
    script = (
        "from mobilenet_jax import cli; "
        f"c = cli.load_config({os.path.join(REPO, 'configs', 'v2.py')!r} + ':width=0.5'); "
        "print(c.model.architecture, c.model.width)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["MobileNetV2", "0.5"]


def test_config_model_section_is_the_architecture():
    config = v2.get_config("width=0.75")
    model = steps.create_model(config, num_classes=7)
    assert isinstance(model, MobileNetV2) and model.width == 0.75 and model.num_classes == 7
    assert model.dropout_rate == 0.2 and model.rounding == "torchvision" and model.dtype == jnp.bfloat16
    assert set(config.model) - {"architecture"} <= set(checkpoint.model_to_dict(model)) | {"depthwise_impl"}
    config.model.alpha = 0.5
    with pytest.raises(ValueError, match=r"MobileNetV2 does not take the field\(s\) \['alpha'\]"):
        steps.create_model(config, num_classes=7)


def test_bad_config_overrides_are_one_sentence():
    """The messages train.py prints for bad --config.* overrides (one command line runs in test_reliability)."""
    from mobilenet_jax import cli

    argv = ["train.py", "--config", "configs/v1.py"]
    message = cli.flag_error_message(ValueError("bad"), [*argv, "--config.no_such_field=1"])
    assert message.startswith("unknown config field 'no_such_field' in --config.no_such_field=1")
    message = cli.flag_error_message(ValueError("bad"), [*argv, "--config.model=MobileNetV2"])
    assert "config field 'model' is a group of fields" in message and "set one of them, e.g. --config.model." in message
