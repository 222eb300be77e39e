"""Knowledge distillation and fine-tuning pruned models: the loss by hand, the teacher untouched, bad teachers.

The 1-vs-2-device agreement with a teacher is in test_distributed.py (separate processes).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import v1, v3
from mobilenet_jax import MobileNetV1, MobileNetV2, MobileNetV3
from mobilenet_jax.compression import distill, prune
from mobilenet_jax.errors import ConfigError
from mobilenet_jax.training import distributed, optim, steps
from mobilenet_jax.training import loop as training
from mobilenet_jax.weights import checkpoint
from tests import variables as random_init

from .test_training import tiny


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A MobileNetV2 teacher (another architecture than the student), 4 classes, in a model directory."""
    model = MobileNetV2(num_classes=4, width=0.35, block_table=((1, 16, 1, 1), (6, 24, 2, 2)), dropout_rate=0.0)
    variables = random_init.initial(model, 32, seed=11)
    variables["params"]["classifier"]["kernel"] = variables["params"]["classifier"]["kernel"] * 2000.0
    directory = tmp_path_factory.mktemp("teacher")
    checkpoint.save_model(directory, model, variables)
    return directory


def test_distillation_step_matches_a_hand_computed_loss(teacher_dir, image_folder, tmp_path):
    # A three-block student (quick to compile), given as train.py takes one: an init_from directory.
    student = MobileNetV1(num_classes=4, profile=(8, (16, (32, 2), 32)))
    checkpoint.save_model(tmp_path / "student", student, random_init.initial(student, 32))
    config = tiny(v1.get_config(), teacher=str(teacher_dir), label_smoothing=0.1, init_from=str(tmp_path / "student"))
    config.dataset, config.data_dir = "folder", str(image_folder)
    config.distill_temperature, config.distill_alpha, config.warmup_epochs = 3.0, 0.7, 0.0
    run = training.Run.from_config(config, str(tmp_path / "run"))  # model, optimizer and teacher as train.py gets them
    model, teacher, mesh, tx = run.model, run.teacher, run.mesh, run.tx
    assert model.profile == student.profile and teacher[0].temperature == 3.0 and teacher[0].alpha == 0.7
    state = optim.create_train_state(jax.random.key(0), model, tx, 32)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 4, size=8).astype(np.int32),
        "mask": np.ones(8, np.float32),
    }
    # By hand, in numpy: the student's train-mode logits and the teacher's inference logits.
    student, _ = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
    )
    teacher_logits = np.asarray(teacher[0].model.apply(teacher[1], batch["image"], train=False), np.float64)
    student = np.asarray(student, np.float64)
    t, alpha = 3.0, 0.7
    p_teacher = np.exp(_log_softmax(teacher_logits / t))
    kl = np.sum(p_teacher * (np.log(p_teacher) - _log_softmax(student / t)), -1)
    targets = np.eye(4)[batch["label"]] * 0.9 + 0.1 / 4
    cross_entropy = -np.sum(targets * _log_softmax(student), -1)
    expected = np.mean(alpha * t * t * kl + (1 - alpha) * cross_entropy)
    assert np.std(teacher_logits) > 0.5 and np.mean(kl) > 1e-3  # the soft term matters

    params_before = jax.tree.map(np.array, state.params)
    train_fn = steps.make_train_step(config, model, mesh, tx, run.learning_rate_fn, teacher)
    new_state, metrics = train_fn(state, distributed.global_batch(batch, mesh))
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    # The student moved; the teacher did not, and it is not part of the train state.
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), new_state.params, params_before)
    assert max(jax.tree.leaves(moved)) > 0
    # The teacher's arrays were read, not donated with the state (a donated array is deleted).
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(teacher[1]) if isinstance(leaf, jax.Array))
    assert jax.tree.structure(new_state.params) == jax.tree.structure(params_before)

    # alpha = 0 is plain cross-entropy.
    assert float(jnp.mean(distill.distillation_loss(student, teacher_logits, targets, t, 0.0))) == pytest.approx(
        np.mean(cross_entropy), rel=1e-6
    )


def test_bad_teachers_are_one_sentence(teacher_dir, tmp_path):
    config = tiny(v1.get_config(), teacher=str(teacher_dir))
    with pytest.raises(ConfigError, match="has 4 classes and the dataset 10; distillation compares"):
        distill.load_teacher(config, num_classes=10)
    config.teacher = str(tmp_path / "missing")
    with pytest.raises(Exception, match="is not a directory"):
        distill.load_teacher(config, num_classes=4)
    config.teacher, config.distill_alpha = str(teacher_dir), 1.5
    with pytest.raises(ConfigError, match=r"distill_alpha must be in \[0, 1\], got 1.5"):
        training.validate_config(config)
    config.distill_alpha, config.distill_temperature = 0.5, 0.0
    with pytest.raises(ConfigError, match="distill_temperature must be positive"):
        training.validate_config(config)


def test_init_from_a_pruned_model_takes_its_architecture(tmp_path, image_folder):
    source = MobileNetV1(num_classes=4, width=0.25)
    variables = random_init.initial(source, 32, seed=3)
    channels = (8, (16, (24, 2), 24, (48, 2), 48, (96, 2), 96, 96, 96, 96, 96, (192, 2), 192))
    pruned, pruned_variables, _ = prune.prune(source, variables, channels)
    checkpoint.save_model(tmp_path / "pruned", pruned, pruned_variables)
    # The stock quickstart-like config: its width 0.25 and 'normal' profile give way to the pruned list.
    config = tiny(v1.get_config(), dataset="folder", data_dir=str(image_folder), init_from=str(tmp_path / "pruned"))
    config.model.bn_momentum = 0.8
    model = steps.create_model(config, 4, **training.init_from_fields(config))  # as Run.from_config builds it
    assert model.profile == channels and model.width == 1.0 and model.bn_momentum == 0.8
    loaded = training.initial_variables(config, model, 32, jax.random.key(0))
    np.testing.assert_array_equal(
        loaded["params"]["block_3"]["conv_pw"]["kernel"], pruned_variables["params"]["block_3"]["conv_pw"]["kernel"]
    )
    config.model.architecture = "MobileNetV2"
    with pytest.raises(ConfigError, match="holds a MobileNetV1 and model.architecture is 'MobileNetV2'"):
        training.init_from_fields(config)


@pytest.mark.slow
def test_init_from_another_class_count_with_a_teacher_then_from_a_workdir(tmp_path, image_folder, teacher_dir):
    """The README's compress step 2 through what train.py calls (configs/v3.py): a 10-class MobileNetV3-Small
    directory (squeeze-excitation, hard-swish, the dense layer after the pooling; its first 5 blocks, a quicker
    compile) fine-tuned on the 4-class folder while distilling (a new head), then a second run initialised
    from that run's workdir."""
    network = MobileNetV3(variant="small", width=0.5).network()
    source = MobileNetV3(num_classes=10, network_table=network._replace(blocks=network.blocks[:5]))
    variables = random_init.initial(source, 32, seed=4)
    checkpoint.save_model(tmp_path / "v3", source, variables)
    # A learning rate this small leaves every weight where init_from put it (to ~1e-6).
    settings = dict(
        dataset="folder", data_dir=str(image_folder), learning_rate=1e-9, warmup_epochs=0.0, num_train_steps=1
    )
    first = tiny(v3.get_config("quickstart"), init_from=str(tmp_path / "v3"), teacher=str(teacher_dir), **settings)
    state, results = training.train_and_evaluate(first, str(tmp_path / "first"))
    for path in (("block_3", "se", "conv_reduce", "kernel"), ("head_fc", "kernel")):  # kept, to ~1e-6
        got, want = state.params, variables["params"]
        for key in path:
            got, want = got[key], want[key]
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert state.params["classifier"]["kernel"].shape == (512, 4)  # head_fc's 512 outputs, a new 4-class head
    assert checkpoint.read_model_record(tmp_path / "first") == source.clone(num_classes=4, dropout_rate=0.2)
    assert checkpoint.read_config(tmp_path / "first").teacher == str(teacher_dir)
    assert np.isfinite(results["validation"]["loss"])
    # init_from a training workdir: its newest checkpoint's EMA weights.
    second = tiny(v3.get_config("quickstart"), init_from=str(tmp_path / "first"), **settings)
    state2, _ = training.train_and_evaluate(second, str(tmp_path / "second"))
    _, first_ema = checkpoint.load_any(str(tmp_path / "first"))
    np.testing.assert_allclose(
        state2.params["classifier"]["kernel"], first_ema["params"]["classifier"]["kernel"], atol=1e-6
    )
    assert not np.allclose(
        first_ema["params"]["classifier"]["kernel"], variables["params"]["classifier"]["kernel"][:, :4]
    )


def test_a_teacher_with_other_inputs_gets_them(tmp_path):
    """A Keras-converted teacher expects x / 127.5 - 1: the step re-normalises the student's batch for it."""
    from mobilenet_jax.data import input_pipeline
    from mobilenet_jax.weights import convert_keras

    model = MobileNetV1(num_classes=4, width=0.25)
    checkpoint.save_model(
        tmp_path / "keras_teacher",
        model,
        random_init.initial(model, 32),
        preprocessing=convert_keras.PREPROCESSING,
    )
    config = tiny(v1.get_config(), teacher=str(tmp_path / "keras_teacher"))
    teacher, _ = distill.load_teacher(config, num_classes=4)
    rgb = np.random.default_rng(0).uniform(0, 255, size=(2, 8, 8, 3)).astype(np.float32)
    normalised = (rgb - np.array(input_pipeline.MEAN_RGB)) / np.array(input_pipeline.STDDEV_RGB)
    np.testing.assert_allclose(teacher.inputs(jnp.asarray(normalised, jnp.float32)), rgb / 127.5 - 1, atol=1e-5)
