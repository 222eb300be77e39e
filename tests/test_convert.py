"""PyTorch -> Flax conversion: parity with PyTorch's own forward pass, round trips, errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from mobilenet_jax import MobileNetV1, MobileNetV2, MobileNetV3  # noqa: E402
from mobilenet_jax.weights import checkpoint, convert  # noqa: E402
from mobilenet_jax.weights import torch_reference as ref  # noqa: E402

TOLERANCE = 2e-6  # measured: at most 2.4e-7 over every architecture and size here


def flax_logits(model, variables, images_nchw: np.ndarray) -> np.ndarray:
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return np.asarray(apply(variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1))))


def torch_logits(module, images_nchw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(images_nchw)).numpy()


def images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, 3, height, width).astype(np.float32)


def assert_parity(module, size, expected_type, **expected_fields):
    model, variables = convert.from_torch(module.state_dict())
    assert isinstance(model, expected_type)
    for field, value in expected_fields.items():
        assert getattr(model, field) == value, (field, getattr(model, field), value)
    x = images(2, *size)
    expected = torch_logits(module, x)
    got = flax_logits(model, variables, x)
    error = float(np.abs(got - expected).max())
    print(f"parity {type(module).__name__} {expected_fields} {size}: max abs error {error:.2e}")
    assert expected.std() > 0.1  # O(1) logits, so the tolerance means something
    assert error <= TOLERANCE


@pytest.mark.parametrize(
    "width, size",
    [(0.35, (57, 57)), (0.5, (64, 47)), (0.75, (33, 33)), (1.0, (96, 97)), (1.3, (41, 64))],
)
def test_torchvision_mobilenet_v2_parity(width, size):
    torch.manual_seed(0)
    module = ref.randomize(torchvision.models.mobilenet_v2(width_mult=width, num_classes=11))
    assert_parity(module, size, MobileNetV2, width=width, num_classes=11, rounding="torchvision")


@pytest.mark.parametrize("variant, width, size", [("large", 1.0, (49, 40)), ("small", 0.75, (33, 33))])
def test_torchvision_mobilenet_v3_parity(variant, width, size):
    """Squeeze-excitation (hard sigmoid), hard-swish, 5x5 kernels and the dense layer after the pooling."""
    torch.manual_seed(0)
    module = getattr(torchvision.models, f"mobilenet_v3_{variant}")(width_mult=width, num_classes=11)
    assert_parity(
        ref.randomize(module), size, MobileNetV3, variant=variant, width=width, num_classes=11,
        rounding="torchvision", bn_epsilon=1e-3, minimal=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "stem_cfg, width, profile, size",
    [
        (ref.V1_NORMAL, 1.0, "normal", (67, 67)),
        (
            (8, [16, (32, 2), 32, (64, 2), 64, (128, 2), 128, 128, 128, 128, 128, (256, 2), 256]),
            0.25,
            "normal",
            (64, 49),
        ),
        (ref.V1_HALF_FLOPS, 1.0, "0.5flops", (45, 45)),
    ],
)
def test_amc_mobilenet_v1_parity(stem_cfg, width, profile, size):
    torch.manual_seed(0)
    module = ref.randomize(ref.TorchMobileNetV1(7, *stem_cfg))
    assert_parity(module, size, MobileNetV1, width=width, profile=profile, num_classes=7)


def test_pruned_mobilenet_v1_parity():
    torch.manual_seed(1)
    cfg = [40, (72, 2), 64, (150, 2), 200, (300, 2), 310, 290, 333, 301, 280, (600, 2), 640]
    module = ref.randomize(ref.TorchMobileNetV1(5, 20, cfg))
    model, _ = convert.from_torch(module.state_dict())
    assert model.profile == (20, tuple(cfg))
    assert_parity(module, (51, 51), MobileNetV1)


def test_pruned_mobilenet_v1_other_depth_needs_strides():
    cfg = [16, (32, 2), (64, 2), (128, 2), (256, 2)]
    module = ref.randomize(ref.TorchMobileNetV1(4, 8, cfg))
    with pytest.raises(convert.StateDictMismatchError, match="unexpected|missing"):
        convert.from_torch(module.state_dict())
    model, variables = convert.from_torch(module.state_dict(), strides=[1, 2, 2, 2, 2])
    x = images(2, 37, 37)
    assert np.abs(flax_logits(model, variables, x) - torch_logits(module, x)).max() <= TOLERANCE


@pytest.mark.parametrize("width, size", [(0.5, (64, 64)), (0.75, (35, 53)), (1.0, (32, 32))])
def test_notes_mobilenet_v2_port_parity(width, size):
    torch.manual_seed(2)
    module = ref.randomize(ref.TorchMobileNetV2Port(num_classes=9, width_mult=width))
    assert convert.detect_layout(module.state_dict()) == "notes_v2"
    assert_parity(module, size, MobileNetV2, width=width, rounding="floor", num_classes=9)


@pytest.mark.parametrize(
    "make_module, layout",
    [
        (lambda: torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10), "torchvision"),
        (lambda: ref.TorchMobileNetV1(10, *ref.V1_HALF_FLOPS), "amc_v1"),
        (lambda: ref.TorchMobileNetV2Port(10, width_mult=0.35), "notes_v2"),
        (lambda: torchvision.models.mobilenet_v3_small(width_mult=0.5, num_classes=10), "torchvision_v3"),
    ],
)
def test_round_trip_reproduces_state_dict_exactly(make_module, layout):
    torch.manual_seed(3)
    state = ref.randomize(make_module()).state_dict()
    model, variables = convert.from_torch(state)
    back = convert.to_torch(model, variables, layout=layout)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # The result loads into the PyTorch module under strict checking.
    make_module().load_state_dict(back, strict=True)


def test_loads_paths_checkpoint_dicts_and_dataparallel_prefixes(tmp_path):
    torch.manual_seed(4)
    state = ref.randomize(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=3)).state_dict()
    _, reference = convert.from_torch(state)
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model, variables = convert.from_torch(str(path))
    assert model.width == 0.35 and model.num_classes == 3
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), reference, variables))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "pickled_module.pth"
    torch.save(ref.TorchMobileNetV2Port(10, width_mult=0.35), path)  # a whole pickled nn.Module
    with pytest.raises(ValueError, match="is not part of a state dict"):
        convert.from_torch(str(path))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_files_are_read_without_torch_as_torch_reads_them(tmp_path, zip_format):
    """Both formats torch.save writes (torchvision's files are in both), with views, strides and other dtypes."""
    from mobilenet_jax.weights import torch_file

    generator = torch.Generator().manual_seed(0)
    state = {
        "weight": torch.randn(4, 3, 3, 3, generator=generator),
        "transposed": torch.randn(5, 6, generator=generator).t(),
        "slice": torch.arange(20)[3:17:2],
        "half": torch.randn(7, generator=generator).half(),
        "bfloat16": torch.randn(7, generator=generator).bfloat16(),
        "flags": torch.tensor([True, False]),
        "count": torch.tensor(12, dtype=torch.int64),
    }
    path = tmp_path / "state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    read = torch_file.load(str(path))
    assert list(read) == list(state)
    for key, tensor in state.items():
        expected = tensor.float().numpy() if key == "bfloat16" else tensor.numpy()
        assert read[key].shape == expected.shape and str(read[key].dtype) == str(tensor.dtype).removeprefix("torch.")
        np.testing.assert_array_equal(np.asarray(read[key], expected.dtype), expected)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="Could not read .* as a PyTorch state dict"):
        torch_file.load(str(tmp_path / "cut.pth"))


def test_a_torch_file_only_torch_reads_says_so_in_one_sentence_without_torch(tmp_path, monkeypatch):
    path = tmp_path / "complex.pth"
    torch.save({"weight": torch.zeros(3, dtype=torch.complex64)}, path)  # a storage type the reader lacks
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ValueError, match=r"lacks \(unsupported storage type .*\); torch reads it: pip install"):
        convert.load_state_dict(str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No PyTorch checkpoint"):
        convert.from_torch(str(tmp_path / "nope.pth"))


def test_other_architecture_lists_missing_and_unexpected_keys():
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    with pytest.raises(convert.StateDictMismatchError) as info:
        convert.from_torch(state)
    message = str(info.value)
    assert "No MobileNet layout this converter knows fits (closest: 'timm_v1'" in message
    assert "missing" in message and "conv_stem.weight" in message
    assert "unexpected" in message and "layer1.0.conv1.weight" in message


def test_truncated_state_dict_lists_missing_keys():
    state = torchvision.models.mobilenet_v2(width_mult=0.5).state_dict()
    truncated = {k: v for k, v in state.items() if not k.startswith(("features.17", "features.18"))}
    with pytest.raises(convert.StateDictMismatchError) as info:
        convert.from_torch(truncated)
    message = str(info.value)
    removed = [k for k in state if k not in truncated and not k.endswith("num_batches_tracked")]
    assert f"{len(removed)} missing: [features.17.conv.0.0.weight," in message
    assert "unexpected" not in message and "mis-shaped" not in message


def test_wrong_shapes_and_extra_keys_are_listed():
    state = dict(torchvision.models.mobilenet_v2(width_mult=1.0, num_classes=5).state_dict())
    state["features.3.conv.1.0.weight"] = torch.zeros(144, 1, 5, 5)
    state["features.3.extra.weight"] = torch.zeros(3)
    with pytest.raises(convert.StateDictMismatchError) as info:
        convert.from_torch(state)
    message = str(info.value)
    assert "features.3.conv.1.0.weight (144, 1, 5, 5) != (144, 1, 3, 3)" in message
    assert "1 unexpected: [features.3.extra.weight]" in message


@pytest.mark.slow
def test_cli_writes_a_checkpoint_the_loader_restores(tmp_path):
    torch.manual_seed(5)
    module = ref.randomize(ref.TorchMobileNetV1(6, *ref.V1_HALF_FLOPS))
    torch.save(module.state_dict(), tmp_path / "amc.pth")
    out = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "mobilenet_jax.convert", str(tmp_path / "amc.pth"), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    model, variables = checkpoint.load_model(out)
    assert isinstance(model, MobileNetV1) and model.profile == "0.5flops" and model.num_classes == 6
    x = images(1, 40, 40)
    assert np.abs(flax_logits(model, variables, x) - torch_logits(module, x)).max() <= TOLERANCE

    again = subprocess.run(
        [sys.executable, "-m", "mobilenet_jax.convert", str(tmp_path / "missing.pth"), str(tmp_path / "other")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "No PyTorch checkpoint" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_evaluate_cli_with_torch_weights_uses_torchvision_preprocessing(tmp_path, image_folder):
    torch.manual_seed(6)
    module = ref.randomize(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=4))
    torch.save(module.state_dict(), tmp_path / "tv.pth")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobilenet_jax.evaluate",
            "--config",
            "configs/v2.py",
            "--torch_weights",
            str(tmp_path / "tv.pth"),
            "--config.dataset=folder",
            f"--config.data_dir={image_folder}",
            "--config.image_size=32",
            "--config.batch_size=8",
            "--config.half_precision=False",
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "folder validation: top-1" in result.stdout and "over 20 images" in result.stdout


def test_torchvision_style_eval_preprocessing_matches_torchvision_transforms():
    """resize shorter side + center crop, against torchvision.transforms on the same image."""
    from PIL import Image
    from torchvision import transforms

    from mobilenet_jax.data import input_pipeline as ip

    rng = np.random.default_rng(0)
    pixels = (rng.random((75, 110, 3)) * 255).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(pixels).resize((220, 150), Image.Resampling.BILINEAR))  # smooth content
    import io

    import tensorflow as tf

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    ours = ip.resize_then_center_crop(tf.constant(buffer.getvalue()), 112, resize_size=128).numpy()
    theirs = transforms.Compose([transforms.Resize(128), transforms.CenterCrop(112), transforms.PILToTensor()])(
        Image.fromarray(pixels)
    )
    theirs = theirs.numpy().transpose(1, 2, 0).astype(np.float32)
    assert ours.shape == theirs.shape == (112, 112, 3)
    assert np.abs(ours - theirs).mean() < 1.5  # 0..255 scale; resamplers differ only in rounding
