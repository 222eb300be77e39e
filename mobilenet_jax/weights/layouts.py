"""Weight layouts: how other frameworks name a MobileNet's tensors, as records in one registry.

Each :class:`Layout` says which architecture it holds, how it names every layer (a rule
applied to a walk over the model's architecture table, :mod:`mobilenet_jax.models.table`),
how it is recognised from the names in a file, how its published weights are fed
(:mod:`mobilenet_jax.data.preprocessing`) and which reference implementation the parity
tests compare with. :mod:`mobilenet_jax.weights.convert` (PyTorch, timm) and
:mod:`mobilenet_jax.weights.convert_keras` (Keras) read the registry; neither imports the other
at module level, and they share the one mismatch error and the one width search below.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, NamedTuple

from flax import linen as nn

from mobilenet_jax.data.preprocessing import KERAS, TIMM, TIMM_INCEPTION, TORCHVISION, Preprocessing
from mobilenet_jax.models import V1_PROFILES, table, v1_architecture
from mobilenet_jax.models.mobilenet_v3 import v3_stages
from mobilenet_jax.models.mobilenet_v4 import v4_stages

# One naming rule: for block i, its j-th of n convolutions -> (conv name, BatchNorm name).
BlockRule = Callable[[int, int, int, table.Block, table.Conv, list], tuple[str, str]]
# Block i's squeeze-excitation -> (reduce conv name, expand conv name).
SERule = Callable[[int, table.Block, list], tuple[str, str]]


class Layout(NamedTuple):
    name: str
    framework: str  # 'torch' (PyTorch and timm state dicts) or 'keras'
    architecture: str  # 'MobileNetV1' ... 'MobileNetV4'
    description: str
    stem: tuple[str, str]
    block: BlockRule
    head: Callable[[table.Network, list], tuple[str, str]] | None  # the 1x1 conv after the blocks, if any
    classifier: str
    detect: Callable[[Collection[str]], bool]  # from the tensor or layer names of a file
    preprocessing: Preprocessing | None  # how the published weights are fed; None: nothing published
    reference: str  # the implementation the parity tests compare with
    se: SERule | None = None  # squeeze-excitation layers (MobileNetV3), if the layout has them
    # (name, 'dense' or 'dense_as_conv', its BatchNorm's name or '') of the layer after the pooling
    head_fc: tuple[str, str, str] | None = None

    def names(self, model: nn.Module) -> list[tuple[str, str, str]]:
        """``(flax module path, name in this layout, kind)`` of every layer of ``model``, in model order.

        ``kind`` is 'conv', 'depthwise', 'norm', 'classifier', 'conv_bias' (a 1x1 conv with a bias:
        squeeze-excitation), 'dense' or 'dense_as_conv' (the dense layer after the pooling, stored as a
        dense layer or as a 1x1 conv with a bias).
        """
        network = model.network()
        stages = _stages(model)
        entries = [("stem_conv", self.stem[0], "conv"), ("stem_bn", self.stem[1], "norm")]
        for i, block in enumerate(network.blocks):
            convs = block.convs(f"block_{i}")
            for j, conv in enumerate(convs):
                conv_name, norm_name = self.block(i, j, len(convs), block, conv, stages)
                entries += [(conv.path, conv_name, "depthwise" if conv.kind == "depthwise" else "conv")]
                entries += [(conv.norm, norm_name, "norm")]
                if conv.kind == "depthwise" and block.se_channels:
                    if self.se is None:
                        raise ValueError(f"The {self.name!r} layout has no squeeze-excitation layers; this model has.")
                    names = self.se(i, block, stages)
                    se_convs = block.se_convs(f"block_{i}")
                    entries += [(c.path, n, "conv_bias") for c, n in zip(se_convs, names, strict=True)]
        if network.head_channels:
            if self.head is None:
                raise ValueError(f"The {self.name!r} layout has no 1x1 conv after the blocks; this model has one.")
            head = network.head_conv()
            conv_name, norm_name = self.head(network, stages)
            entries += [(head.path, conv_name, "conv"), (head.norm, norm_name, "norm")]
        if network.head_hidden:
            if self.head_fc is None:
                raise ValueError(f"The {self.name!r} layout has no layer between the pooling and the classifier.")
            fc, (name, kind, norm) = network.head_fc(), self.head_fc
            entries.append((fc.path, name, kind))
            if fc.norm:
                entries.append((fc.norm, norm, "norm"))
        if model.num_classes is not None:
            entries.append(("classifier", self.classifier, "classifier"))
        return entries


def _stages(model: nn.Module) -> list[str]:
    """timm's ``S.J`` index of each block: MobileNetV1's stages start at stride 2, MobileNetV2's at each table row,
    MobileNetV3's at its arch_def rows."""
    if hasattr(model, "variant"):
        stages = v4_stages(model.variant) if model.variant.startswith("conv_") else v3_stages(model.variant)
        return [f"{stage}.{j}" for stage, j in stages]
    if hasattr(model, "block_table"):
        return [f"{stage}.{j}" for stage, (_, _, n, _) in enumerate(model.block_table) for j in range(n)]
    names, stage, index = [], 0, -1
    for i, block in enumerate(model.network().blocks):
        stage, index = (stage + 1, 0) if block.stride == 2 and i > 0 else (stage, index + 1)
        names.append(f"{stage}.{index}")
    return names


def _amc_v1(i, j, n, block, conv, stages):
    return f"features.{i}.{3 * j}", f"features.{i}.{3 * j + 1}"


def _torchvision(i, j, n, block, conv, stages):
    prefix = f"features.{i + 1}.conv"  # Conv-BN-ReLU6 triples are Sequentials, the projection is flat
    return (f"{prefix}.{j}.0", f"{prefix}.{j}.1") if j < n - 1 else (f"{prefix}.{j}", f"{prefix}.{j + 1}")


def _notes_v2(i, j, n, block, conv, stages):
    prefix = f"features.{i + 1}.conv"  # one flat Sequential: conv, bn, relu6 per layer
    return f"{prefix}.{3 * j}", f"{prefix}.{3 * j + 1}"


def _timm(i, j, n, block, conv, stages):
    # timm's DepthwiseSeparableConv (no expansion) calls its projection conv_pw.
    name = "conv_pw" if conv.name == "conv_pwl" and not block.expand else conv.name
    return f"blocks.{stages[i]}.{name}", f"blocks.{stages[i]}.bn{j + 1}"


def _torchvision_v3(i, j, n, block, conv, stages):
    k = j + (1 if block.se_channels and conv.name == "conv_pwl" else 0)  # the SqueezeExcitation sits in the list
    return f"features.{i + 1}.block.{k}.0", f"features.{i + 1}.block.{k}.1"


def _torchvision_v3_se(i, block, stages):
    k = 2 if block.expand else 1
    return f"features.{i + 1}.block.{k}.fc1", f"features.{i + 1}.block.{k}.fc2"


def _timm_se(i, block, stages):
    return f"blocks.{stages[i]}.se.conv_reduce", f"blocks.{stages[i]}.se.conv_expand"


def _timm_v3_head(network, stages):
    last = int(stages[-1].split(".")[0]) + 1  # timm's ConvBnAct stage after the blocks
    return f"blocks.{last}.0.conv", f"blocks.{last}.0.bn1"


def _keras_v1(i, j, n, block, conv, stages):
    name = f"conv_{'dw' if j == 0 else 'pw'}_{i + 1}"
    return name, f"{name}_bn"


def _keras_v2(i, j, n, block, conv, stages):
    prefix = "expanded_conv" if i == 0 else f"block_{i}"
    part = {"conv_pw": "expand", "conv_dw": "depthwise", "conv_pwl": "project"}[conv.name]
    return f"{prefix}_{part}", f"{prefix}_{part}_BN"


_TIMM_V4 = {  # our conv name -> timm's module and BatchNorm names (ConvBnAct, EdgeResidual, UniversalInvertedResidual)
    "conv": ("conv", "bn1"), "conv_exp": ("conv_exp", "bn1"), "conv_dw_start": ("dw_start.conv", "dw_start.bn"),
    "conv_pw": ("pw_exp.conv", "pw_exp.bn"), "conv_dw": ("dw_mid.conv", "dw_mid.bn"),
}  # fmt: skip


def _timm_v4(i, j, n, block, conv, stages):
    if conv.name == "conv_pwl":
        name, norm = ("conv_pwl", "bn2") if block.kind == "fused" else ("pw_proj.conv", "pw_proj.bn")
    else:
        name, norm = _TIMM_V4[conv.name]
    return f"blocks.{stages[i]}.{name}", f"blocks.{stages[i]}.{norm}"


def _keras_v3(i, j, n, block, conv, stages):
    prefix = "expanded_conv_" if i == 0 else f"expanded_conv_{i}_"
    part = {"conv_pw": "expand", "conv_dw": "depthwise", "conv_pwl": "project"}[conv.name]
    return f"{prefix}{part}", f"{prefix}{part}_bn"


def _keras_v3_se(i, block, stages):
    prefix = "expanded_conv_" if i == 0 else f"expanded_conv_{i}_"
    return f"{prefix}squeeze_excite_conv", f"{prefix}squeeze_excite_conv_1"


def _named(conv: str, norm: str) -> Callable[[table.Network, list], tuple[str, str]]:
    return lambda network, stages: (conv, norm)


def _features_head(network: table.Network, stages: list) -> tuple[str, str]:
    last = f"features.{len(network.blocks) + 1}"  # the Sequential after the blocks
    return f"{last}.0", f"{last}.1"


def _any(pattern: str) -> Callable[[Collection[str]], bool]:
    return lambda names: any(re.match(pattern, name) for name in names if name is not None)


def _timm_detect(projection: bool) -> Callable[[Collection[str]], bool]:
    blocks = _any(r"blocks\.\d+\.\d+\.conv_dw\.weight$")
    has_pwl = _any(r"blocks\.\d+\.\d+\.conv_pwl\.weight$")
    return lambda names: "conv_stem.weight" in names and blocks(names) and has_pwl(names) == projection


def _timm_v3_detect(names: Collection[str]) -> bool:
    """timm's MobileNetV3: its 1x1 conv after the blocks is a ConvBnAct block, and conv_head has a bias."""
    return "conv_stem.weight" in names and "conv_head.bias" in names and _any(r"blocks\.\d+\.0\.conv\.weight$")(names)


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "torchvision_v3", "torch", "MobileNetV3",
            "torchvision.models.mobilenet_v3_large/_small (features.N.block.K, classifier.0/3)",
            ("features.0.0", "features.0.1"), _torchvision_v3, _features_head, "classifier.3",
            _any(r"features\.\d+\.block\.\d+\.0\.weight$"), TORCHVISION, "torchvision.models.mobilenet_v3_large",
            se=_torchvision_v3_se, head_fc=("classifier.0", "dense", ""),
        ),
        Layout(
            "timm_v3", "torch", "MobileNetV3",
            "timm mobilenetv3_large_100/_075, _small_100, tf_..._minimal_100 (blocks.S.J, se.conv_reduce, conv_head)",
            ("conv_stem", "bn1"), _timm, _timm_v3_head, "classifier", _timm_v3_detect, TIMM,
            "timm.create_model('mobilenetv3_large_100')", se=_timm_se, head_fc=("conv_head", "dense_as_conv", ""),
        ),
        Layout(
            "torchvision", "torch", "MobileNetV2",
            "torchvision.models.mobilenet_v2, any width_mult (features.N.conv.M.K)",
            ("features.0.0", "features.0.1"), _torchvision, _features_head, "classifier.1",
            _any(r"features\.\d+\.conv\.\d+\.\d+\.weight$"), TORCHVISION, "torchvision.models.mobilenet_v2",
        ),
        Layout(
            "amc_v1", "torch", "MobileNetV1",
            "the design notes' / AMC MobileNetV1 (conv1.0, features.N.0-4, classifier.0), any channel list",
            ("conv1.0", "conv1.1"), _amc_v1, None, "classifier.0",
            lambda names: _any(r"conv1\.")(names) and _any(r"features\.\d+\.3\.weight$")(names), None,
            "mobilenet_jax.weights.torch_reference.TorchMobileNetV1 (the design notes' code)",
        ),
        Layout(
            "notes_v2", "torch", "MobileNetV2",
            "the design notes' MobileNetV2 port (features.N.conv.M, int(c * width) rounding)",
            ("features.0.0", "features.0.1"), _notes_v2, _features_head, "classifier.1",
            _any(r"features\.\d+\.conv\.\d+\.weight$"), None,
            "mobilenet_jax.weights.torch_reference.TorchMobileNetV2 (the design notes' code)",
        ),
        Layout(
            "timm_v1", "torch", "MobileNetV1",
            "timm mobilenetv1_100/_100h/_125 (conv_stem, blocks.S.J.conv_dw/conv_pw, ReLU6)",
            ("conv_stem", "bn1"), _timm, _named("conv_head", "bn2"), "classifier",
            _timm_detect(projection=False), TIMM_INCEPTION, "timm.create_model('mobilenetv1_100')",
        ),
        Layout(
            "timm_v2", "torch", "MobileNetV2",
            "timm mobilenetv2_035 ... _140, _110d, _120d (blocks.S.J.conv_pw/conv_dw/conv_pwl)",
            ("conv_stem", "bn1"), _timm, _named("conv_head", "bn2"), "classifier",
            _timm_detect(projection=True), TIMM, "timm.create_model('mobilenetv2_100')",
        ),
        Layout(
            "timm_v4", "torch", "MobileNetV4",
            "timm mobilenetv4_conv_small/_medium (blocks.S.J.conv/conv_exp/dw_start/pw_exp/dw_mid/pw_proj, norm_head)",
            ("conv_stem", "bn1"), _timm_v4, _timm_v3_head, "classifier",
            lambda names: "conv_stem.weight" in names and "norm_head.weight" in names, TIMM,
            "timm.create_model('mobilenetv4_conv_small')", head_fc=("conv_head", "dense_as_conv", "norm_head"),
        ),
        Layout(
            "keras_v3", "keras", "MobileNetV3",
            "keras.applications.MobileNetV3Large/Small, minimalistic too (conv, expanded_conv_N_*, conv_1/2, logits)",
            ("conv", "conv_bn"), _keras_v3, _named("conv_1", "conv_1_bn"), "logits",
            lambda names: "conv_bn" in names or "expanded_conv_1_expand" in names, KERAS,
            "keras.applications.MobileNetV3Large", se=_keras_v3_se, head_fc=("conv_2", "dense_as_conv", ""),
        ),
        Layout(
            "keras_v1", "keras", "MobileNetV1",
            "keras.applications.MobileNet, alpha 0.25-1.0 (conv1, conv_dw_N, conv_pw_N, conv_preds)",
            ("conv1", "conv1_bn"), _keras_v1, None, "conv_preds",
            lambda names: "conv_pw_1" in names, KERAS, "keras.applications.MobileNet",
        ),
        Layout(
            "keras_v2", "keras", "MobileNetV2",
            "keras.applications.MobileNetV2, alpha 0.35-1.4 (Conv1, block_N_expand/depthwise/project, predictions)",
            ("Conv1", "bn_Conv1"), _keras_v2, _named("Conv_1", "Conv_1_bn"), "predictions",
            lambda names: "block_1_expand" in names or "expanded_conv_project" in names, KERAS,
            "keras.applications.MobileNetV2",
        ),
    )
}  # fmt: skip


def of(framework: str) -> dict[str, Layout]:
    """The layouts of one framework ('torch' or 'keras'), in registry order."""
    return {name: layout for name, layout in LAYOUTS.items() if layout.framework == framework}


def get(name: str, model: nn.Module | None = None) -> Layout:
    """The layout ``name``; with ``model``, checked to hold that model's architecture (one sentence if not)."""
    if name not in LAYOUTS:
        raise ValueError(f"Unknown layout {name!r}; use one of {tuple(LAYOUTS)}.")
    layout = LAYOUTS[name]
    if model is not None and type(model).__name__ != layout.architecture:
        fits = [n for n, entry in LAYOUTS.items() if entry.architecture == type(model).__name__]
        if not fits:
            raise ValueError(
                f"No weight layout holds a {type(model).__name__} (the layouts hold MobileNetV1 and MobileNetV2); "
                "keep its weights as a model directory (checkpoint.save_model)."
            )
        raise ValueError(f"{type(model).__name__} converts to the {' or '.join(map(repr, fits))} layout, not {name!r}.")
    return layout


def detect(names: Collection[str], framework: str) -> str | None:
    """The first layout of ``framework`` whose names ``names`` (tensor keys or layer names) carry, or None."""
    return next((name for name, layout in of(framework).items() if layout.detect(names)), None)


# ----------------------------------------------------------------------------- shared by the converters


class WeightsMismatchError(ValueError):
    """Weights that do not fit the architecture; the message lists missing, unexpected and mis-shaped entries."""


def mismatch_message(
    subject: str, missing: list[str], unexpected: list[str], misshaped: list[str], limit: int = 12
) -> str:
    """``'<subject>: 2 missing: [...]; 1 unexpected: [...].'``, each list cut after ``limit`` entries."""

    def listing(title: str, items: list[str]) -> str:
        more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
        return f"{len(items)} {title}: [{', '.join(items[:limit])}{more}]"

    lists = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    return f"{subject}: " + "; ".join(listing(title, items) for title, items in lists if items) + "."


def search_width(
    score: Callable[[float], float], widths: Iterable[float] | None = None, perfect: float = 1.0
) -> float | None:
    """The width with the highest ``score(width)`` above 0, the first one on ties; None when none scores.

    The converters' one width search: ``widths`` defaults to :func:`candidate_widths`
    (round widths first); a ``score`` of ``perfect`` ends the search, and a ValueError
    from ``score`` means the width cannot be built.
    """
    best, best_score = None, 0.0
    for width in candidate_widths() if widths is None else widths:
        try:
            value = float(score(width))
        except ValueError:
            continue
        if value > best_score:
            best, best_score = width, value
        if value >= perfect:
            break
    return best


ROUND_WIDTHS = (1.0, 0.25, 0.35, 0.5, 0.75, 1.25, 1.3, 1.4, 1.5, 2.0)


def v1_fields(stem: int, channels: Sequence[int], strides: Sequence[int]) -> dict[str, Any]:
    """MobileNetV1 fields giving these channel counts: a named profile at a width, else the channel list itself."""
    observed = (stem, tuple(zip(channels, strides, strict=True)))
    for name, (base_stem, _) in V1_PROFILES.items():
        widths = dict.fromkeys((1.0, stem / base_stem, *ROUND_WIDTHS))
        width = search_width(lambda w, name=name: v1_architecture(name, w) == observed, widths)
        if width is not None:
            return {"width": width, "profile": name}
    return {"profile": (stem, tuple(c if s == 1 else (c, s) for c, s in zip(channels, strides, strict=True)))}


@functools.cache
def candidate_widths() -> tuple[float, ...]:
    """Widths to try when recognising a converted model, round ones first (torchvision's 0.35 is recorded as 0.35)."""
    widths = []
    for denominator in (20, 100, 1000, 8000):
        widths += [i / denominator for i in range(1, 4 * denominator + 1)]
    return tuple(dict.fromkeys(widths))


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """``tree[path[0]][path[1]]... = value``, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
