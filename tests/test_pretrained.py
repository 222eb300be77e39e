"""Published weights by name: each ecosystem's cache, offline, parity with the source framework, bad files.

Every cache is pre-populated with random-init files in the layout the real ones use: the
Hugging Face Hub cache (``models--timm--X/blobs/<sha256>``, a snapshot link, ``refs/main``),
torch hub's ``checkpoints/`` (torchvision's legacy pickle format, as ``mobilenet_v2-b0353104.pth``
is), and Keras's ``models/`` (Keras 2 HDF5 weights by layer name, as the application files are).
The source framework then loads the same file its own way (timm's ``pretrained_cfg_overlay``,
``torch.load``, ``keras.applications`` with ``weights='imagenet'``), and the logits are compared.
Downloads are off (``HF_HUB_OFFLINE=1``, ``MOBILENET_JAX_OFFLINE=1``); a "download" is a monkeypatched
copy of a local file.
"""

import dataclasses
import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
keras = pytest.importorskip("keras")
torchvision = pytest.importorskip("torchvision")

import mobilenet_jax  # noqa: E402
from mobilenet_jax.weights import convert, hub  # noqa: E402
from mobilenet_jax.weights import torch_reference as ref  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
TIMM_V1 = "timm/mobilenetv1_100.ra4_e3600_r224_in1k"
TIMM_V2 = "timm/mobilenetv2_050.lamb_in1k"
TORCHVISION = "torchvision/mobilenet_v2"
KERAS_V2 = "keras/mobilenet_v2_0.35_96"
KERAS_V1_NO_TOP = "keras/mobilenet_0.25_128_no_top"


def nhwc(batch, size, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def put_in_hub_cache(cache, repo_id, filename, data):
    """The Hub cache's layout: the file as a blob named by its sha256, a snapshot link to it, refs/main."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha256(data).hexdigest()
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / sha).write_bytes(data)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / filename).symlink_to(f"../../blobs/{sha}")
    return snapshot / filename


def timm_reference(name):
    torch.manual_seed(0)
    return with_batch_statistics(ref.randomize(timm.create_model(name, pretrained=False)))


def with_batch_statistics(module):
    """BatchNorm statistics of a random batch, so a random-init model gives distinct logits per image
    (random statistics wash 50 layers out)."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    module.train()
    with torch.no_grad():
        module(nchw(nhwc(8, 48, seed=100)))
    return module.eval()


def keras_reference(architecture, alpha, size, include_top):
    """A random-init keras.applications model: randomised BatchNorm, He-normal convs, O(1) logits."""
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, architecture)(
        alpha=alpha, weights=None, input_shape=(size, size, 3), include_top=include_top
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            n = weights[0].shape[0]
            layer.set_weights([1 + 0.2 * rng.normal(size=n), 0.2 * rng.normal(size=n), weights[2], weights[3]])
            layer.momentum = 0.0
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and len(weights) == 1:
            kernel = weights[0]
            fan_in = np.prod(kernel.shape[:2]) * (
                1 if isinstance(layer, keras.layers.DepthwiseConv2D) else kernel.shape[2]
            )
            layer.set_weights([rng.normal(size=kernel.shape) * np.sqrt(2.0 / fan_in)])
        elif weights and isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):  # the classifier
            kernel, bias = weights
            layer.set_weights(
                [rng.normal(size=kernel.shape) / kernel.shape[-2] ** 0.5, 0.1 * rng.normal(size=bias.shape)]
            )
    model(nhwc(32, size, seed=100), training=True)
    return model


def save_keras_legacy_h5(model, path):
    """Keras 2's HDF5 weights file (layer_names + one group per layer), the format of the application files."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """The four caches, each holding random-init files where its ecosystem keeps the real ones."""
    root = tmp_path_factory.mktemp("caches")
    dirs = {k: root / k for k in ("hf", "torch", "keras", "converted")}
    from safetensors.torch import save_file

    files = {}
    for name in (TIMM_V1, TIMM_V2):
        module = timm_reference(hub.CATALOGUE[name].repo_id.split("/")[1].split(".")[0])
        scratch = root / "scratch.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, scratch)
        files[name] = put_in_hub_cache(
            dirs["hf"], hub.CATALOGUE[name].repo_id, "model.safetensors", scratch.read_bytes()
        )
    torch.manual_seed(1)
    module = with_batch_statistics(ref.randomize(torchvision.models.mobilenet_v2(), seed=1))
    scratch = root / "scratch.pth"
    torch.save(module.state_dict(), scratch, _use_new_zipfile_serialization=False)  # like b0353104
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    # The published name carries the published hash; this random file's name carries its own.
    torchvision_entry = dataclasses.replace(hub.CATALOGUE[TORCHVISION], filename=f"mobilenet_v2-{digest[:8]}.pth")
    (dirs["torch"] / "hub" / "checkpoints").mkdir(parents=True)
    files[TORCHVISION] = dirs["torch"] / "hub" / "checkpoints" / torchvision_entry.filename
    files[TORCHVISION].write_bytes(scratch.read_bytes())
    (dirs["keras"] / "models").mkdir(parents=True)
    for name, architecture, alpha, size, top in ((KERAS_V2, "MobileNetV2", 0.35, 96, True),
                                                 (KERAS_V1_NO_TOP, "MobileNet", 0.25, 128, False)):  # fmt: skip
        files[name] = dirs["keras"] / "models" / hub.CATALOGUE[name].filename
        save_keras_legacy_h5(keras_reference(architecture, alpha, size, top), files[name])
    return dirs, files, torchvision_entry


@pytest.fixture(autouse=True)
def offline_caches(caches, monkeypatch):
    dirs, _, torchvision_entry = caches
    monkeypatch.setenv("HF_HUB_CACHE", str(dirs["hf"]))
    monkeypatch.setenv("TORCH_HOME", str(dirs["torch"]))
    monkeypatch.setenv("KERAS_HOME", str(dirs["keras"]))
    monkeypatch.setenv("MOBILENET_JAX_CACHE", str(dirs["converted"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MOBILENET_JAX_OFFLINE", "1")
    monkeypatch.setitem(hub.CATALOGUE, TORCHVISION, torchvision_entry)

    def no_download(url, path):
        raise AssertionError(f"the tests must not download ({url})")

    monkeypatch.setattr(hub, "download", no_download)


def logits(model, variables, x):
    return np.asarray(jax.jit(lambda v, i: model.apply(v, i, train=False))(variables, x))


def check_parity(got, expected):
    assert expected.std() > 0.1 and np.abs(expected[0] - expected[1]).max() > 0.05, "O(1), distinct logits"
    assert np.abs(got - expected).max() < TOLERANCE


# ----------------------------------------------------------------------------- the catalogue


def test_catalogue_agrees_with_timm_and_torchvision_registries():
    """Every V1/V2 tag timm publishes is here with timm's own inputs; torchvision's URLs and top-1 are its own."""
    tags = {f"timm/{n}" for n in timm.list_pretrained("mobilenetv1*") + timm.list_pretrained("mobilenetv2*")}
    assert tags == {n for n in hub.CATALOGUE if n.startswith("timm/")}
    for name in tags:
        cfg = timm.models.get_pretrained_cfg(name.removeprefix("timm/")).to_dict()
        inputs = hub.CATALOGUE[name].preprocessing
        np.testing.assert_allclose(inputs.mean_rgb, np.array(cfg["mean"]) * 255)
        np.testing.assert_allclose(inputs.stddev_rgb, np.array(cfg["std"]) * 255)
        assert (inputs.interpolation, inputs.crop_fraction) == (cfg["interpolation"], cfg["crop_pct"])
        assert cfg["hf_hub_id"] == hub.CATALOGUE[name].repo_id
    weights_enum = torchvision.models.MobileNet_V2_Weights
    for weights, name in ((weights_enum.IMAGENET1K_V1, TORCHVISION),
                          (weights_enum.IMAGENET1K_V2, "torchvision/mobilenet_v2.imagenet1k_v2")):  # fmt: skip
        published = hub.CATALOGUE[name]
        assert weights.url == published.url
        assert published.top1 == weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]
        resize = weights.transforms().resize_size[0]
        assert round(224 / published.preprocessing.crop_fraction) == resize
    listing = mobilenet_jax.list_pretrained()
    assert (
        "timm/mobilenetv2_100.ra_in1k" in listing
        and "72.95" in listing
        and "keras/mobilenet_0.25_128_no_top" in listing
    )


def test_keras_file_names_and_urls_are_the_ones_keras_asks_for(caches, monkeypatch):
    """keras.applications itself, with weights='imagenet', asks its file cache for our file names and URLs
    and then loads the random-init file it is handed."""
    from keras.src.utils import file_utils

    dirs, files, _ = caches
    asked = []

    def get_file(fname, origin, cache_subdir="datasets", **_):
        asked.append((fname, origin, cache_subdir))
        return os.path.join(dirs["keras"], cache_subdir, fname)

    monkeypatch.setattr(file_utils, "get_file", get_file)
    keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights="imagenet")
    keras.applications.MobileNet(alpha=0.25, input_shape=(128, 128, 3), weights="imagenet", include_top=False)
    expected = [(hub.CATALOGUE[n].filename, hub.CATALOGUE[n].url, "models") for n in (KERAS_V2, KERAS_V1_NO_TOP)]
    assert asked == expected
    assert all(hub.CATALOGUE[n].cache_path() == str(files[n]) for n in (KERAS_V2, KERAS_V1_NO_TOP))


# ----------------------------------------------------------------------------- parity, offline


@pytest.mark.parametrize("name", [TIMM_V1, TIMM_V2])
def test_timm_hub_names_load_offline_with_timms_logits(caches, name):
    _, files, _ = caches
    reference = timm.create_model(
        name.removeprefix("timm/"), pretrained=True, pretrained_cfg_overlay={"file": str(files[name])}
    ).eval()
    model, variables = loaded = mobilenet_jax.pretrained(name)
    x = nhwc(2, 64, seed=1)
    with torch.no_grad():
        check_parity(logits(model, variables, x), reference(nchw(x)).numpy())
    assert loaded.preprocessing == hub.CATALOGUE[name].preprocessing
    assert (model.activation if name == TIMM_V1 else model.width) == ("relu6" if name == TIMM_V1 else 0.5)


def test_torchvision_legacy_file_loads_without_torch_and_matches_torchvision(caches, monkeypatch):
    _, files, _ = caches
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(files[TORCHVISION], weights_only=True))
    monkeypatch.setitem(sys.modules, "torch", None)  # the file is read without torch
    model, variables = mobilenet_jax.pretrained(TORCHVISION)
    monkeypatch.undo()
    x = nhwc(2, 64, seed=2)
    with torch.no_grad():
        check_parity(logits(model, variables, x), reference.eval()(nchw(x)).numpy())


@pytest.mark.parametrize("name, architecture, alpha, size, top", [
    (KERAS_V2, "MobileNetV2", 0.35, 96, True), (KERAS_V1_NO_TOP, "MobileNet", 0.25, 128, False)])  # fmt: skip
def test_keras_names_load_offline_with_keras_logits(caches, monkeypatch, name, architecture, alpha, size, top):
    from keras.src.utils import file_utils

    dirs, files, _ = caches
    monkeypatch.setattr(file_utils, "get_file", lambda fname, *a, **k: str(dirs["keras"] / "models" / fname))
    reference = getattr(keras.applications, architecture)(
        alpha=alpha, input_shape=(size, size, 3), weights="imagenet", include_top=top, classifier_activation=None
    )
    model, variables = loaded = mobilenet_jax.pretrained(name)
    x = nhwc(2, size, seed=3)
    expected = np.asarray(reference(x, training=False))
    if not top:  # the backbone's features, pooled: what the no-top model gives a transfer-learning head
        expected = expected.mean(axis=(1, 2))
        pooled = jax.jit(lambda v, i: model.apply(v, i, train=False, return_features=True)[1]["pre_logits"])
        got = np.asarray(pooled(variables, x))
    else:
        got = logits(model, variables, x)
    check_parity(got, expected)
    assert loaded.preprocessing.same_normalization(hub.KERAS) and loaded.entry.image_size == size


# ----------------------------------------------------------------------------- the converted copy


def test_second_call_reuses_the_converted_copy_until_the_source_changes(caches, monkeypatch):
    _, files, _ = caches
    first = mobilenet_jax.pretrained(TIMM_V2)

    def no_conversion(*_, **__):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        patch.setattr(convert, "load_published", no_conversion)
        second = mobilenet_jax.pretrained(TIMM_V2)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), first.variables, second.variables))
    assert second.directory == first.directory and os.path.isfile(os.path.join(first.directory, "model.json"))
    blob = os.path.realpath(files[TIMM_V2])
    os.utime(blob, ns=(os.stat(blob).st_atime_ns, os.stat(blob).st_mtime_ns + 10**9))  # a newer source file
    with monkeypatch.context() as patch:
        patch.setattr(convert, "load_published", no_conversion)
        with pytest.raises(AssertionError, match="converted again"):
            mobilenet_jax.pretrained(TIMM_V2)


def test_names_work_as_init_from_and_teacher(caches):
    from mobilenet_jax.compression import distill
    from mobilenet_jax.training import loop, steps

    published = mobilenet_jax.pretrained(TIMM_V2)
    from configs import v2

    config = v2.get_config()
    config.update(init_from=TIMM_V2, teacher=TIMM_V1, half_precision=False)
    fields = loop.init_from_fields(config)
    assert fields["width"] == 0.5
    model = steps.create_model(config, 7, **fields)
    variables = loop.initial_variables(config, model, 64, jax.random.key(0))
    backbone = {k: v for k, v in published.variables["params"].items() if k != "classifier"}
    assert jax.tree.all(jax.tree.map(np.array_equal, backbone, {k: variables["params"][k] for k in backbone}))
    assert variables["params"]["classifier"]["kernel"].shape[-1] == 7
    teacher, teacher_variables = distill.load_teacher(config, 1000)
    assert jax.tree.all(jax.tree.map(np.array_equal, mobilenet_jax.pretrained(TIMM_V1).variables, teacher_variables))
    # The pipeline feeds ImageNet mean/std; timm's V1 weights want Inception's (x - 127.5) / 127.5.
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    np.testing.assert_allclose(teacher.input_affine[0], std / 127.5, rtol=1e-6)
    np.testing.assert_allclose(teacher.input_affine[1], (mean - 127.5) / 127.5, rtol=1e-6)


def test_convert_command_takes_a_name(caches, tmp_path):
    dirs, _, _ = caches
    env = {**os.environ, "HF_HUB_CACHE": str(dirs["hf"]), "HF_HUB_OFFLINE": "1", "MOBILENET_JAX_OFFLINE": "1"}
    command = [sys.executable, "-m", "mobilenet_jax.convert", TIMM_V1, str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "from the 'timm_v1' layout" in result.stdout and "inputs [-1, 1]" in result.stdout  # mean = std = 0.5

    from mobilenet_jax.weights import checkpoint

    model, variables = checkpoint.load_model(tmp_path / "out")
    published = mobilenet_jax.pretrained(TIMM_V1)
    assert jax.tree.all(jax.tree.map(np.array_equal, published.variables, variables))
    assert checkpoint.read_preprocessing(tmp_path / "out") == hub.CATALOGUE[TIMM_V1].preprocessing


# ----------------------------------------------------------------------------- bad input, one sentence each


def test_unknown_name_lists_the_closest_names():
    with pytest.raises(
        hub.PretrainedError, match=r"Unknown pretrained model .* \(closest: timm/mobilenetv2_100.ra_in1k, "
    ):
        mobilenet_jax.pretrained("timm/mobilenetv2_100.ra_in1")


def test_missing_file_offline_names_the_file_the_cache_path_and_the_url(caches):
    dirs, _, _ = caches
    item = hub.CATALOGUE["keras/mobilenet_v2_1.0_224"]
    with pytest.raises(hub.PretrainedError) as error:
        mobilenet_jax.pretrained(item.name)
    message = str(error.value)
    assert item.filename in message and item.url in message and str(dirs["keras"] / "models") in message
    with pytest.raises(
        hub.PretrainedError, match="downloads are off .* from https://huggingface.co/timm/mobilenetv2_140"
    ):
        mobilenet_jax.pretrained("timm/mobilenetv2_140.ra_in1k")
    with pytest.raises(hub.PretrainedError, match=r"\(hf download timm/mobilenetv2_140.ra_in1k model.safetensors\)"):
        mobilenet_jax.pretrained("timm/mobilenetv2_140.ra_in1k")


def test_truncated_cached_file_is_moved_aside_and_fetched_again_when_possible(caches, tmp_path, monkeypatch):
    dirs, files, _ = caches
    name = KERAS_V1_NO_TOP
    good = files[name].read_bytes()
    dirs_converted = tmp_path / "converted"
    monkeypatch.setenv("MOBILENET_JAX_CACHE", str(dirs_converted))
    files[name].write_bytes(good[: len(good) // 3])
    with pytest.raises(hub.PretrainedError, match="cannot be read .* moved to .*corrupt.* downloads are off"):
        mobilenet_jax.pretrained(name)
    assert not files[name].exists() and any(".corrupt-" in p for p in os.listdir(files[name].parent))
    files[name].write_bytes(good[: len(good) // 3])
    monkeypatch.setenv("MOBILENET_JAX_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fetched = []
    monkeypatch.setattr(hub, "download", lambda url, path: (fetched.append(url), open(path, "wb").write(good)))
    model, _ = mobilenet_jax.pretrained(name)
    assert fetched == [hub.CATALOGUE[name].url] and model.width == 0.25 and files[name].read_bytes() == good


def test_hash_mismatch_is_one_sentence(caches, monkeypatch):
    _, files, torchvision_entry = caches
    published = dataclasses.replace(torchvision_entry, filename="mobilenet_v2-b0353104.pth")
    monkeypatch.setitem(hub.CATALOGUE, TORCHVISION, published)
    path = files[TORCHVISION].parent / published.filename
    path.write_bytes(files[TORCHVISION].read_bytes())
    with pytest.raises(hub.PretrainedError, match=r"has sha256 [0-9a-f]{12}\.\.\., not the published b0353104"):
        mobilenet_jax.pretrained(TORCHVISION)
    assert not path.exists()


def test_hub_repository_that_is_not_a_mobilenet_names_the_closest_layout(caches):
    from safetensors.torch import save_file

    dirs, _, _ = caches
    scratch = dirs["hf"].parent / "resnet.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), scratch)
    put_in_hub_cache(dirs["hf"], "someone/resnet18", "model.safetensors", scratch.read_bytes())
    with pytest.raises(convert.StateDictMismatchError, match="No MobileNet layout .* fits \\(closest: '"):
        mobilenet_jax.pretrained("hf-hub:someone/resnet18")
