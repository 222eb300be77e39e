"""AMC-style pruning of MobileNetV1 and V2: exact slicing, least-squares refit, MAC targets, errors, PyTorch export."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet_jax import MobileNetV1, MobileNetV2, summarize
from mobilenet_jax.compression import prune
from mobilenet_jax.errors import UserError
from mobilenet_jax.models import V1_PROFILES
from mobilenet_jax.weights import checkpoint
from tests import variables as random_init
from tests.variables import logits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MobileNetV1 0.5: stem 16, blocks 32, (64,2), 64, (128,2), 128, (256,2), 256 x5, (512,2), 512.
CHANNELS = (12, (24, (48, 2), 40, (96, 2), 80, (192, 2), 200, 192, 180, 160, 224, (400, 2), 384))


def trained_like(model, size=32, seed=0):
    """Random variables with BatchNorm far from the identity, so that every channel matters."""
    return random_init.far_from_identity(model, size, seed, var_high=1.5)


@pytest.fixture(scope="module")
def small():
    model = MobileNetV1(num_classes=10, width=0.5)
    images = jax.random.normal(jax.random.key(7), (16, 32, 32, 3))
    return model, trained_like(model), images


def test_slicing_equals_zeroing_the_pruned_channels(small):
    model, variables, images = small
    keeps = prune.keep_indices(model, variables, CHANNELS)
    pruned, pruned_variables = prune.slice_model(model, variables, keeps)
    assert pruned.profile == CHANNELS and pruned.width == 1.0
    # In the unpruned model, give every dropped channel zero weight where it is read.
    params = jax.tree.map(np.array, variables["params"])
    for producer, keep in enumerate(keeps, start=-1):
        dropped = np.setdiff1d(
            np.arange(
                params["stem_bn"]["scale"].shape[0]
                if producer < 0
                else params[f"block_{producer}"]["bn_pw"]["scale"].shape[0]
            ),
            keep,
        )
        if producer + 1 < len(keeps) - 1:
            params[f"block_{producer + 1}"]["conv_pw"]["kernel"][:, :, dropped, :] = 0.0
        else:
            params["classifier"]["kernel"][dropped, :] = 0.0
    zeroed = logits(model, {**variables, "params": params}, images)
    sliced = logits(pruned, pruned_variables, images)
    assert float(jnp.std(sliced)) > 0.1
    np.testing.assert_allclose(sliced, zeroed, atol=1e-4, rtol=1e-5)


def test_ranking_keeps_the_largest_l1_norms_and_bn_scales(small):
    model, variables, _ = small
    keeps = prune.keep_indices(model, variables, CHANNELS)
    norms = np.abs(np.asarray(variables["params"]["block_1"]["conv_pw"]["kernel"])[0, 0]).sum(axis=1)
    assert set(keeps[1]) == set(np.argsort(-norms)[:24])  # block 0's outputs, read by block 1
    keeps_bn = prune.keep_indices(model, variables, CHANNELS, criterion="bn")
    scales = np.abs(np.asarray(variables["params"]["stem_bn"]["scale"]))
    assert set(keeps_bn[0]) == set(np.argsort(-scales)[:12])


def test_refit_brings_the_pruned_network_back_to_the_unpruned_outputs(small):
    """The pruned network with and without the refit, against the unpruned one, on images the refit never saw.

    A deep cut (at most 64 channels a layer) so that 160 refit images give every layer,
    the classifier included, twice as many rows as inputs (fewer, and a layer is left as
    sliced).
    """
    model, variables, _ = small
    channels = (8, (16, (32, 2), 32, (48, 2), 48, (64, 2), 64, 64, 64, 64, 64, (64, 2), 64))
    refit_images = jax.random.normal(jax.random.key(11), (160, 32, 32, 3))
    held_out = jax.random.normal(jax.random.key(12), (64, 32, 32, 3))
    pruned, refitted, report = prune.prune(model, variables, channels, refit_images=refit_images)
    _, sliced, _ = prune.prune(model, variables, channels)
    assert len(report) == 14 and "classifier" in report  # 13 pointwise convs and the classifier, none skipped
    for layer, (before, after) in report.items():
        assert after < 0.9 * before, layer
    unpruned = logits(model, variables, held_out)
    error = lambda v: float(jnp.linalg.norm(logits(pruned, v, held_out) - unpruned) / jnp.linalg.norm(unpruned))  # noqa: E731
    print(f"relative logit error on held-out images: {error(sliced):.3f} sliced, {error(refitted):.2e} refit")
    assert error(sliced) > 0.1 and error(refitted) < 0.01 * error(sliced), (error(sliced), error(refitted))


def test_mac_targets_and_the_amc_profile():
    model = MobileNetV1(num_classes=1000)
    for ratio in (0.75, 0.5, 0.35):
        pruned = prune.channels_for_macs(model, ratio, 224)
        macs = summarize(pruned, 224).macs / summarize(model, 224).macs
        assert abs(macs - ratio) <= 0.02, (ratio, macs)
        channels = pruned.profile
        assert all(c % 8 == 0 for c in [channels[0]] + [b if isinstance(b, int) else b[0] for b in channels[1]])
    amc = prune.target_model(model, V1_PROFILES["0.5flops"])
    assert prune.group_widths(amc)[:3] == (24, 48, 96) and len(prune.group_widths(amc)) == 14
    assert round(summarize(model.clone(profile=prune.profile_channels(model, "0.5flops")), 224).macs / 1e6, 1) == 293.9


def test_bad_channel_lists_and_ratios_are_one_sentence(small):
    model, variables, _ = small
    with pytest.raises(UserError, match="has 2 blocks; the model has 13"):
        prune.keep_indices(model, variables, (8, (16, (32, 2))))
    with pytest.raises(UserError, match="needs a positive channel count, got 0"):
        prune.keep_indices(model, variables, (12, (0,) + CHANNELS[1][1:]))
    with pytest.raises(UserError, match="has 16 channels; it cannot keep 20"):
        prune.keep_indices(model, variables, (20, CHANNELS[1]))
    with pytest.raises(UserError, match="would keep 4 channels; pruning keeps at least 8"):
        prune.keep_indices(model, variables, (4, CHANNELS[1]))
    with pytest.raises(UserError, match="Block 1 has stride 2"):
        prune.keep_indices(model, variables, (12, (24, 48) + CHANNELS[1][2:]))
    for ratio in (0.0, 1.5, -1):
        with pytest.raises(UserError, match=r"--macs must be in \(0, 1\]"):
            prune.channels_for_macs(model, ratio, 32)
    with pytest.raises(UserError, match="Named profiles are MobileNetV1 channel lists"):
        prune.profile_channels(MobileNetV2(), "0.5flops")
    with pytest.raises(UserError, match="--channels must be a comma-separated list"):
        prune.parse_channels("24,48,(96")


# MobileNetV2 0.5 with three rows: stem 16; blocks (in, hidden, out): 0 (16, 16, 8) without expansion,
# 1 (8, 48, 16) stride 2, 2 (16, 96, 16) residual, 3 (16, 96, 16) stride 2, 4 and 5 (16, 96, 16) residual.
V2_TABLE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2))
V2_CHANNELS = (16, (40, 16), (64, 16), (72, 8), (80, 8), (48, 8))


@pytest.fixture(scope="module")
def small_v2():
    model = MobileNetV2(num_classes=10, width=0.5, block_table=V2_TABLE, dropout_rate=0.0)
    images = jax.random.normal(jax.random.key(8), (16, 32, 32, 3))
    return model, trained_like(model), images


def test_v2_residual_groups_and_slicing_equals_zeroing(small_v2):
    model, variables, images = small_v2
    joined = [[conv.path for conv in group.producers] for group in prune.groups(model) if len(group.producers) > 1]
    assert joined == [[f"block_{i}/conv_pwl" for i in (1, 2)], [f"block_{i}/conv_pwl" for i in (3, 4, 5)]]
    keeps = prune.keep_indices(model, variables, V2_CHANNELS)
    pruned, pruned_variables = prune.slice_model(model, variables, keeps)
    assert pruned.block_channels == ((16, 8), (40, 16), (64, 16), (72, 8), (80, 8), (48, 8))
    groups = zip(prune.groups(model), keeps, strict=True)
    kept = {conv.path: keep for group, keep in groups for conv in group.producers + group.passes}
    per_block = [(kept[f"block_{i}/conv_dw"], kept[f"block_{i}/conv_pwl"]) for i in range(6)]
    params = jax.tree.map(np.array, variables["params"])
    widths = {"hidden": [16, 48, 96, 96, 96, 96], "out": [8, 16, 16, 16, 16, 16]}
    for i, (hidden, out) in enumerate(per_block):
        dropped = np.setdiff1d(np.arange(widths["hidden"][i]), hidden)
        params[f"block_{i}"]["conv_pwl"]["kernel"][:, :, dropped, :] = 0.0  # the only reader of the hidden channels
        dropped = np.setdiff1d(np.arange(widths["out"][i]), out)
        reader = params[f"block_{i + 1}"]["conv_pw"] if i + 1 < 6 else params["last_conv"]
        reader["kernel"][:, :, dropped, :] = 0.0
    zeroed = logits(model, {**variables, "params": params}, images)
    sliced = logits(pruned, pruned_variables, images)
    assert float(jnp.std(sliced)) > 0.1
    np.testing.assert_allclose(sliced, zeroed, atol=1e-4, rtol=1e-5)
    # The pruned record round-trips through a model directory.
    assert summarize(pruned, 32).macs < summarize(model, 32).macs


def test_v2_refit_and_mac_targets(small_v2, tmp_path):
    model, variables, images = small_v2
    pruned, pruned_variables, report = prune.prune(model, variables, V2_CHANNELS, refit_images=images)
    assert "block_1/conv_pwl" in report and "block_4/conv_pw" in report and "last_conv" in report
    for layer, (before, after) in report.items():
        assert after <= before + 1e-9, layer
    assert np.mean([after for _, after in report.values()]) < 0.9 * np.mean([b for b, _ in report.values()])
    checkpoint.save_model(tmp_path / "v2", pruned, pruned_variables)
    loaded, loaded_variables = checkpoint.load_model(tmp_path / "v2")
    assert loaded.block_channels == pruned.block_channels
    np.testing.assert_allclose(
        logits(loaded, loaded_variables, images), logits(pruned, pruned_variables, images), atol=1e-5
    )
    full = MobileNetV2(num_classes=1000)
    for ratio in (0.5,):  # each ratio bisects over 14 traces of the full network (V1 tests three ratios)
        pruned = prune.channels_for_macs(full, ratio, 224)
        macs = summarize(pruned, 224).macs / summarize(full, 224).macs
        assert abs(macs - ratio) <= 0.02, (ratio, macs)
        assert all(hidden % 8 == 0 for hidden, _ in pruned.block_channels) and pruned.stem_channels % 8 == 0
        outs = [out for _, out in pruned.block_channels]  # the linear bottlenecks and the last conv stay whole
        assert outs == [b.out for b in full.network().blocks] and pruned.last_channels == 1280


def test_v2_bad_channel_lists_are_one_sentence(small_v2):
    model, variables, _ = small_v2
    with pytest.raises(UserError, match=r"Block 4 adds its input to its output .* not 8; prune a residual group's"):
        prune.keep_indices(model, variables, (16, 40, 64, (72, 16), (80, 8), 48))
    with pytest.raises(UserError, match="Block 0 has no expansion conv, so its hidden width is its input width 16"):
        prune.keep_indices(model, variables, (8,) + V2_CHANNELS[1:])
    with pytest.raises(UserError, match="The channel list has 2 blocks; the model has 6"):
        prune.keep_indices(model, variables, (16, 40))
    with pytest.raises(UserError, match="block 2 hidden layer needs a positive channel count, got -8"):
        prune.keep_indices(model, variables, (16, 40, -8, 72, 80, 48))
    with pytest.raises(UserError, match="Block 1's entry must be hidden or"):
        prune.keep_indices(model, variables, (16, (40, 16, 3), 64, 72, 80, 48))
    assert prune.parse_channels("16,(40,16),64", model) == (16, (40, 16), 64)
    with pytest.raises(ValueError, match="must output as many channels as it receives"):
        model.clone(block_channels=((16, 8), (40, 16), (64, 8), (72, 8), (80, 8), (48, 8))).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )


def test_pruned_model_loads_strictly_in_the_design_notes_pytorch(small):
    torch = pytest.importorskip("torch")
    from mobilenet_jax.weights import convert, torch_reference

    model, variables, images = small
    pruned, pruned_variables, _ = prune.prune(model, variables, CHANNELS)
    module = torch_reference.TorchMobileNetV1(10, CHANNELS[0], list(CHANNELS[1])).eval()
    module.load_state_dict(convert.to_torch(pruned, pruned_variables), strict=True)
    with torch.no_grad():
        expected = module(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(logits(pruned, pruned_variables, images), expected, atol=1e-4)


@pytest.mark.slow
def test_cli_writes_a_model_directory(small, tmp_path):
    model, variables, _ = small
    checkpoint.save_model(tmp_path / "source", model, variables)
    channels = "12,24,(48,2),40,(96,2),80,(192,2),200,192,180,160,224,(400,2),384"
    module = "mobilenet_jax.compression.prune_cli"
    command = [sys.executable, "-m", module, str(tmp_path / "source"), str(tmp_path / "out")]
    result = subprocess.run(
        command + ["--channels", channels, "--no_refit", "--image_size=32"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote" in result.stdout and "of" in result.stdout
    loaded, _ = checkpoint.load_model(tmp_path / "out")
    assert loaded.profile == prune.parse_channels(channels)
    result = subprocess.run(command + ["--macs", "1.5"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "--macs must be in (0, 1]" in result.stderr and "Traceback" not in result.stderr


def test_pruning_keeps_timm_and_keras_fields_and_slices_a_head_conv():
    """A timm-style MobileNetV1 (ReLU6, 1x1 head conv) with TF padding: the head conv reads the last block."""
    model = MobileNetV1(num_classes=10, width=0.5, activation="relu6", head_channels=64, padding="tf")
    variables = trained_like(model)
    images = jax.random.normal(jax.random.key(9), (16, 32, 32, 3))
    keeps = prune.keep_indices(model, variables, CHANNELS)
    pruned, pruned_variables = prune.slice_model(model, variables, keeps)
    assert (pruned.activation, pruned.head_channels, pruned.padding) == ("relu6", 64, "tf")
    norms = np.abs(np.asarray(variables["params"]["head_conv"]["kernel"])[0, 0]).sum(axis=1)
    assert set(keeps[-2]) == set(np.argsort(-norms)[:384]) and len(keeps[-1]) == 64  # the head conv's group kept
    params = jax.tree.map(np.array, variables["params"])
    for producer, keep in enumerate(keeps[:-1], start=-1):
        width = params["stem_bn" if producer < 0 else f"block_{producer}"]
        width = (width if producer < 0 else width["bn_pw"])["scale"].shape[0]
        dropped = np.setdiff1d(np.arange(width), keep)
        reader = params[f"block_{producer + 1}"]["conv_pw"] if producer + 1 < 13 else params["head_conv"]
        reader["kernel"][:, :, dropped, :] = 0.0
    zeroed = logits(model, {**variables, "params": params}, images)
    np.testing.assert_allclose(logits(pruned, pruned_variables, images), zeroed, atol=1e-4, rtol=1e-5)
    _, _, report = prune.prune(model, variables, CHANNELS, refit_images=images)
    assert "head_conv" in report and report["head_conv"][1] <= report["head_conv"][0]


def test_v2_stem_and_last_conv_prune_through_their_groups(small_v2, tmp_path):
    """The groups MobileNetV1/V2 notations cannot name: V2's stem (read through block 0's depthwise) and last conv."""
    from tests.test_table import zeroed

    model, variables, images = small_v2
    groups = prune.groups(model)
    widths = list(prune.group_widths(model))
    assert [c.path for c in groups[0].producers] == ["stem_conv"] and groups[-1].readers == ("classifier",)
    assert [c.path for c in groups[0].passes] == ["block_0/conv_dw"]  # block 0 has no expansion
    widths[0], widths[-1] = 8, 640  # the stem 16 -> 8, the last conv 1280 -> 640
    keeps = prune.keep_indices(model, variables, prune.resize(model, widths))
    pruned, pruned_variables = prune.slice_model(model, variables, keeps)
    assert (pruned.stem_channels, pruned.last_channels, pruned.block_channels[0]) == (8, 640, (8, 8))
    sliced = logits(pruned, pruned_variables, images)
    np.testing.assert_allclose(sliced, logits(model, zeroed(model, variables, keeps), images), atol=1e-4, rtol=1e-5)
    checkpoint.save_model(tmp_path / "v2", pruned, pruned_variables)
    loaded, loaded_variables = checkpoint.load_model(tmp_path / "v2")
    np.testing.assert_allclose(logits(loaded, loaded_variables, images), sliced, atol=1e-6)
