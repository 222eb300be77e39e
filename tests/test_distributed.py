"""Data parallelism for real: 1 vs 2 simulated devices, 2 processes vs 1, resume after kill/SIGTERM.

Each run is a fresh process (tests/train_worker.py), because the device count and
jax.distributed must be set before JAX starts. All runs train the same tiny
MobileNetV1 on the same image folder with cross-replica BatchNorm, distilling from
the same teacher, so that any device or process count computes the same function of
the same global batches.
The runs compute in float64: in float32, a tiny network with BatchNorm over small
feature maps amplifies the rounding differences of another reduction order to
~1e-3 within a few steps, which would hide a real error behind a loose tolerance.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
# MobileNetV1's first four blocks (two of them stride 2), at width 0.25: channels 8, 16, 32, 32, 64. Every kind of
# layer and a 4x4 final map; a third of the full network's compile time, which dominates these short runs.
PROFILE = (32, (64, (128, 2), 128, (256, 2)))


def worker_args(workdir, image_folder, cache_dir, teacher=None, **extra):
    args = {
        "workdir": str(workdir),
        "cache_dir": str(cache_dir),
        "float64": True,
        "overrides": {
            "dataset": "folder",
            "data_dir": str(image_folder),
            "eval_split": "validation",
            "model.width": 0.25,
            "model.profile": PROFILE,
            "image_size": 32,
            "batch_size": 8,
            "num_train_steps": STEPS,
            "checkpoint_every_steps": 2,
            "log_every_steps": 1,
            "half_precision": False,
            "cross_replica_bn": True,
            "progress_bar": False,
            "shuffle_buffer_size": 64,
            "ema_decay": 0.9,  # compared too: final_params.npz holds the EMA parameters
            "learning_rate": 0.24,  # 0.02 at batch 8: small, so training stays far from chaotic
        },
    }
    if teacher is not None:  # distillation: the teacher's logits enter each device's loss on its own shard
        args["overrides"].update({"teacher": str(teacher), "distill_alpha": 0.5})
    args.update(extra)
    return args


def start(args, **popen):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train_worker", json.dumps(args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def params(workdir):
    with np.load(os.path.join(workdir, "final_params.npz")) as data:
        return {k: data[k] for k in data.files}


def losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def assert_same_training(a, b, rtol=1e-6, atol=1e-8):
    """Same losses and final parameters. In float64, runs that only split the work differently differ by
    reduction order; the sharp teacher's large soft-term gradients amplify that over 8 steps to ~1e-8 of
    the parameters' scale (measured 1.0e-8 absolute at most), where a wrongly split step differs by far more."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([la[s] for s in sorted(la)], [lb[s] for s in sorted(lb)], rtol=rtol)
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_allclose(pa[key], pb[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A distillation teacher whose soft targets dominate the loss and differ from image to image: its
    classifier is rescaled so that the logits' deviations from their mean over images have std 20
    (at temperature 4: sharp, and a different class wins on different images)."""
    import jax
    import numpy as np

    from mobilenet_jax import MobileNetV1
    from mobilenet_jax.weights import checkpoint

    model = MobileNetV1(num_classes=4, width=0.25, profile=PROFILE)
    images = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.key(5), images[:1])
    _, features = model.apply(variables, images, return_features=True)
    pooled = np.asarray(features["pre_logits"], np.float64)
    kernel = np.asarray(variables["params"]["classifier"]["kernel"], np.float64)
    deviations = (pooled - pooled.mean(0)) @ kernel
    kernel *= 20.0 / deviations.std()
    variables["params"]["classifier"]["kernel"] = kernel.astype(np.float32)
    variables["params"]["classifier"]["bias"] = (-pooled.mean(0) @ kernel).astype(np.float32)
    directory = tmp_path_factory.mktemp("teacher") / "teacher"
    checkpoint.save_model(directory, model, variables)
    return directory


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, image_folder, cache_dir, teacher):
    """The reference run every other run of this module must reproduce: one device, distilling from a teacher.

    Distillation is on in all of them (one worker run less per comparison); the per-device
    BatchNorm test below covers the step without a teacher on two devices.
    """
    workdir = tmp_path_factory.mktemp("one_device")
    finish(start(worker_args(workdir, image_folder, cache_dir, teacher, devices=1)))
    return workdir


@pytest.mark.slow
def test_two_devices_with_the_cpu_kernels_match_one_device_on_xla_ops(
    one_device_run, tmp_path, image_folder, cache_dir, teacher
):
    """shard_map on 2 devices, cross-replica BatchNorm, distillation, with the C++ depthwise and BatchNorm kernels
    (mobilenet_jax.kernels, 'ffi') trains as one device does with XLA's own operations ('auto' takes those at
    this size: shifted multiply-adds, flax's BatchNorm). Two processes with 'auto' on two devices:
    test_two_processes_match_one_process."""
    args = worker_args(tmp_path, image_folder, cache_dir, teacher, devices=2)
    args["overrides"]["model.depthwise_impl"] = "ffi"
    finish(start(args))
    assert_same_training(one_device_run, tmp_path)
    # The distillation loss is in use: at the first step the student's logits are ~0, so its cross-entropy
    # is ~log(4) = 1.39 and its tempered distribution uniform; against the sharp teacher the soft term is
    # alpha * T^2 * KL = 0.5 * 16 * (log 4 - H(teacher)), up to 11.1. Without the teacher the loss is ~1.39.
    assert 5.0 < losses(tmp_path)[1] < 12.0


@pytest.mark.slow
def test_per_device_batchnorm_on_two_devices_is_the_mean_of_two_half_batch_gradients(tmp_path, image_folder, cache_dir):
    """The default BatchNorm (statistics per device): one step on 2 devices, against the same step written
    out by hand, each half batch through the model on its own (float32 both: float64 initialises differently).

    Some training files are not images: they come as blank examples with mask 0, which go through
    BatchNorm but not into the loss, and the loss is the mean over the valid examples of both devices.
    """
    import shutil

    import jax
    import optax

    from mobilenet_jax.data import input_pipeline
    from mobilenet_jax.training import optim, steps
    from tests.train_worker import make_config

    folder = tmp_path / "folder"
    shutil.copytree(image_folder, folder)
    for i, name in enumerate(sorted(os.listdir(folder / "train")) * 2):
        (folder / "train" / name / f"broken{i}.jpg").write_bytes(b"not an image")
    image_folder = folder
    args = worker_args(tmp_path / "run", image_folder, cache_dir, devices=2, float64=False)
    args["overrides"].update({"cross_replica_bn": False, "num_train_steps": 1, "warmup_epochs": 0.0})
    finish(start(args))
    got = {k.removeprefix("['params']"): v for k, v in params(tmp_path / "run").items() if k.startswith("['params']")}

    config = make_config(args["overrides"])
    info = input_pipeline.get_dataset("folder", str(image_folder))
    model = steps.create_model(config, info.num_classes)
    tx = optim.create_optimizer(
        config, optim.create_learning_rate_fn(config, input_pipeline.num_examples(info, "train") // config.batch_size)
    )
    state = optim.create_train_state(jax.random.PRNGKey(config.seed), model, tx, config.image_size)
    stream = input_pipeline.create_train_dataset(
        info,
        config.train_split,
        global_batch_size=8,
        image_size=32,
        seed=config.seed,
        area_range=tuple(config.crop_area_range),
        shuffle_buffer_size=64,
    )
    batch = input_pipeline.as_numpy(next(iter(stream)))

    mask = np.asarray(batch["mask"])
    assert 0 < mask.sum() < 8  # the first batch holds masked examples (deterministic: seed and file names)

    def summed_loss(params, images, labels, weights):
        logits, _ = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        targets = optax.smooth_labels(jax.nn.one_hot(labels, info.num_classes), config.label_smoothing)
        return (optax.softmax_cross_entropy(logits, targets) * weights).sum()

    grad = jax.jit(jax.grad(summed_loss))  # one compile per group size, instead of op-by-op dispatch

    def one_step(groups):  # the mean loss over the valid examples, BatchNorm statistics per group
        grads = [grad(state.params, batch["image"][g], batch["label"][g], batch["mask"][g]) for g in groups]
        grads = jax.tree.map(lambda *g: sum(g) / mask.sum(), *grads)
        updates, _ = tx.update(grads, state.opt_state, state.params)
        flat = jax.tree_util.tree_flatten_with_path(optax.apply_updates(state.params, updates))[0]
        return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}

    per_device, whole_batch = one_step([slice(0, 4), slice(4, 8)]), one_step([slice(0, 8)])
    assert got.keys() == per_device.keys()
    error = max(float(np.abs(got[k] - per_device[k]).max()) for k in got)
    other = max(float(np.abs(whole_batch[k] - per_device[k]).max()) for k in got)
    # float32, another reduction order: measured 3.0e-8 at most; the statistics of the whole batch (cross-replica
    # BatchNorm) move the parameters 1.6e-3 away, 50 000 times as far.
    print(f"per-device BatchNorm, 2 devices vs by hand: {error:.1e}; vs whole-batch statistics: {other:.1e}")
    assert error <= 1e-6 and other > 100 * 1e-6


@pytest.mark.slow
def test_two_processes_match_one_process(one_device_run, tmp_path, image_folder, cache_dir, teacher):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [
        start(
            worker_args(
                tmp_path,
                image_folder,
                cache_dir,
                teacher,
                devices=1,
                coordinator=f"127.0.0.1:{port}",
                num_processes=2,
                process_id=i,
            )
        )
        for i in range(2)
    ]
    for process in processes:
        finish(process)
    assert_same_training(one_device_run, tmp_path)


def test_non_divisible_batch_is_a_clear_error():
    from unittest import mock

    from mobilenet_jax.training import distributed

    mesh = mock.Mock(devices=np.empty((2,)))
    with pytest.raises(ValueError, match=r"batch_size=7 must be a positive multiple of the device count \(2\); try 6"):
        distributed.check_batch_size(7, mesh)
    distributed.check_batch_size(8, mesh)


def _start_step(stdout):
    """The step a run started from, from its 'Training ... steps A -> B' line."""
    line = next(line for line in stdout.splitlines() if line.startswith("Training "))
    return int(line.split(" steps ")[1].split(" -> ")[0])


def _wait_for_checkpoint(workdir, above, process, timeout=240):
    directory = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"worker ended early: {process.stderr.read()[-2000:]}")
        # Completed steps only: orbax writes "N.orbax-checkpoint-tmp" and renames it when done.
        names = os.listdir(directory) if os.path.isdir(directory) else []
        steps = [int(d) for d in names if d.isdigit() and int(d) > above]
        if steps:
            return max(steps)
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigterm_and_kill_then_resume_match_an_uninterrupted_run(
    one_device_run, tmp_path, image_folder, cache_dir, teacher
):
    args = worker_args(tmp_path, image_folder, cache_dir, teacher, devices=1, step_delay=0.5)
    # 1. Preemption: SIGTERM saves the current step and exits cleanly.
    process = start(args)
    _wait_for_checkpoint(tmp_path, 0, process)
    process.send_signal(signal.SIGTERM)
    out = finish(process)
    assert "PREEMPTED" in out and _start_step(out) == 0
    preempted = int(out.split("PREEMPTED")[1].split()[0])
    assert 2 <= preempted < STEPS - 2
    # 2. A hard kill at an arbitrary moment after the next checkpoint.
    process = start(args)
    killed_after = _wait_for_checkpoint(tmp_path, preempted, process)
    process.kill()
    out, _ = process.communicate()
    assert _start_step(out) == preempted  # resumed from the SIGTERM checkpoint, not from step 0
    assert killed_after < STEPS
    # 3. Restart to the end, from the newest checkpoint the kill left.
    newest = max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert _start_step(finish(start(args))) == newest >= killed_after
    assert_same_training(one_device_run, tmp_path, rtol=0, atol=0)
    # Every step up to the SIGTERM was trained and logged once (a restart from step 0 would log them again).
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert [s for s in steps if s <= preempted] == list(range(1, preempted + 1))
