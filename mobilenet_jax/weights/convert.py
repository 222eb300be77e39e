"""Weight conversion for MobileNetV1/V2/V3: PyTorch and Keras to Flax, and Flax back to PyTorch.

:func:`load` is the front door: it reads any of the layouts below (detected from the
content) from a ``.pth``, a ``.safetensors``, a state dict, a Keras ``.h5`` /
``.weights.h5`` file or a ``keras.Model`` (see :mod:`mobilenet_jax.weights.convert_keras`).
PyTorch layouts understood (detected from the key names):

* ``'torchvision'``: ``torchvision.models.mobilenet_v2`` at any ``width_mult``.
* ``'amc_v1'``: the MobileNetV1 PyTorch code in the design notes (``conv1.0/1``,
  ``features.N.0/1/3/4``, ``classifier.0``), any channel profile (``normal``,
  AMC ``0.5flops``, pruned lists).
* ``'notes_v2'``: the MobileNetV2 PyTorch port in the design notes
  (``features.N.conv.M``, ``int(c * width)`` channel rounding).
* ``'timm_v1'``: timm's ``mobilenetv1_100`` / ``_100h`` / ``_125`` (``conv_stem``,
  ``blocks.S.J.conv_dw/conv_pw``, ReLU6, optional ``conv_head``).
* ``'timm_v2'``: timm's ``mobilenetv2_035`` ... ``_140`` and the deeper ``_110d`` /
  ``_120d`` (fixed stem and head widths).
* ``'torchvision_v3'``: ``torchvision.models.mobilenet_v3_large`` / ``_small`` at any ``width_mult``.
* ``'timm_v3'``: timm's ``mobilenetv3_large_100`` / ``_075``, ``mobilenetv3_small_*`` and the
  minimalistic ``tf_mobilenetv3_*_minimal_100``, which were trained with TF's padding and
  BatchNorm epsilon: a file does not say so, so convert them with ``--padding tf
  --bn_epsilon 1e-3`` (or ``model.clone(padding='tf', bn_epsilon=1e-3)``).
* ``'timm_v4'``: timm's ``mobilenetv4_conv_small`` / ``_medium`` (and their ``_050`` widths).

Usage::

    model, variables = convert.load("model.safetensors")   # or .pth, .h5, a keras.Model
    logits = model.apply(variables, images_nhwc)
    state_dict = convert.to_torch(model, variables)      # torchvision / AMC / timm layout

A published model's name (``'timm/mobilenetv2_100.ra_in1k'``, ``'torchvision/mobilenet_v2'``,
``'keras/mobilenet_v2_1.0_224'``; :mod:`mobilenet_jax.weights.hub`) works wherever a path
does: the file is taken from (or downloaded into) its ecosystem's cache.
:func:`mobilenet_jax.pretrained` adds a cache of the converted copy.

Command line (:mod:`mobilenet_jax.weights.convert_cli`): ``python -m mobilenet_jax.convert IN OUT_DIR`` writes an orbax
checkpoint of the variables, the detected architecture (``model.json``) and, for
Keras weights, the [-1, 1] input scaling they expect (``preprocessing.json``);
``--list_layouts`` prints what it reads.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import linen as nn

from mobilenet_jax import errors
from mobilenet_jax.data.preprocessing import TIMM, Preprocessing
from mobilenet_jax.models import (
    MobileNetV1,
    MobileNetV2,
    MobileNetV3,
    MobileNetV4,
    make_divisible,
    mobilenet_v2,
    mobilenet_v3,
    mobilenet_v4,
    registry,
    v1_architecture,
    v2_architecture,
)
from mobilenet_jax.weights import hub, layouts, torch_file

LAYOUTS = tuple(layouts.of("torch"))
# One line per layout, for --list_layouts and the docs.
LAYOUT_NOTES = {name: layout.description for name, layout in layouts.of("torch").items()}
# Strides of the 13 depthwise-separable blocks of every MobileNetV1 profile.
V1_STRIDES = tuple(s for _, s in v1_architecture("normal")[1])

# Permutations from a Flax kernel to the PyTorch weight: conv HWIO -> OIHW, dense IO -> OI.
_CONV_TO_TORCH = (3, 2, 0, 1)
_CONV_TO_FLAX = (2, 3, 1, 0)
_DENSE = (1, 0)
DENSE_AS_CONV = ("dense", "as 1x1 conv")  # dense IO -> conv OI11 (timm's conv_head)


# A state dict that does not fit the architecture (the converters' one mismatch error).
StateDictMismatchError = layouts.WeightsMismatchError


# ----------------------------------------------------------------------------- layout tables


def _modules(model: nn.Module, layout: str) -> list[tuple[str, str, str]]:
    """``(flax module path, PyTorch module name, kind)`` of every layer, from the layout's naming rule."""
    entry = layouts.get(layout, model)
    if entry.framework != "torch":
        raise ValueError(f"{layout!r} is a Keras layout; PyTorch layouts are {LAYOUTS}.")
    if layout == "amc_v1" and (model.head_channels or model.activation != "relu"):
        raise ValueError("The 'amc_v1' layout has ReLU and no head conv; write this model as 'timm_v1'.")
    return entry.names(model)


def _entries(model: nn.Module, layout: str, flax_params: Mapping) -> list[tuple[str, str | None, tuple, tuple | None]]:
    """``(torch_key, flax_collection, flax_path, permutation)`` for every tensor, in PyTorch order.

    ``flax_collection`` is None for BatchNorm's ``num_batches_tracked``, which Flax does not keep;
    the permutation ``DENSE_AS_CONV`` is a dense kernel stored as a 1x1 conv (timm's ``conv_head``).
    """
    entries = []
    for flax_name, torch_name, kind in _modules(model, layout):
        path = tuple(flax_name.split("/"))
        if kind == "norm":
            entries += [
                (f"{torch_name}.weight", "params", path + ("scale",), None),
                (f"{torch_name}.bias", "params", path + ("bias",), None),
                (f"{torch_name}.running_mean", "batch_stats", path + ("mean",), None),
                (f"{torch_name}.running_var", "batch_stats", path + ("var",), None),
                (f"{torch_name}.num_batches_tracked", None, path, None),
            ]
            continue
        weight = {"classifier": _DENSE, "dense": _DENSE, "dense_as_conv": DENSE_AS_CONV}.get(kind, _CONV_TO_TORCH)
        entries.append((f"{torch_name}.weight", "params", path + ("kernel",), weight))
        if kind in ("classifier", "dense", "dense_as_conv", "conv_bias") and "bias" in _get(flax_params, path):
            entries.append((f"{torch_name}.bias", "params", path + ("bias",), None))
    return entries


def _to_torch_array(value: np.ndarray, perm: tuple | None) -> np.ndarray:
    if perm == DENSE_AS_CONV:
        return value.T[:, :, None, None]
    return value.transpose(perm) if perm else value


def _to_flax_array(value: np.ndarray, perm: tuple | None) -> np.ndarray:
    if perm == DENSE_AS_CONV:
        return value.reshape(value.shape[:2]).T
    if perm == _CONV_TO_TORCH:
        return value.transpose(_CONV_TO_FLAX)
    return value.transpose(perm) if perm else value


def _get(tree: Mapping, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _abstract_variables(model: nn.Module, in_channels: int = 3) -> dict:
    images = jax.ShapeDtypeStruct((1, 32, 32, in_channels), np.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def _expected_shapes(model: nn.Module, layout: str, in_channels: int = 3) -> dict[str, tuple]:
    variables = _abstract_variables(model, in_channels)
    shapes = {}
    for key, collection, path, perm in _entries(model, layout, variables["params"]):
        if collection is None:
            shapes[key] = ()
            continue
        shape = _get(variables[collection], path).shape
        shapes[key] = _to_torch_array(np.empty(shape, np.float32), perm).shape
    return shapes


# ----------------------------------------------------------------------------- loading


def _import_torch():
    try:
        import torch
    except ImportError:
        raise errors.UserError("Reading or writing PyTorch weights needs torch: pip install -e '.[torch]'.") from None
    return torch


def load_state_dict(source: Any) -> dict[str, np.ndarray]:
    """Reads a state dict from a path, a checkpoint dict or a state dict, as numpy arrays.

    A ``.safetensors`` file is read with safetensors, a ``.pth`` file (zip or legacy
    format) with :mod:`mobilenet_jax.weights.torch_file`: neither needs torch, and
    reading a checkpoint never runs code from it. Files that reader does not understand
    go to ``torch.load(weights_only=True)`` when torch is installed.
    ``{'state_dict': ...}`` wrappers and DataParallel's ``module.`` prefixes are removed.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            kind = "safetensors file" if path.endswith(".safetensors") else "PyTorch checkpoint"
            raise FileNotFoundError(f"No {kind} at {path!r}.")
        source = _load_safetensors(path) if path.endswith(".safetensors") else _load_torch_file(path)
    if not isinstance(source, Mapping):
        raise TypeError(f"Expected a state dict, a checkpoint dict or a path, got {type(source).__name__}.")
    if "state_dict" in source and isinstance(source["state_dict"], Mapping):
        source = source["state_dict"]
    state = {}
    for key, value in source.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        elif not isinstance(value, np.ndarray):
            continue  # metadata such as epoch numbers stored beside the tensors
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    return state


def _load_torch_file(path: str) -> Any:
    """A ``.pth`` file's contents, read without torch; with torch.load where that reader cannot."""
    try:
        return torch_file.load(path)
    except errors.UnreadableFileError as error:
        try:
            import torch
        except ImportError:
            if isinstance(error, torch_file.UnsupportedFormatError):
                raise errors.UnreadableFileError(
                    f"{str(error).removesuffix('.')}; torch reads it: pip install -e '.[torch]'."
                ) from None
            raise error from None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch raises many kinds; our reader's sentence says what is wrong
            raise error from None


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file (timm's and Hugging Face's format) as numpy arrays; needs no torch."""
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise errors.UnreadableFileError(
            f"Could not read {path!r} as a safetensors file ({str(error).splitlines()[0]})."
        ) from None


def detect_layout(state: Mapping[str, Any]) -> str | None:
    """The layout of a (prefix-free) state dict, or None when no MobileNet layout fits."""
    return layouts.detect(list(state), "torch")


def _num_classes(state: Mapping, key: str) -> int:
    return int(state[key].shape[0]) if key in state and state[key].ndim == 2 else 1000


def _detect_v1(state: Mapping, strides: Sequence[int] | None) -> MobileNetV1:
    num_classes = _num_classes(state, "classifier.0.weight")
    stem = state["conv1.0.weight"].shape[0] if "conv1.0.weight" in state else 32
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"features\.(\d+)\.3\.weight$", k))})
    channels = tuple(int(state[f"features.{i}.3.weight"].shape[0]) for i in indices)
    if indices != list(range(len(indices))) or (strides is None and len(indices) != len(V1_STRIDES)):
        # Blocks missing or a non-standard depth without strides: compare with the standard network.
        return MobileNetV1(num_classes=num_classes, width=stem / 32)
    strides = tuple(strides) if strides is not None else V1_STRIDES
    if len(strides) != len(channels):
        raise ValueError(
            f"The state dict has {len(channels)} MobileNetV1 blocks but {len(strides)} strides were given."
        )
    return MobileNetV1(num_classes=num_classes, **layouts.v1_fields(int(stem), channels, strides))


def _timm_blocks(state: Mapping, conv: str) -> dict[tuple[int, int], tuple]:
    """``{(stage, index): shape of blocks.S.J.<conv>.weight}``."""
    found = {}
    for key, value in state.items():
        match = re.match(rf"blocks\.(\d+)\.(\d+)\.{conv}\.weight$", key)
        if match:
            found[int(match[1]), int(match[2])] = tuple(value.shape)
    return dict(sorted(found.items()))


def _detect_timm_v1(state: Mapping) -> MobileNetV1:
    num_classes = _num_classes(state, "classifier.weight")
    stem = int(state["conv_stem.weight"].shape[0])
    blocks = _timm_blocks(state, "conv_pw")
    strides = [2 if stage > 0 and index == 0 else 1 for stage, index in blocks]
    channels = tuple(shape[0] for shape in blocks.values())
    head = int(state["conv_head.weight"].shape[0]) if "conv_head.weight" in state else 0
    return MobileNetV1(
        num_classes=num_classes, activation="relu6", head_channels=head, **layouts.v1_fields(stem, channels, strides)
    )


def _detect_timm_v2(state: Mapping) -> MobileNetV2:
    num_classes = _num_classes(state, "classifier.weight")
    stem = int(state["conv_stem.weight"].shape[0])
    dw = _timm_blocks(state, "conv_dw")
    repeats = collections.Counter(stage for stage, _ in dw)
    table = (
        tuple((t, c, repeats.get(stage, n), s) for stage, (t, c, n, s) in enumerate(mobilenet_v2.V2_BLOCKS))
        if len(repeats) == len(mobilenet_v2.V2_BLOCKS)
        else mobilenet_v2.V2_BLOCKS
    )
    observed = [shape[0] for shape in dw.values()]  # hidden widths, block by block
    outputs = [shape[0] for shape in _timm_blocks(state, "conv_pwl").values()]
    head = int(state["conv_head.weight"].shape[0]) if "conv_head.weight" in state else None

    def fits(width: float, fix: bool) -> bool:
        if make_divisible(32 * width) != stem if not fix else (stem != 32 or make_divisible(24 * width) != outputs[0]):
            return False  # cheap pre-filters
        _, blocks, last = v2_architecture(width, "torchvision", table, fix_stem_head=fix)
        hidden, outs = [b.hidden for b in blocks], [b.out for b in blocks if b.expand]
        return hidden == observed and outs == outputs and (head is None or last == head)

    for fix in (False, True):  # timm's 'd' variants keep the stem and the head at any width
        width = layouts.search_width(functools.partial(fits, fix=fix))
        if width is not None:
            return MobileNetV2(num_classes=num_classes, width=width, block_table=table, fix_stem_head=fix)
    return MobileNetV2(num_classes=num_classes, block_table=table)


def _block_convs(architecture: tuple) -> dict[int, list[tuple]]:
    """PyTorch conv weight shapes of each inverted-residual block, keyed by ``features`` index."""
    _, blocks, _ = architecture
    return {
        i + 1: ([(b.hidden, b.in_channels, 1, 1)] if b.expand else []) + [(b.hidden, 1, 3, 3), (b.out, b.hidden, 1, 1)]
        for i, b in enumerate(blocks)
    }


def _detect_v2(state: Mapping, layout: str) -> MobileNetV2:
    rounding = "torchvision" if layout == "torchvision" else "floor"
    num_classes = _num_classes(state, "classifier.1.weight")
    stem = state["features.0.0.weight"].shape[0] if "features.0.0.weight" in state else None
    found = collections.defaultdict(list)
    for key, value in state.items():
        match = re.match(r"features\.(\d+)\.conv\.([\d.]+)\.weight$", key)
        if match and value.ndim == 4:
            found[int(match[1])].append((tuple(map(int, match[2].split("."))), tuple(value.shape)))
    observed = {i: [shape for _, shape in sorted(convs)] for i, convs in found.items()}

    scale = make_divisible if rounding == "torchvision" else int

    def score(width: float) -> int:  # 1 + the blocks whose convs have the observed shapes
        if stem is not None and scale(32 * width) != stem:
            return 0  # cheap pre-filter: the stem alone rules out most widths
        return 1 + sum(observed.get(i) == convs for i, convs in _block_convs(v2_architecture(width, rounding)).items())

    width = layouts.search_width(score, perfect=1 + len(v2_architecture()[1]))
    return MobileNetV2(num_classes=num_classes, width=width or 1.0, rounding=rounding)


def _detect_v3(state: Mapping, layout: str) -> MobileNetV3:
    """The MobileNetV3 whose depthwise convs, stem, 1x1 conv and dense head layer have the state dict's widths."""
    torchvision = layout == "torchvision_v3"
    classifier = "classifier.3.weight" if torchvision else "classifier.weight"
    depthwise = [v.shape for v in state.values() if v.ndim == 4 and v.shape[1] == 1 and v.shape[2] > 1]
    minimal = all(shape[2] == 3 for shape in depthwise) and not any(".fc1." in k or ".se." in k for k in state)
    variant = "large" if len(depthwise) == len(mobilenet_v3.V3_LARGE) else "small"
    fc = state["classifier.0.weight" if torchvision else "conv_head.weight"]
    observed = [state["features.0.0.weight" if torchvision else "conv_stem.weight"].shape[0]]
    observed += [shape[0] for shape in depthwise] + [fc.shape[1], fc.shape[0]]
    rounding = "torchvision" if torchvision else "timm"

    def fits(width: float) -> bool:
        network = mobilenet_v3.v3_network(variant, width, minimal, rounding)
        widths = [network.stem_channels] + [block.hidden for block in network.blocks]
        return widths + [network.head_channels, network.head_hidden] == observed

    width = layouts.search_width(fits) or 1.0
    return MobileNetV3(
        num_classes=_num_classes(state, classifier), variant=variant, width=width, minimal=minimal,
        rounding=rounding, bn_epsilon=1e-3 if torchvision else 1e-5,
    )  # fmt: skip


def _detect_v4(state: Mapping) -> MobileNetV4:
    """The MobileNetV4 whose blocks, stem and 1x1 conv after the blocks have the state dict's widths."""
    blocks = {".".join(key.split(".")[1:3]) for key in state if key.startswith("blocks.")}  # 'S.J'; the last: 960
    variant = next(
        (name for name, (_, stages) in mobilenet_v4.VARIANTS.items() if len(blocks) == sum(stages) + 1), "conv_small"
    )
    observed = [v.shape[0] for k, v in state.items() if v.ndim == 4 and k != "conv_head.weight"]

    def fits(width: float) -> bool:
        network = mobilenet_v4.v4_network(variant, width)
        return [conv.out_channels for conv in network.convs()] == observed

    width = layouts.search_width(fits) or 1.0
    return MobileNetV4(num_classes=_num_classes(state, "classifier.weight"), variant=variant, width=width)


def _mismatch_message(model: nn.Module, layout: str, state: Mapping, expected: Mapping, limit: int = 12) -> str | None:
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if not (missing or unexpected or misshaped):
        return None

    hint = ""
    if any(".se." in k for k in state):
        hint = (
            " It has squeeze-excitation layers but is not one of the MobileNetV3 layouts (EfficientNet, "
            "MobileNetV3-RW and other timm variants are not supported)."
        )
    subject = f"The state dict does not fit {describe(model)} in the {layout!r} layout"
    return layouts.mismatch_message(subject, missing, unexpected, misshaped, limit) + hint


def describe(model: nn.Module) -> str:
    """``MobileNetV2(width=0.35, num_classes=1000, ...)`` with the fields that differ from the defaults."""
    defaults = type(model)()
    fields = {"width": model.width, "num_classes": model.num_classes}
    for name in registry.architecture_fields(type(model).__name__) - set(registry.RUNTIME_FIELDS):
        if name not in fields and getattr(model, name) != getattr(defaults, name):
            fields[name] = getattr(model, name)
    return f"{type(model).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def _closest_layout(state: Mapping) -> tuple[str, nn.Module]:
    """The layout whose key names (block numbers aside) the state dict shares most, with a reference model."""
    references = {
        "torchvision": MobileNetV2(),
        "amc_v1": MobileNetV1(),
        "notes_v2": MobileNetV2(rounding="floor"),
        "timm_v1": MobileNetV1(activation="relu6"),
        "timm_v2": MobileNetV2(),
    }
    pattern = functools.partial(re.sub, r"\d+", "#")
    keys = {pattern(k) for k in state}
    scores = {
        layout: len(keys & {pattern(k) for k in _expected_shapes(model, layout)})
        for layout, model in references.items()
    }
    best = max(scores, key=scores.get)
    return best, references[best]


def from_torch(source: Any, *, strides: Sequence[int] | None = None) -> tuple[nn.Module, dict]:
    """Builds the Flax model a PyTorch MobileNet state dict describes, and its variables.

    Args:
      source: a state dict (torch tensors or numpy arrays), a checkpoint dict holding
        ``'state_dict'``, or a path to a ``.pth`` file.
      strides: MobileNetV1 only: the per-block strides of a network whose depth is not
        the standard 13 blocks.

    Returns:
      ``(model, {'params': ..., 'batch_stats': ...})``.

    Raises:
      StateDictMismatchError: the state dict does not fit any supported MobileNet;
        the message lists the missing, unexpected and mis-shaped keys.
    """
    state = load_state_dict(source)
    layout = detect_layout(state)
    if layout is None:
        closest, reference = _closest_layout(state)
        message = _mismatch_message(reference, closest, state, _expected_shapes(reference, closest))
        raise StateDictMismatchError(
            f"No MobileNet layout this converter knows fits (closest: {closest!r}; see --list_layouts). {message}"
        )
    detect = {
        "amc_v1": lambda: _detect_v1(state, strides),
        "timm_v1": lambda: _detect_timm_v1(state),
        "timm_v2": lambda: _detect_timm_v2(state),
        "timm_v3": lambda: _detect_v3(state, layout),
        "torchvision_v3": lambda: _detect_v3(state, layout),
        "timm_v4": lambda: _detect_v4(state),
    }.get(layout, lambda: _detect_v2(state, layout))
    model = detect()
    stem_key = layouts.get(layout).stem[0] + ".weight"  # the layout's record names its stem conv
    in_channels = state[stem_key].shape[1] if stem_key in state and state[stem_key].ndim == 4 else 3
    expected = _expected_shapes(model, layout, in_channels)
    message = _mismatch_message(model, layout, state, expected)
    if message:
        raise StateDictMismatchError(message)

    variables: dict = {"params": {}, "batch_stats": {}}
    for key, collection, path, perm in _entries(model, layout, _abstract_variables(model, in_channels)["params"]):
        if collection is None:
            continue
        value = _to_flax_array(np.asarray(state[key], dtype=np.float32), perm)
        layouts.set_path(variables[collection], path, jax.numpy.asarray(value))
    return model, variables


def default_layout(model: nn.Module) -> str:
    """The PyTorch layout that can hold ``model``: AMC's for a ReLU MobileNetV1, timm's for ReLU6 or a head conv
    (and for MobileNetV2 with ``fix_stem_head``), torchvision's for other MobileNetV2s."""
    if isinstance(model, MobileNetV1):
        return "timm_v1" if model.activation == "relu6" or model.head_channels else "amc_v1"
    if isinstance(model, MobileNetV3):
        return "torchvision_v3" if model.rounding == "torchvision" else "timm_v3"
    if isinstance(model, MobileNetV4):
        return "timm_v4"
    return "timm_v2" if getattr(model, "fix_stem_head", False) else "torchvision"


# How the published weights of each PyTorch layout are fed and evaluated (the layout records): torchvision
# resizes to 256 and crops 224 (bilinear, ImageNet mean/std); timm's MobileNets the same with bicubic
# (crop_pct 0.875), MobileNetV1's weights on Inception's inputs (mean = std = 0.5). The design notes'
# layouts have no published weights: nothing is recorded.
PREPROCESSING = {name: layout.preprocessing for name, layout in layouts.of("torch").items() if layout.preprocessing}


class Converted(NamedTuple):
    """What :func:`load_with_info` returns: the model, its variables, the source layout and the inputs it expects."""

    model: nn.Module
    variables: dict
    layout: str
    preprocessing: Preprocessing | None  # the inputs and evaluation crop of the published weights (preprocessing.json)
    note: str = ""  # e.g. what became of a Keras transfer-learning model's head


def load_with_info(source: Any, *, strides: Sequence[int] | None = None) -> Converted:
    """Any supported MobileNet weights: PyTorch (``.pth``, ``.safetensors``, a state dict), Keras
    (a ``keras.Model``, ``.h5``, ``.weights.h5``), or a published model's name
    (:mod:`mobilenet_jax.weights.hub`, fetched into its cache); the layout is detected from the content."""
    if hub.is_name(source):
        item = hub.entry(source)
        return load_published(item, hub.fetch(item))[0]
    return _load_path(source, strides=strides)


def _load_path(source: Any, *, strides: Sequence[int] | None = None) -> Converted:
    from mobilenet_jax.weights import convert_keras

    if convert_keras.is_keras_source(source):
        return Converted(*convert_keras.convert_keras(source))
    state = load_state_dict(source)
    model, variables = from_torch(state, strides=strides)
    layout = detect_layout(state)
    return Converted(model, variables, layout, PREPROCESSING.get(layout))


def load_published(item: hub.Entry, path: str) -> tuple[Converted, str]:
    """Converts a published file already fetched to ``path``, with the catalogue's preprocessing record.

    A cached file that cannot be read is moved aside and fetched again, once. Returns the
    conversion and the path of the file it read.
    """
    try:
        converted = _load_path(path)
    except errors.UnreadableFileError as error:
        moved = hub.move_aside(path)
        if hub.offline():
            raise hub.PretrainedError(
                f"The cached file of {item.name} cannot be read ({error}); it was moved to {moved} and downloads "
                f"are off: put a good copy from {item.url} at {item.cache_path()}."
            ) from None
        path = hub.fetch(item)
        converted = _load_path(path)
    known = item.name in hub.CATALOGUE
    inputs = item.preprocessing if known else _hub_preprocessing(path, converted.preprocessing)
    return converted._replace(preprocessing=inputs), path


def _hub_preprocessing(path: str, detected: Preprocessing | None) -> Preprocessing:
    """An ``hf-hub:`` repository's inputs: timm's ``config.json`` beside the weights, else the layout's record."""
    fallback = detected or TIMM
    try:
        with open(os.path.join(os.path.dirname(path), "config.json")) as f:
            config = json.load(f).get("pretrained_cfg", {})
        return Preprocessing(
            mean_rgb=tuple(255 * m for m in config["mean"]),
            stddev_rgb=tuple(255 * s for s in config["std"]),
            eval_crop="torchvision",
            interpolation=config.get("interpolation", fallback.interpolation),
            crop_fraction=float(config.get("crop_pct", fallback.crop_fraction)),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return fallback


def load(source: Any, *, strides: Sequence[int] | None = None) -> tuple[nn.Module, dict]:
    """``(model, variables)`` from any supported weights; see :func:`load_with_info`."""
    converted = load_with_info(source, strides=strides)
    return converted.model, converted.variables


def to_torch(
    model: nn.Module, variables: Mapping, layout: str | None = None, num_batches_tracked: int = 0
) -> collections.OrderedDict[str, Any]:
    """Writes Flax variables as a PyTorch state dict (torch tensors, PyTorch's key order).

    ``layout`` defaults to :func:`default_layout`; ``'timm_v1'``/``'timm_v2'`` write
    timm's keys (``timm.create_model(name).load_state_dict(...)``).
    Flax keeps no ``num_batches_tracked``; it is written as ``num_batches_tracked``
    (PyTorch reads it only when BatchNorm's momentum is None).
    """
    torch = _import_torch()
    if layout is None:
        layout = default_layout(model)
    state = collections.OrderedDict()
    for key, collection, path, perm in _entries(model, layout, variables["params"]):
        if collection is None:
            state[key] = torch.tensor(num_batches_tracked, dtype=torch.int64)
            continue
        value = np.asarray(_get(variables[collection], path), dtype=np.float32)
        state[key] = torch.from_numpy(np.array(_to_torch_array(value, perm), copy=True))
    return state


def list_layouts() -> str:
    return "\n".join(f"{name:12s} {layout.description}" for name, layout in layouts.LAYOUTS.items())
