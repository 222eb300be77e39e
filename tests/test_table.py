"""Architecture tables: the groups a trace of each module shows, and a new architecture given only as a table.

The new architecture below has no code of its own anywhere: counting, LiteRT export
(float and int8), pruning and checkpoints all work from the table.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet_jax import MobileNetV1, MobileNetV2, MobileNetV3, MobileNetV4, summarize
from mobilenet_jax.compression import prune
from mobilenet_jax.models import Block, MobileNet, Network
from mobilenet_jax.weights import checkpoint
from tests import jaxpr_groups
from tests import variables as random_init
from tests.test_prune import trained_like

IR = "inverted_residual"
# Three inverted-residual blocks: a 5x5 depthwise one without expansion (stride 2), a
# residual one with ReLU and a squeeze-excitation to 24 channels (MobileNetV3's hard-sigmoid gate),
# and an expanding stride-2 one with a sigmoid-gated squeeze-excitation to 16; then a 64-channel
# 1x1 head conv.
NEW = Network(
    stem_channels=16,
    blocks=(
        Block(IR, 16, 16, 24, stride=2, kernel=5),
        Block(IR, 24, 72, 24, stride=1, kernel=3, expand=True, residual=True, activation="relu", se_channels=24),
        Block(IR, 24, 96, 40, stride=2, kernel=3, expand=True, se_channels=16, se_gate="sigmoid"),
    ),
    head_channels=64,
)
V2_SMALL = MobileNetV2(num_classes=10, width=0.5, block_table=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2)))
V3_SMALL = MobileNetV3(num_classes=10, variant="small", width=0.5)
V4_SMALL = MobileNetV4(num_classes=10, variant="conv_small", width=0.5)


@pytest.fixture(scope="module")
def new():
    model = MobileNet(network_table=NEW, num_classes=10)
    return model, trained_like(model)


@pytest.mark.parametrize(
    "model",
    [
        MobileNetV1(num_classes=10, width=0.25, head_channels=64),
        V2_SMALL,
        MobileNet(network_table=NEW, num_classes=10),
        V3_SMALL,
        V4_SMALL,
    ],
    ids=["v1_head_conv", "v2", "new", "v3_small", "v4_conv_small"],
)
def test_the_table_groups_are_the_groups_the_traced_module_has(model):
    variables = random_init.initial(model, 32)
    traced = jaxpr_groups.traced_groups(model, variables)
    assert traced == jaxpr_groups.table_groups(model)
    # The comparison has teeth: a table that forgot the residual adds gives other groups.
    blocks = tuple(block._replace(residual=False) for block in model.network().blocks)
    if any(block.residual for block in model.network().blocks):
        forgetful = MobileNet(network_table=model.network()._replace(blocks=blocks), num_classes=10)
        assert jaxpr_groups.table_groups(forgetful) != traced


def test_summarize_counts_the_new_architecture(new):
    model, _ = new
    summary = summarize(model, 32)
    # By hand at 32 px: stem 16x16 outputs, blocks 0-1 at 8x8, block 2 and the head at 4x4.
    macs = (
        16 * 16 * 16 * 27  # stem 3x3, 3 -> 16
        + 64 * 16 * 25 + 64 * 16 * 24  # block 0: 5x5 depthwise (stride 2), projection 16 -> 24
        + 64 * 24 * 72 + 64 * 72 * 9 + 72 * 24 + 24 * 72 + 64 * 72 * 24  # block 1: expansion, depthwise, SE, projection
        + 64 * 24 * 96 + 16 * 96 * 9 + 96 * 16 + 16 * 96 + 16 * 96 * 40  # block 2: ..., SE on the pooled 1x1
        + 16 * 40 * 64  # head conv
        + 64 * 10  # classifier
    )  # fmt: skip
    weights = 27 * 16 + 25 * 16 + 16 * 24 + 24 * 72 + 9 * 72 + 72 * 24 + 24 * 96 + 9 * 96 + 96 * 40 + 40 * 64 + 650
    weights += (72 * 24 + 24 + 24 * 72 + 72) + (96 * 16 + 16 + 16 * 96 + 96)  # the SE convs and their biases
    batchnorm = 2 * (16 + 16 + 24 + 72 + 72 + 24 + 96 + 96 + 40 + 64)
    assert summary == (weights + batchnorm, weights, macs)


def test_new_architecture_exports_to_litert_float_and_int8(new):
    pytest.importorskip("ai_edge_litert")
    from mobilenet_jax.deployment import export
    from tests.test_export import COMPUTE_OPS, assert_int8_close, jax_logits, rgb_images

    model, variables = new
    rgb = rgb_images(16, 32, seed=3)
    expected = jax_logits(model, variables, rgb)
    float_model = export.TFLiteModel(export.to_tflite(model, variables, 32))
    np.testing.assert_allclose(float_model(rgb), expected, atol=1e-4, rtol=1e-4)
    calibration = [rgb_images(1, 32, seed=s) for s in range(16)]
    int8 = export.TFLiteModel(export.to_tflite(model, variables, 32, quantize="int8", calibration=calibration))
    ops = int8.ops()
    names = [op["op_name"] for op in ops]
    # stem, expansions, projections, head, and the two squeeze-excitations' reduce and expand convs
    assert names.count("DEPTHWISE_CONV_2D") == 3 and names.count("CONV_2D") == 1 + 2 + 3 + 1 + 2 * 2
    assert names.count("LOGISTIC") == 1  # block 2's sigmoid gate (block 1's hard sigmoid is fused: conv, ReLU6, mul)
    for op in ops:
        if op["op_name"] in COMPUTE_OPS:
            assert int8.tensor(op["inputs"][0])["dtype"] == np.int8, op
    kernels = [int8.tensor(op["inputs"][1])["shape"] for op in ops if op["op_name"] == "DEPTHWISE_CONV_2D"]
    assert [tuple(k[1:3]) for k in kernels] == [(5, 5), (3, 3), (3, 3)]
    assert_int8_close(int8(rgb), expected)  # measured: 0.70% of the logit range, top-1 100%


def zeroed(model, variables, keeps):
    """The unpruned variables with every dropped channel given zero weight in each layer that reads it."""
    params = jax.tree.map(np.array, variables["params"])
    for group, keep in zip(prune.groups(model), keeps, strict=True):
        dropped = np.setdiff1d(np.arange(group.channels), keep)
        for reader in group.readers:
            node = params
            for key in reader.split("/"):
                node = node[key]
            node["kernel"][..., dropped, :] = 0.0  # HWIO's input axis, or a dense kernel's rows
    return {**variables, "params": params}


def test_pruning_the_new_architectures_residual_group_slices_it_consistently(new):
    model, variables = new
    groups = prune.groups(model)
    widths = [group.channels for group in groups]
    residual = next(i for i, group in enumerate(groups) if len(group.producers) == 2)
    assert [c.path for c in groups[residual].producers] == ["block_0/conv_pwl", "block_1/conv_pwl"]
    assert groups[residual].readers == ("block_1/conv_pw", "block_2/conv_pw")
    widths[residual] = 16  # of 24, shared by the two blocks the shortcut joins
    widths[residual + 1] = 40  # block 1's expansion, 72 -> 40, with its squeeze-excitation's expand conv
    assert [c.path for c in groups[residual + 1].producers] == ["block_1/conv_pw", "block_1/se/conv_expand"]
    assert groups[residual + 2].producers[0].path == "block_1/se/conv_reduce"
    widths[residual + 2] = 8  # block 1's squeeze-excitation, 24 -> 8
    target = prune.resize(model, widths)
    assert target.network().blocks[1][1:4] == (16, 40, 16) and target.network().blocks[1].se_channels == 8
    keeps = prune.keep_indices(model, variables, target)
    pruned, pruned_variables = prune.slice_model(model, variables, keeps)
    images = jax.random.normal(jax.random.key(5), (8, 32, 32, 3))
    sliced = pruned.apply(pruned_variables, images)
    assert float(jnp.std(sliced)) > 0.1
    np.testing.assert_allclose(sliced, model.apply(zeroed(model, variables, keeps), images), atol=1e-4, rtol=1e-5)
    assert summarize(pruned, 32).macs < summarize(model, 32).macs


def first_blocks(model, count):
    """``model`` with its first ``count`` blocks only (then its head): a quicker compile of the same kinds."""
    network = model.network()
    return model.clone(network_table=network._replace(blocks=network.blocks[:count]))


@pytest.mark.parametrize(
    "model", [first_blocks(V3_SMALL, 6), first_blocks(V4_SMALL, 10)], ids=["v3_small", "v4_conv_small"]
)
def test_mobilenet_v3_and_v4_prune_to_a_mac_budget_and_slicing_equals_zeroing(model):
    """MobileNetV3-Small and V4-conv-small (their first 6 and 10 blocks) through the generic groups. V3: each
    expansion conv and its squeeze-excitation's expand conv write one group, the reduce conv its own. V4: a UIB's
    start depthwise conv passes its input's group (the residual group), full convs in the blocks read and write
    groups. Both: the dense layer after the pooling writes its own group (V4's with its BatchNorm)."""
    variables = trained_like(model)
    groups = prune.groups(model)
    producers = [[conv.path for conv in group.producers] for group in groups]
    if isinstance(model, MobileNetV3):
        assert ["block_3/conv_pw", "block_3/se/conv_expand"] in producers and ["block_3/se/conv_reduce"] in producers
    else:
        residual = next(g for g in groups if "block_9/conv_dw_start" in [c.path for c in g.passes])
        assert [c.path for c in residual.producers] == [f"block_{i}/conv_pwl" for i in range(4, 10)]
        assert ["block_2/conv"] in producers and "block_2/conv" in groups[producers.index(["block_1/conv"])].readers
    assert producers[-1] == ["head_fc"] and groups[-1].readers == ("classifier",)
    assert groups[-2].readers == ("head_fc",)
    keeps = prune.keep_indices(model, variables, prune.channels_for_macs(model, 0.5, 32))
    pruned, pruned_variables = prune.slice_model(model, variables, keeps)
    assert 0.48 < summarize(pruned, 32).macs / summarize(model, 32).macs < 0.51  # within 2% of the budget
    # --macs cuts the groups a non-linear layer writes (the SE and head_fc ones too), not the projections.
    prunable = prune.macs_groups(model)
    assert prunable[-1]
    for keep, group, cut in zip(keeps, groups, prunable, strict=True):
        assert len(keep) < group.channels if cut and group.channels > 8 else len(keep) == group.channels
    images = jax.random.normal(jax.random.key(5), (8, 32, 32, 3))
    sliced = jax.jit(pruned.apply)(pruned_variables, images)
    assert float(jnp.std(sliced)) > 0.1
    zeroed_logits = jax.jit(model.apply)(zeroed(model, variables, keeps), images)
    np.testing.assert_allclose(sliced, zeroed_logits, atol=1e-4, rtol=1e-5)


def test_squeeze_excitation_block_equals_torchvisions(new):
    """Block 1 (expansion, depthwise, squeeze-excitation with a hard-sigmoid gate, projection, shortcut) against
    the same block written with torch.nn and torchvision's SqueezeExcitation, on the block's own input."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    model, variables = new
    images = jax.random.normal(jax.random.key(7), (2, 32, 32, 3))
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    block_in = np.asarray(state["intermediates"]["block_0"]["__call__"][0])
    block_out = np.asarray(state["intermediates"]["block_1"]["__call__"][0])
    params, stats = variables["params"]["block_1"], variables["batch_stats"]["block_1"]

    def conv_bn(conv, bn, groups=1):
        kernel = np.asarray(params[conv]["kernel"])
        size, outputs = kernel.shape[0], kernel.shape[3]
        layer = torch.nn.Conv2d(kernel.shape[2] * groups, outputs, size, padding=size // 2, groups=groups, bias=False)
        layer.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        norm = torch.nn.BatchNorm2d(kernel.shape[3], eps=model.bn_epsilon)
        norm.weight.data, norm.bias.data = (torch.from_numpy(np.asarray(params[bn][k])) for k in ("scale", "bias"))
        norm.running_mean.data, norm.running_var.data = (
            torch.from_numpy(np.asarray(stats[bn][k])) for k in ("mean", "var")
        )
        return [layer, norm]

    se = torchvision.ops.SqueezeExcitation(72, 24, scale_activation=torch.nn.Hardsigmoid)
    for name, layer in (("conv_reduce", se.fc1), ("conv_expand", se.fc2)):
        layer.weight.data = torch.from_numpy(np.asarray(params["se"][name]["kernel"]).transpose(3, 2, 0, 1).copy())
        layer.bias.data = torch.from_numpy(np.asarray(params["se"][name]["bias"]))
    body = torch.nn.Sequential(
        *conv_bn("conv_pw", "bn_pw"), torch.nn.ReLU(), *conv_bn("conv_dw", "bn_dw", groups=72), torch.nn.ReLU(),
        se, *conv_bn("conv_pwl", "bn_pwl"),
    ).eval()  # fmt: skip
    with torch.no_grad():
        x = torch.from_numpy(block_in.transpose(0, 3, 1, 2).copy())
        expected = (x + body(x)).numpy().transpose(0, 2, 3, 1)
    assert expected.std() > 0.1
    np.testing.assert_allclose(block_out, expected, atol=1e-4, rtol=1e-4)


def test_the_new_architecture_round_trips_through_a_model_directory(new, tmp_path):
    model, variables = new
    checkpoint.save_model(tmp_path / "new", model, variables)
    loaded, loaded_variables = checkpoint.load_model(tmp_path / "new")
    assert loaded == model
    images = jax.random.normal(jax.random.key(6), (4, 32, 32, 3))
    np.testing.assert_array_equal(loaded.apply(loaded_variables, images), model.apply(variables, images))
    pytest.importorskip("torch")
    from mobilenet_jax.weights import convert

    with pytest.raises(ValueError, match="No weight layout holds a MobileNet .* keep its weights as a model directory"):
        convert.to_torch(model, variables)


def test_model_records_of_the_previous_release_still_load():
    """model.json as written before the tables (no stem_channels/last_channels; keys in the old order)."""
    from mobilenet_jax.models import model_from_dict

    old_v2 = {
        "architecture": "MobileNetV2", "num_classes": 10, "width": 0.5, "rounding": "torchvision",
        "dropout_rate": 0.2, "block_table": [[1, 16, 1, 1], [6, 24, 2, 2]],
        "block_channels": [[16, 8], [40, 16], [64, 16]], "fix_stem_head": False, "padding": "torch",
        "bn_momentum": 0.9, "bn_epsilon": 1e-5,
    }  # fmt: skip
    model = model_from_dict(old_v2)
    assert [(b.hidden, b.out) for b in model.network().blocks] == [(16, 8), (40, 16), (64, 16)]
    assert model.network().stem_channels == 16 and model.network().head_channels == 1280
    old_v1 = {
        "architecture": "MobileNetV1", "num_classes": 10, "width": 1.0, "profile": [24, [48, [96, 2]]],
        "activation": "relu", "head_channels": 0, "padding": "torch", "bn_momentum": 0.9, "bn_epsilon": 1e-5,
    }  # fmt: skip
    assert [(b.out, b.stride) for b in model_from_dict(old_v1).network().blocks] == [(48, 1), (96, 2)]
