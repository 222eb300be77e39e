"""Keras applications weights -> Flax: ``keras.applications.MobileNet``, ``MobileNetV2`` and ``MobileNetV3*``.

These are the papers' own weights (the TF-slim checkpoints, as Keras ships them).
Sources, read without building a Keras model:

* a Keras model object (Keras 3 or ``tf.keras``), e.g.
  ``keras.applications.MobileNetV2(alpha=0.35, weights="imagenet")``;
* a legacy ``.h5`` file (the ``mobilenet_1_0_224_tf.h5`` ... files Keras downloads,
  or ``model.save("x.h5")``): layers by name;
* a Keras 3 ``.weights.h5`` file (``model.save_weights``): Keras 3 stores layers by
  class (``conv2d_3``, ``batch_normalization_7``, ...) in model order, so the layers
  are matched by kind and position.

The networks were trained with TensorFlow's 'SAME' padding, which the converted
models reproduce (``padding='tf'`` for V2 and V3; ``'keras_v1'`` for V1, whose stride-2
depthwise layers pad one pixel at the bottom and right whatever the input size), with
BatchNorm epsilon 1e-3. Their inputs are scaled to [-1, 1] (``x / 127.5 - 1``),
recorded as :data:`PREPROCESSING` beside the converted model; MobileNetV3 does that
scaling inside the Keras model (a ``Rescaling`` layer, fed RGB 0..255), and the
converted model leaves it to the same ``preprocessing.json``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from absl import logging
from flax import linen as nn

from mobilenet_jax.data.preprocessing import KERAS, Preprocessing
from mobilenet_jax.errors import UnreadableFileError
from mobilenet_jax.models import MobileNetV1, MobileNetV2, MobileNetV3, v2_architecture, v3_network
from mobilenet_jax.weights import layouts

# keras.applications.mobilenet(_v2).preprocess_input: x / 127.5 - 1 on RGB 0..255.
# The evaluation crop is TF-slim's (central 87.5%, bilinear), the papers' own.
PREPROCESSING = KERAS
KERAS_LAYOUTS = {name: layout.description for name, layout in layouts.of("keras").items()}
KINDS = ("conv2d", "depthwise_conv2d", "batch_normalization", "dense")


# The Keras weights do not fit a MobileNet (the converters' one mismatch error).
KerasMismatchError = layouts.WeightsMismatchError


Layer = tuple  # (name or None, kind, [arrays])


# ----------------------------------------------------------------------------- reading


def _kind_of_class(class_name: str) -> str | None:
    snake = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", class_name).lower().replace("2_d", "2d")
    return snake if snake in KINDS else None


def _kind_of_weights(names: list[str], arrays: list[np.ndarray]) -> str | None:
    leaf = [n.split("/")[-1].split(":")[0] for n in names]
    if "depthwise_kernel" in leaf:
        return "depthwise_conv2d"
    if "gamma" in leaf or "moving_mean" in leaf:
        return "batch_normalization"
    if "kernel" in leaf:
        return "conv2d" if arrays[leaf.index("kernel")].ndim == 4 else "dense"
    return None


def _from_model(model: Any) -> list[Layer]:
    """Layers with weights, in model order; a nested model (a transfer-learning backbone) is read through."""
    layers = []
    for layer in model.layers:
        if hasattr(layer, "layers") and hasattr(layer, "get_weights"):
            layers += _from_model(layer)
            continue
        weights = [np.asarray(w) for w in layer.get_weights()]
        if weights:
            layers.append((layer.name, _kind_of_class(type(layer).__name__), weights))
    return layers


def _from_legacy_h5(group) -> list[Layer]:
    """Keras 2 / tf.keras weight files: ``layer_names`` and per-layer ``weight_names`` attributes.

    A nested model is one entry whose weight names belong to several layers (``Conv1/kernel``,
    ``bn_Conv1/gamma``, ...): it is split into those layers.
    """
    layers = []
    for raw in group.attrs["layer_names"]:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group[name].attrs.get("weight_names", [])]
        owners = list(dict.fromkeys(n.rsplit("/", 1)[0] if "/" in n else name for n in names))
        for owner in owners if len(owners) > 1 else [name]:
            mine = [n for n in names if len(owners) == 1 or (n.rsplit("/", 1)[0] if "/" in n else name) == owner]
            if mine:
                arrays = [np.asarray(group[name][n]) for n in mine]
                layers.append((owner.split("/")[-1], _kind_of_weights(mine, arrays), arrays))
    return layers


def _from_keras3_h5(group) -> list[Layer]:
    """Keras 3 ``.weights.h5``: ``layers/<class>_<n>/vars/<i>``, numbered in model order.

    A nested model (``layers/functional/layers/...``) is read first, then the outer layers.
    """
    found, nested = [], []
    for key in group["layers"]:
        entry = group["layers"][key]
        if "layers" in entry and len(entry["layers"]):
            nested += _from_keras3_h5(entry)
            continue
        match = re.match(r"(.+?)(?:_(\d+))?$", key)
        variables = entry.get("vars")
        if variables is None or not len(variables):
            continue
        arrays = [np.asarray(variables[str(i)]) for i in range(len(variables))]
        found.append((int(match[2] or 0), match[1], arrays))
    order = collections.defaultdict(list)
    for _, kind, arrays in sorted(found, key=lambda f: (f[1], f[0])):
        order[kind].append(arrays)
    return nested + [
        (None, kind if kind in KINDS else None, arrays) for kind, items in order.items() for arrays in items
    ]


def _outer_from_config(config: dict) -> list[tuple[str, dict]]:
    """``[(class name, layer config), ...]`` of a saved model's top level (Keras's model config JSON)."""
    layers = config.get("config", {}).get("layers", []) if isinstance(config, dict) else []
    return [(entry.get("class_name", ""), entry.get("config", {})) for entry in layers if isinstance(entry, dict)]


def read_source(source: Any) -> tuple[list[Layer], list[tuple[str, dict]] | None]:
    """``(layers, outer)``: the weighted layers (:func:`read_layers`) and, where the source says
    (a live model, a ``.keras`` file, ``model.save('x.h5')``), the top level's ``(class, config)`` list."""
    if hasattr(source, "layers") and hasattr(source, "get_weights"):
        return _from_model(source), [(type(layer).__name__, layer.get_config()) for layer in source.layers]
    import h5py

    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No Keras weights file at {path!r}.")
    if path.endswith(".keras"):
        return _from_keras_zip(path)
    try:
        with h5py.File(path, "r") as f:
            outer = _outer_from_config(json.loads(f.attrs["model_config"])) if "model_config" in f.attrs else None
            if "layer_names" in f.attrs:
                return _from_legacy_h5(f), outer
            if "model_weights" in f and "layer_names" in f["model_weights"].attrs:  # model.save("x.h5")
                return _from_legacy_h5(f["model_weights"]), outer
            if "layers" in f:
                return _from_keras3_h5(f), outer
    except (OSError, json.JSONDecodeError) as error:
        raise UnreadableFileError(f"Could not read {path!r} as an HDF5 file ({str(error).splitlines()[0]}).") from None
    raise ValueError(f"{path!r} is an HDF5 file but not Keras weights (no layer_names and no layers/ group).")


def _from_keras_zip(path: str) -> tuple[list[Layer], list[tuple[str, dict]]]:
    """Keras 3's ``model.save('x.keras')``: a zip of ``config.json`` and ``model.weights.h5``."""
    import io
    import zipfile

    import h5py

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            weights = io.BytesIO(archive.read("model.weights.h5"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as error:
        raise ValueError(
            f"Could not read {path!r} as a .keras file (a zip of config.json and model.weights.h5): {error}."
        ) from None
    with h5py.File(weights, "r") as f:
        return _from_keras3_h5(f), _outer_from_config(config)


def read_layers(source: Any) -> list[Layer]:
    """``[(layer name or None, kind, [arrays in Keras order]), ...]`` from any supported source."""
    return read_source(source)[0]


# ----------------------------------------------------------------------------- layouts


# The reference networks whose tables the Keras plans walk: every keras.applications MobileNet has
# their depth (13 separable blocks; 17 inverted residuals and a last conv; MobileNetV3's 15 or 11 blocks,
# with or without squeeze-excitation and the layer after the pooling) whatever its alpha.
_V3_REFERENCES = tuple(
    MobileNetV3(variant=variant, minimal=minimal, rounding="keras", network_table=None if fc else
                v3_network(variant, 1.0, minimal, "keras")._replace(head_hidden=0))  # include_top=False
    for variant in ("large", "small") for minimal in (False, True) for fc in (True, False)
)  # fmt: skip
_REFERENCES = {"keras_v1": (MobileNetV1(activation="relu6"),), "keras_v2": (MobileNetV2(),), "keras_v3": _V3_REFERENCES}
_KERAS_KINDS = {
    "conv": "conv2d", "depthwise": "depthwise_conv2d", "norm": "batch_normalization", "conv_bias": "conv2d",
    "dense_as_conv": "conv2d",
}  # fmt: skip


def _plan(layout: str, top: bool = True, reference: nn.Module | None = None) -> list[tuple[str, str, str]]:
    """``(keras name, kind, flax module)`` of the layout's keras.applications model, in model order."""
    model = (reference or _REFERENCES[layout][0]).clone(num_classes=1000 if top else None)
    top_kind = "dense" if layout == "keras_v2" else "conv2d"  # MobileNet's conv_preds, V3's logits: 1x1 convs
    return [(name, _KERAS_KINDS.get(kind, top_kind), flax) for flax, name, kind in layouts.get(layout).names(model)]


def _reference(layout: str, layers: list[Layer]) -> nn.Module:
    """The layout's reference network whose plan leaves the fewest layers missing, then the fewest left over."""
    candidates = _REFERENCES[layout]
    if len(candidates) == 1:
        return candidates[0]
    fit = {i: _assign(layers, _plan(layout, False, model))[1:] for i, model in enumerate(candidates)}
    return candidates[min(fit, key=lambda i: (len(fit[i][0]), len(fit[i][1])))]


def _assign(layers: list[Layer], plan: list[tuple[str, str, str]]) -> tuple[dict, list[str], list[Layer]]:
    """``({flax module: arrays}, missing, leftover layers)``: by name when the layers have names, else by kind
    and order."""
    named = all(name is not None for name, _, _ in layers)
    found, missing = {}, []
    if named:
        by_name = {name: arrays for name, _, arrays in layers}
        for keras, _, ours in plan:
            if keras in by_name:
                found[ours] = by_name[keras]
            else:
                missing.append(keras)
        planned = {keras for keras, _, _ in plan}
        return found, missing, [layer for layer in layers if layer[0] not in planned]
    queues = collections.defaultdict(collections.deque)
    for _, kind, arrays in layers:
        queues[kind].append(arrays)
    for keras, kind, ours in plan:
        if queues[kind]:
            found[ours] = queues[kind].popleft()
        else:
            missing.append(f"{keras} ({kind})")
    return (
        found,
        missing,
        [(f"{kind} #{i}", kind, arrays) for kind, queue in queues.items() for i, arrays in enumerate(queue)],
    )


def detect_layout(layers: list[Layer]) -> str | None:
    names = {name for name, _, _ in layers}
    layout = layouts.detect(names, "keras")
    if layout is None and None in names:  # Keras 3 weights file: count the depthwise layers
        depthwise = sum(kind == "depthwise_conv2d" for _, kind, _ in layers)
        return {13: "keras_v1", 17: "keras_v2", 15: "keras_v3", 11: "keras_v3"}.get(depthwise)
    return layout


def _closest(layers: list[Layer]) -> str:
    """The layout sharing the most layer names; between equals (unnamed layers), the nearer depthwise count."""
    names = {name for name, _, _ in layers}
    depthwise = sum(kind == "depthwise_conv2d" for _, kind, _ in layers)
    scores = {
        layout: (len(names & {k for k, _, _ in plan()}), -abs(depthwise - count))
        for layout, plan, count in (
            ("keras_v1", lambda: _plan("keras_v1"), 13),
            ("keras_v2", lambda: _plan("keras_v2"), 17),
            ("keras_v3", lambda: _plan("keras_v3"), 15),
        )
    }
    return max(scores, key=scores.get)


# Poolings that leave a Dense on other features than the average-pooled backbone (Flatten: the whole map).
_POOLING = {"GlobalMaxPooling2D", "MaxPooling2D", "AveragePooling2D", "Flatten"}


def _backbone_channels(found: dict) -> int:
    last = found.get("head_fc") or found.get("last_conv") or found["block_12/conv_pw"]
    return int(last[0].shape[-1])


def _head(leftover: list[Layer], found: dict, outer: list[tuple[str, dict]] | None) -> tuple[Layer | None, str]:
    """``(classifier layer or None, note)`` from the layers left after the backbone.

    One Dense (or Keras MobileNet's 1x1 ``conv_preds``) reading the pooled backbone
    features becomes the classifier. Anything else (two Dense layers, max pooling or a
    flattened feature map before the Dense) is left out, and the note names it.
    """
    if not leftover:
        return None, ""
    channels = _backbone_channels(found)
    names = ", ".join(str(name) for name, _, _ in leftover)
    outer_classes = [cls for cls, _ in outer or []]
    pooling = [cls for cls in outer_classes if cls in _POOLING]
    if "GlobalAveragePooling2D" in outer_classes and pooling == ["Flatten"]:
        pooling = []  # Flatten after global pooling is a no-op
    ((name, kind, arrays),) = leftover if len(leftover) == 1 else ((None, None, None),)
    fits = kind == "dense" and arrays[0].ndim == 2 and arrays[0].shape[0] == channels and len(arrays) == 2
    fits |= kind == "conv2d" and len(arrays) == 2 and arrays[0].shape[:3] == (1, 1, channels)  # conv_preds
    if fits and not pooling:
        softmax = any(
            config.get("activation") == "softmax" or (cls == "Softmax")
            for cls, config in outer or []
            if cls in ("Dense", "Activation", "Softmax", "Conv2D")
        )
        after = (
            "; Keras applied a softmax after it, the converted model returns the logits before it" if softmax else ""
        )
        if outer is None:
            after += " (a .weights.h5 file records no layers without weights: average pooling assumed)"
        return leftover[0], f"Keras layer {name!r} became the classifier ({arrays[0].shape[-1]} classes){after}."
    why = f"after {', '.join(pooling)}" if pooling else "not a single Dense on the pooled features"
    return None, (
        f"Converted the MobileNet backbone without a classifier: the head ({names}) is {why} and was left out; "
        "add one with mobilenet_jax.reset_classifier."
    )


def _outer_preprocessing(outer: list[tuple[str, dict]] | None) -> Preprocessing:
    """Keras's [-1, 1] inputs, or what a Rescaling layer in front of the backbone makes of RGB 0..255."""
    for cls, config in outer or []:
        scale, offset = config.get("scale"), config.get("offset", 0.0)
        if cls == "Rescaling" and isinstance(scale, (int, float)) and isinstance(offset, (int, float)) and scale:
            return dataclasses.replace(KERAS, mean_rgb=(-offset / scale,) * 3, stddev_rgb=(1.0 / scale,) * 3)
    return KERAS


def _mismatch(layout: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    subject = f"The Keras weights do not fit the {layout!r} layout ({KERAS_LAYOUTS[layout]})"
    return layouts.mismatch_message(subject, missing, unexpected, misshaped)


def _v1_model(found: dict, epsilon: float) -> MobileNetV1:
    stem = found["stem_conv"][0].shape[-1]
    channels = tuple(found[f"block_{i}/conv_pw"][0].shape[-1] for i in range(13))
    strides = tuple(block.stride for block in MobileNetV1().network().blocks)
    top = found.get("classifier")
    common = dict(num_classes=None if top is None else top[0].shape[-1], activation="relu6", padding="keras_v1")
    return MobileNetV1(bn_epsilon=epsilon, **common, **layouts.v1_fields(stem, channels, strides))


def _v2_model(found: dict, epsilon: float) -> MobileNetV2:
    stem = found["stem_conv"][0].shape[-1]
    outputs = [found[f"block_{i}/conv_pwl"][0].shape[-1] for i in range(17)]
    last = found["last_conv"][0].shape[-1]
    top = found.get("classifier")

    def fits(width: float) -> bool:
        stem_c, blocks, last_c = v2_architecture(width, "keras")
        return stem_c == stem and last_c == last and [b.out for b in blocks] == outputs

    width = layouts.search_width(fits, (*layouts.ROUND_WIDTHS, *layouts.candidate_widths())) or 1.0
    return MobileNetV2(
        num_classes=None if top is None else top[0].shape[-1],
        width=width,
        rounding="keras",
        padding="tf",
        dropout_rate=0.0,
        bn_epsilon=epsilon,
    )


def _v3_model(found: dict, epsilon: float, reference: MobileNetV3) -> MobileNetV3:
    network = reference.network()
    observed = [found[f"block_{i}/conv_pwl"][0].shape[-1] for i in range(len(network.blocks))]
    observed += [found["last_conv"][0].shape[-1], found["head_fc"][0].shape[-1] if "head_fc" in found else 0]
    top = found.get("classifier")

    def table(width: float):
        built = v3_network(reference.variant, width, reference.minimal, "keras")
        return built if network.head_hidden else built._replace(head_hidden=0)

    def fits(width: float) -> bool:
        built = table(width)
        return [b.out for b in built.blocks] + [built.head_channels, built.head_hidden] == observed

    width = layouts.search_width(fits, (*layouts.ROUND_WIDTHS, *layouts.candidate_widths())) or 1.0
    return MobileNetV3(
        num_classes=None if top is None else top[0].shape[-1], variant=reference.variant, width=width,
        minimal=reference.minimal, rounding="keras", padding="tf", bn_epsilon=epsilon,
        network_table=None if network.head_hidden else table(width),
    )  # fmt: skip


def _epsilon(source: Any) -> float:
    """BatchNorm epsilon of a live model (all keras.applications MobileNets use 1e-3)."""
    for layer in getattr(source, "layers", []):
        if hasattr(layer, "epsilon"):
            return float(layer.epsilon)
    return 1e-3


def _to_flax(kind: str, arrays: list[np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``{'params': {...}, 'batch_stats': {...}}`` leaves of one layer."""
    arrays = [np.asarray(a, np.float32) for a in arrays]
    if kind == "batch_normalization":
        gamma, beta, mean, var = arrays
        return {"params": {"scale": gamma, "bias": beta}, "batch_stats": {"mean": mean, "var": var}}
    if kind == "depthwise_conv2d":  # Keras (k, k, C, 1) -> Flax (k, k, 1, C)
        return {"params": {"kernel": arrays[0].transpose(0, 1, 3, 2)}, "batch_stats": {}}
    params = {"kernel": arrays[0]}
    if len(arrays) == 2:
        params["bias"] = arrays[1]
    return {"params": params, "batch_stats": {}}


class KerasConversion(NamedTuple):
    """What :func:`convert_keras` returns: the model, its variables, the layout, its inputs and a note."""

    model: nn.Module
    variables: dict
    layout: str
    preprocessing: Preprocessing
    note: str  # what became of a transfer-learning head ('' for a plain keras.applications model)


def from_keras(source: Any) -> tuple[nn.Module, dict, str]:
    """``(model, variables, layout)`` from a Keras model object or weights file; see :func:`convert_keras`."""
    converted = convert_keras(source)
    return converted.model, converted.variables, converted.layout


def convert_keras(source: Any) -> KerasConversion:
    """A Keras MobileNet, or a transfer-learning model built on one, converted (see the module docstring).

    Raises KerasMismatchError listing the missing, unexpected and mis-shaped layers
    (against the closest known layout) when the weights are not a Keras MobileNet.
    """
    layers, outer = read_source(source)
    layout = detect_layout(layers)
    if layout is None:
        closest = _closest(layers)
        plan = _plan(closest)
        _, missing, leftover = _assign(layers, plan)
        unexpected = [str(name) for name, _, _ in leftover]
        raise KerasMismatchError(
            "No Keras MobileNet layout fits (closest: " + closest + "). " + _mismatch(closest, missing, unexpected, [])
        )
    reference = _reference(layout, layers)
    plan = _plan(layout, top=False, reference=reference)
    found, missing, leftover = _assign(layers, plan)
    if missing:
        raise KerasMismatchError(_mismatch(layout, missing, [str(name) for name, _, _ in leftover], []))
    classifier, note = _head(leftover, found, outer)
    if classifier is not None:
        found["classifier"] = classifier[2]
        plan.append((classifier[0], classifier[1], "classifier"))
    if note and classifier is None:
        logging.warning("%s", note)
    epsilon = _epsilon(source)
    if layout == "keras_v3":
        model = _v3_model(found, epsilon, reference)
    else:
        model = _v1_model(found, epsilon) if layout == "keras_v1" else _v2_model(found, epsilon)
    variables = _variables(model, found, {ours: kind for _, kind, ours in plan}, layout)
    return KerasConversion(model, variables, layout, _outer_preprocessing(outer), note)


def _variables(model: nn.Module, found: dict, kinds: dict, layout: str) -> dict:
    """The Flax variables of ``model`` from the assigned Keras arrays (KerasMismatchError on a wrong shape)."""
    import jax

    abstract = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    )
    variables: dict = {"params": {}, "batch_stats": {}}
    misshaped = []
    for module, arrays in found.items():
        for collection, leaves in _to_flax(kinds[module], arrays).items():
            for leaf, value in leaves.items():
                expected = _lookup(abstract[collection], module.split("/") + [leaf])
                if expected is not None and expected.ndim == 2 and value.ndim == 4 and value.shape[:2] == (1, 1):
                    value = value[0, 0]  # a 1x1 conv on pooled features: V1's conv_preds, V3's conv_2 and logits
                if expected is None or tuple(expected.shape) != value.shape:
                    misshaped.append(f"{module}/{leaf} {value.shape} != {None if expected is None else expected.shape}")
                    continue
                layouts.set_path(variables[collection], (*module.split("/"), leaf), jax.numpy.asarray(value))
    if misshaped:
        raise KerasMismatchError(_mismatch(layout, [], [], misshaped))
    return variables


def _lookup(tree: Mapping, path: list[str]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def is_keras_source(source: Any) -> bool:
    """A Keras model object, an ``.h5`` / ``.weights.h5`` file or a ``.keras`` file."""
    if hasattr(source, "layers") and hasattr(source, "get_weights"):
        return True
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith((".h5", ".keras"))
