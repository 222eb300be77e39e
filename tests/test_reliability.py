"""Corrupt checkpoints, divergence and bad input: the run survives or stops with one sentence."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import v1
from mobilenet_jax.data import input_pipeline
from mobilenet_jax.errors import CheckpointError, DivergenceError
from mobilenet_jax.training import loop as training
from mobilenet_jax.weights import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(image_folder, **overrides):
    config = v1.get_config()
    config.model.width = 0.25
    for key, value in dict(
        dataset="folder",
        data_dir=str(image_folder),
        image_size=32,
        batch_size=8,
        num_train_steps=6,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
        log_every_steps=1,
        half_precision=False,
        progress_bar=False,
        shuffle_buffer_size=64,
        async_checkpoints=False,
        eval_every_steps=1000,
    ).items():
        setattr(config, key, value)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def train_losses(workdir):
    """The last logged loss of every step (a resumed run appends to metrics.jsonl)."""
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def train_steps(workdir):
    """The step of every train record of metrics.jsonl, in the order written."""
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["step"] for r in records if r["split"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    training.train_and_evaluate(config_for(image_folder), str(workdir))
    return workdir


def _truncate_arrays(step_dir):
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.sep + "d" + os.sep in path + os.sep or "ocdbt" in root:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)


def _remove_metadata(step_dir):
    for root, _, files in os.walk(step_dir):
        for name in files:
            if "METADATA" in name.upper():
                os.remove(os.path.join(root, name))


def _half_written(step_dir):
    for entry in os.listdir(step_dir):
        path = os.path.join(step_dir, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_truncate_arrays, _remove_metadata, _half_written])
def test_resume_falls_back_to_the_newest_good_checkpoint(corrupt, uninterrupted, image_folder, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
    corrupt(str(workdir / "checkpoints" / "6"))
    with open(workdir / "metrics.jsonl") as f:  # keep steps 1-4: the resumed run must redo 5 and 6
        kept = [line for line in f if json.loads(line)["step"] <= 4]
    (workdir / "metrics.jsonl").write_text("".join(kept))

    training.train_and_evaluate(config_for(image_folder), str(workdir))

    expected, got = train_losses(uninterrupted), train_losses(workdir)
    assert got.keys() == expected.keys()
    # Resumed from step 4: exactly one train record per step (a run that retrained from step 0
    # would log steps 1-4 again; the deterministic losses alone could not tell).
    assert train_steps(workdir) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in (5, 6)], [expected[s] for s in (5, 6)], rtol=1e-6)
    (moved,) = os.listdir(workdir / "corrupt_checkpoints")  # renamed aside, not deleted
    assert moved.startswith("6-")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]  # 6 written again, good this time


def test_no_good_checkpoint_is_one_sentence(uninterrupted, image_folder, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    for step in ("2", "4", "6"):
        _half_written(str(workdir / "checkpoints" / step))
    with pytest.raises(CheckpointError, match=r"None of the 3 checkpoint\(s\) in .*checkpoints is usable"):
        training.train_and_evaluate(config_for(image_folder), str(workdir))


def test_evaluation_and_init_from_skip_a_corrupt_checkpoint(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    _truncate_arrays(str(workdir / "checkpoints" / "6"))
    model, variables = checkpoint.load_any(str(workdir))  # what evaluate and init_from call
    reference = checkpoint.TrainCheckpoints(str(uninterrupted), read_only=True).restore_weights(4)
    np.testing.assert_array_equal(
        variables["params"]["stem_conv"]["kernel"], reference["ema_params"]["stem_conv"]["kernel"]
    )
    assert not (workdir / "corrupt_checkpoints").exists()  # reading never moves or writes anything
    with pytest.raises(CheckpointError, match="has no step 9; it has"):
        checkpoint.load_any(str(workdir), step=9)


def _poison_step(monkeypatch, *bad_steps):
    """The batches of training steps ``bad_steps`` get a NaN image (an exploding loss, on cue)."""
    calls = {"train": 0}
    original = input_pipeline.as_numpy

    def as_numpy(batch):
        batch = original(batch)
        if batch["image"].shape[0] == 8 and "mask" in batch and batch["mask"].all():
            calls["train"] += 1
            if calls["train"] in bad_steps:
                batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    monkeypatch.setattr(input_pipeline, "as_numpy", as_numpy)


@pytest.mark.slow
def test_divergence_between_saves_stops_before_saving(monkeypatch, image_folder, tmp_path):
    _poison_step(monkeypatch, 5)
    config = config_for(image_folder, num_train_steps=10, log_every_steps=10, async_checkpoints=True)
    with pytest.raises(DivergenceError, match="Training loss became nan at step 5; lower the learning rate"):
        training.train_and_evaluate(config, str(tmp_path))
    manager = checkpoint.TrainCheckpoints(str(tmp_path), read_only=True)
    assert manager.all_steps() == [2, 4]  # 6 was never written
    for step in (2, 4):
        assert checkpoint.nonfinite_problem(manager.restore_weights(step)) is None
    manager.close()


@pytest.mark.slow
def test_divergence_that_overflows_the_optimizer_state_saves_nothing_poisoned(uninterrupted, image_folder, tmp_path):
    # RMSprop's accumulator overflows one step before the loss does: with a checkpoint every
    # step, that state was saved when the flag covered only the loss and the update.
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    config = config_for(
        image_folder, num_train_steps=30, learning_rate=1e6, checkpoint_every_steps=1, keep_checkpoints=30
    )
    with pytest.raises(DivergenceError, match="Training state became non-finite at step") as info:
        training.train_and_evaluate(config, str(workdir))
    diverged_at = int(str(info.value).split("at step ")[1].split(";")[0])
    manager = checkpoint.TrainCheckpoints(str(workdir), read_only=True)
    assert manager.all_steps() == [2, 4, *range(6, diverged_at)]  # every step before the bad one was saved
    for step in manager.all_steps():
        state = manager.restore_weights(step)  # the whole state, optimizer included; raises if non-finite
        assert checkpoint.nonfinite_problem(state["opt_state"]) is None, step
    manager.close()


@pytest.mark.slow
def test_skipping_nonfinite_updates_rides_out_a_spike(monkeypatch, image_folder, tmp_path):
    _poison_step(monkeypatch, 3)
    config = config_for(image_folder, max_consecutive_nonfinite_skips=2)
    state, _ = training.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 6
    assert checkpoint.nonfinite_problem(jax.device_get(state)) is None
    assert not np.isfinite(train_losses(tmp_path)[3])  # the spike was seen and skipped


@pytest.mark.slow
def test_skipping_stops_after_max_consecutive_nonfinite_skips(monkeypatch, image_folder, tmp_path):
    _poison_step(monkeypatch, 2, 3, 4)  # three bad steps in a row, two allowed
    config = config_for(image_folder, max_consecutive_nonfinite_skips=2, log_every_steps=6, checkpoint_every_steps=6)
    with pytest.raises(DivergenceError, match="Training loss became nan at step 4; lower the learning rate"):
        training.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or os.listdir(tmp_path / "checkpoints") == []


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_sentence(result, fragment, code=None):
    assert result.returncode != 0 and (code is None or result.returncode == code), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]


@pytest.mark.slow
def test_cli_bad_input_is_one_sentence(tmp_path, image_folder):
    # One command line per kind of failure (flag parsing: exit 2; a bad value or a missing folder: exit 1);
    # the messages of every other bad value are tested in-process (test_training, test_cli_errors...).
    train = ("train.py", "--config", "configs/v1.py", "--workdir", str(tmp_path / "w"))
    assert_one_sentence(cli(*train, "--config.width=0.5"), "did you mean 'model.width'?", 2)
    no_train = tmp_path / "no_train"
    shutil.copytree(image_folder / "validation", no_train / "validation")
    assert_one_sentence(
        cli(*train, "--config.dataset=folder", f"--config.data_dir={no_train}"), "has no train/ folder", 1
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli(
        "-m",
        "mobilenet_jax.evaluate",
        "--config",
        "configs/v1.py",
        "--workdir",
        str(empty),
        "--config.dataset=folder",
        f"--config.data_dir={image_folder}",
    )
    assert_one_sentence(result, "has no model.json; name a model directory", 1)
    assert os.listdir(empty) == [] and "INFO" not in result.stderr  # read-only, quiet
    assert_one_sentence(
        cli("-m", "mobilenet_jax.convert", str(tmp_path / "none.pth"), str(tmp_path / "o")),
        "No PyTorch checkpoint",
        1,
    )
    assert_one_sentence(cli("-m", "mobilenet_jax.summary", "--image_size=0"), "--image_size must be positive", 1)


def train_cli(workdir, image_folder, *overrides):
    """train.py on the tiny folder config of these tests."""
    tiny = ["--config.dataset=folder", f"--config.data_dir={image_folder}", "--config.model.width=0.25"]
    tiny += ["--config.image_size=32", "--config.batch_size=8", "--config.num_train_steps=6"]
    tiny += ["--config.half_precision=False", "--config.checkpoint_every_steps=2", "--config.progress_bar=False"]
    tiny += ["--config.shuffle_buffer_size=64"]
    return cli("train.py", "--config", "configs/v1.py", "--workdir", str(workdir), *tiny, *overrides)


@pytest.mark.slow
def test_corrupt_checkpoint_on_the_command_line(tmp_path, image_folder, uninterrupted):
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted, resumed)
    _truncate_arrays(str(resumed / "checkpoints" / "6"))
    result = train_cli(resumed, image_folder, "--config.log_every_steps=1")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Skipping checkpoint 6 does not restore" in result.stderr and "Final evaluation" in result.stdout
    # (Divergence itself, its sentence and what it leaves on disk: the in-process tests above.)
