"""Published MobileNet weights by name, found in (or downloaded to) each ecosystem's own cache.

The catalogue (:data:`CATALOGUE`) names every published V1/V2 file this project converts:

* ``timm/<model>.<tag>``: timm's weights on the Hugging Face Hub, fetched with
  ``huggingface_hub`` so its cache (``HF_HOME``, ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE`` and
  tokens behave as they do for timm; ``hf-hub:<owner>/<repo>`` names any other Hub repository
  holding a ``model.safetensors``, as timm's own ``hf-hub:`` prefix does;
* ``torchvision/mobilenet_v2`` (``IMAGENET1K_V1``) and ``torchvision/mobilenet_v2.imagenet1k_v2``:
  torchvision's files in torch hub's cache (``$TORCH_HOME/hub/checkpoints``), under their
  published names, whose hash prefix is checked as ``torch.hub`` does with ``check_hash``;
* ``keras/mobilenet_v2_<alpha>_<rows>`` and ``keras/mobilenet_<alpha>_<rows>`` (``_no_top``
  without the classifier): Keras applications' files in Keras's cache (``$KERAS_HOME/models``,
  by default ``~/.keras/models``), under Keras's file names.

Published top-1 (ImageNet-1k validation, at the listed resolution): timm's model cards and
release notes; torchvision's weight metadata (``acc@1``); for Keras, the TF-slim checkpoints
the Keras files were translated from (TF-slim's MobileNet READMEs, as quoted in the Keras
V2 docstring).

Offline is normal: a file already in its cache is used without touching the network.
``MOBILENET_JAX_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) forbids downloads altogether; a
missing file is then one sentence naming the file, where to put it and where it comes from.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request

from mobilenet_jax.data.preprocessing import KERAS, TIMM, TIMM_INCEPTION, TORCHVISION, Preprocessing
from mobilenet_jax.errors import UserError

HF_PREFIX = "hf-hub:"
SOURCES = ("timm", "torchvision", "keras")
OFFLINE_VARIABLES = ("MOBILENET_JAX_OFFLINE", "HF_HUB_OFFLINE")
HF_FILENAME = "model.safetensors"
TORCH_HASH = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's HASH_REGEX


class PretrainedError(UserError):
    """A published model that cannot be found, fetched or trusted; the message is one sentence."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One published file: where it comes from, where its ecosystem caches it, and what it scores."""

    name: str  # what users type: 'timm/mobilenetv2_100.ra_in1k'
    source: str  # 'timm' (Hugging Face Hub), 'torchvision' or 'keras'
    url: str  # where it is downloaded from
    filename: str  # its name in the cache
    architecture: str  # 'MobileNetV1' or 'MobileNetV2'
    width: float
    image_size: int  # the resolution the top-1 was measured at
    top1: float | None  # published ImageNet-1k top-1, percent
    preprocessing: Preprocessing
    repo_id: str = ""  # Hugging Face repository (timm and hf-hub: names)
    include_top: bool = True

    def cache_path(self) -> str:
        """Where the source's own tools keep this file (for a Hub file: its snapshot in the Hub cache)."""
        if self.source == "torchvision":
            return os.path.join(torch_hub_dir(), "checkpoints", self.filename)
        if self.source == "keras":
            return os.path.join(keras_home(), "models", self.filename)
        folder = "models--" + self.repo_id.replace("/", "--")
        return os.path.join(hf_hub_cache(), folder, "snapshots", "<revision>", self.filename)

    def expected_hash(self) -> str | None:
        """The sha256 prefix the file's name publishes (torchvision's ``name-<sha256 prefix>.pth``), if any."""
        if self.source != "torchvision":
            return None
        match = TORCH_HASH.search(self.filename)
        return match[1] if match else None


# ----------------------------------------------------------------------------- the catalogue


def _timm(model: str, tag: str, top1: float | None, inputs: Preprocessing) -> Entry:
    repo = f"timm/{model}.{tag}"
    architecture = "MobileNetV1" if model.startswith("mobilenetv1") else "MobileNetV2"
    width = int(re.search(r"_(\d+)", model)[1]) / 100
    url = f"https://huggingface.co/{repo}/resolve/main/{HF_FILENAME}"
    return Entry(repo, "timm", url, HF_FILENAME, architecture, width, 224, top1, inputs, repo_id=repo)


def _timm_entries() -> list[Entry]:
    # Top-1 at 224: timm's release notes (V1, Jul/Aug 2024) and model cards (V2 ra_in1k).
    # mobilenetv2_050.lamb_in1k has no published figure in timm's model card or notes.
    v1 = TIMM_INCEPTION  # mean = std = 0.5, bicubic, crop 0.875 (0.9 for 1.25)
    return [
        _timm("mobilenetv1_100", "ra4_e3600_r224_in1k", 75.382, v1),
        _timm("mobilenetv1_100h", "ra4_e3600_r224_in1k", 75.662, v1),
        _timm("mobilenetv1_125", "ra4_e3600_r224_in1k", 76.924, dataclasses.replace(v1, crop_fraction=0.9)),
        _timm("mobilenetv2_050", "lamb_in1k", None, TIMM),
        _timm("mobilenetv2_100", "ra_in1k", 72.95, TIMM),
        _timm("mobilenetv2_110d", "ra_in1k", 75.05, TIMM),
        _timm("mobilenetv2_120d", "ra_in1k", 77.28, TIMM),
        _timm("mobilenetv2_140", "ra_in1k", 76.51, TIMM),
    ]


def _torchvision_entries() -> list[Entry]:
    base = "https://download.pytorch.org/models/"
    v2_recipe = dataclasses.replace(TORCHVISION, crop_fraction=224 / 232)  # resize 232, crop 224
    return [
        Entry(
            "torchvision/mobilenet_v2",
            "torchvision",
            base + "mobilenet_v2-b0353104.pth",
            "mobilenet_v2-b0353104.pth",
            "MobileNetV2",
            1.0,
            224,
            71.878,
            TORCHVISION,
        ),
        Entry(
            "torchvision/mobilenet_v2.imagenet1k_v2",
            "torchvision",
            base + "mobilenet_v2-7ebf99e0.pth",
            "mobilenet_v2-7ebf99e0.pth",
            "MobileNetV2",
            1.0,
            224,
            72.154,
            v2_recipe,
        ),
    ]


# TF-slim's published top-1 of the checkpoints Keras translated, by (alpha, rows).
KERAS_V1_TOP1 = {
    (1.0, 224): 70.9, (1.0, 192): 70.0, (1.0, 160): 68.0, (1.0, 128): 65.2,
    (0.75, 224): 68.4, (0.75, 192): 67.2, (0.75, 160): 65.3, (0.75, 128): 62.1,
    (0.5, 224): 63.3, (0.5, 192): 61.7, (0.5, 160): 59.1, (0.5, 128): 56.3,
    (0.25, 224): 49.8, (0.25, 192): 47.7, (0.25, 160): 45.5, (0.25, 128): 41.5,
}  # fmt: skip
KERAS_V2_TOP1 = {
    (1.4, 224): 75.0, (1.3, 224): 74.4,
    (1.0, 224): 71.8, (1.0, 192): 70.7, (1.0, 160): 68.8, (1.0, 128): 65.3, (1.0, 96): 60.3,
    (0.75, 224): 69.8, (0.75, 192): 68.7, (0.75, 160): 66.4, (0.75, 128): 63.2, (0.75, 96): 58.8,
    (0.5, 224): 65.4, (0.5, 192): 63.9, (0.5, 160): 61.0, (0.5, 128): 57.7, (0.5, 96): 51.2,
    (0.35, 224): 60.3, (0.35, 192): 58.2, (0.35, 160): 55.7, (0.35, 128): 50.8, (0.35, 96): 45.5,
}  # fmt: skip
KERAS_V1_ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}  # keras.applications.mobilenet


def _keras_entries() -> list[Entry]:
    entries = []
    for top in (True, False):
        suffix = "" if top else "_no_top"
        for (alpha, rows), top1 in KERAS_V2_TOP1.items():
            filename = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}{suffix}.h5"
            url = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/" + filename
            name = f"keras/mobilenet_v2_{float(alpha)}_{rows}{suffix}"
            entries.append(Entry(name, "keras", url, filename, "MobileNetV2", alpha, rows, top1, KERAS, "", top))
        for (alpha, rows), top1 in KERAS_V1_TOP1.items():
            filename = f"mobilenet_{KERAS_V1_ALPHA_TEXT[alpha]}_{rows}_tf{suffix}.h5"
            url = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/" + filename
            name = f"keras/mobilenet_{float(alpha)}_{rows}{suffix}"
            entries.append(Entry(name, "keras", url, filename, "MobileNetV1", alpha, rows, top1, KERAS, "", top))
    return entries


CATALOGUE: dict[str, Entry] = {e.name: e for e in _timm_entries() + _torchvision_entries() + _keras_entries()}


def is_name(source: object) -> bool:
    """Whether ``source`` is a published model's name (a catalogue name or ``hf-hub:owner/repo``) rather than a path.

    A string naming an existing file or directory is always a path.
    """
    if not isinstance(source, str) or os.path.exists(source):
        return False
    return source in CATALOGUE or source.startswith(HF_PREFIX) or source.split("/", 1)[0] in SOURCES


def entry(name: str) -> Entry:
    """The catalogue entry of ``name`` (an ``hf-hub:`` name gets one made for it); one sentence for an unknown name."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    if name.startswith(HF_PREFIX):
        repo = name[len(HF_PREFIX) :]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise PretrainedError(f"{name!r} is not a Hub name; write hf-hub:<owner>/<repository>.")
        url = f"https://huggingface.co/{repo}/resolve/main/{HF_FILENAME}"
        return Entry(name, "timm", url, HF_FILENAME, "", 0.0, 224, None, TIMM, repo_id=repo)
    close = difflib.get_close_matches(name, CATALOGUE, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else "see mobilenet-jax summary --list_pretrained"
    raise PretrainedError(f"Unknown pretrained model {name!r} ({hint}).")


# ----------------------------------------------------------------------------- the caches


def offline() -> bool:
    """``MOBILENET_JAX_OFFLINE`` or ``HF_HUB_OFFLINE`` set to a true value: no downloads."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def torch_hub_dir() -> str:
    """torch.hub's ``get_dir()``: ``$TORCH_HOME/hub``, ``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch``."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return os.path.join(os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(cache, "torch"))), "hub")


def keras_home() -> str:
    """Keras's ``config.keras_home()``: ``$KERAS_HOME``, else ``~/.keras`` (``/tmp/.keras`` when home is read-only)."""
    if "KERAS_HOME" in os.environ:
        return os.path.expanduser(os.environ["KERAS_HOME"])
    base = os.path.expanduser("~")
    return os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")


def hf_hub_cache() -> str:
    """huggingface_hub's cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``.

    ``HF_HOME`` defaults to ``$XDG_CACHE_HOME/huggingface``.
    """
    if "HF_HUB_CACHE" in os.environ:
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return os.path.join(os.path.expanduser(os.environ.get("HF_HOME", os.path.join(cache, "huggingface"))), "hub")


def converted_cache() -> str:
    """Where converted copies live: ``$MOBILENET_JAX_CACHE``, else ``$XDG_CACHE_HOME/mobilenet_jax/pretrained``."""
    if "MOBILENET_JAX_CACHE" in os.environ:
        return os.path.expanduser(os.environ["MOBILENET_JAX_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return os.path.join(os.path.expanduser(cache), "mobilenet_jax", "pretrained")


def _missing(item: Entry, why: str) -> PretrainedError:
    if item.source == "timm":  # the Hub cache is blobs, snapshots and refs: its own client fills it
        return PretrainedError(
            f"{item.name} is not in its cache and {why}: download {HF_FILENAME} from {item.url} into the Hub cache "
            f"{hf_hub_cache()} where the Hub can be reached (hf download {item.repo_id} {HF_FILENAME}), then copy "
            "that cache here."
        )
    return PretrainedError(
        f"{item.name} is not in its cache and {why}: put {item.filename} from {item.url} at {item.cache_path()}."
    )


def fetch(item: Entry) -> str:
    """The local path of ``item``'s file: from its cache, else downloaded into it (unless offline)."""
    if item.source == "timm":
        return _fetch_hub(item)
    path = item.cache_path()
    if not os.path.isfile(path):
        if offline():
            raise _missing(item, "downloads are off (MOBILENET_JAX_OFFLINE or HF_HUB_OFFLINE)")
        download(item.url, path)
    check_hash(item, path)
    return path


def _fetch_hub(item: Entry) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    def get(force: bool = False) -> str:
        return hf_hub_download(
            item.repo_id, HF_FILENAME, cache_dir=hf_hub_cache(), local_files_only=offline(), force_download=force
        )

    try:
        path = get()
        actual, expected = hub_hashes(path)
        if expected and actual != expected:  # the Hub names a file's blob by its sha256
            moved = move_aside(path)
            if offline():
                raise PretrainedError(
                    f"The cached {item.repo_id}/{HF_FILENAME} has sha256 {actual[:12]}..., not the Hub's "
                    f"{expected[:12]}... (moved to {moved}); downloads are off (HF_HUB_OFFLINE): fetch it again online."
                )
            path = get(force=True)
        if item.name not in CATALOGUE:  # timm's config.json says how an hf-hub: repository's weights are fed
            try:
                hf_hub_download(item.repo_id, "config.json", cache_dir=hf_hub_cache(), local_files_only=offline())
            except Exception:  # optional: the layout's own record is used without it
                pass
        return path
    except LocalEntryNotFoundError:
        why = "downloads are off (HF_HUB_OFFLINE)" if offline() else "the Hub cannot be reached"
        raise _missing(item, why) from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise PretrainedError(f"The Hub has no {HF_FILENAME} in {item.repo_id} ({item.url}).") from None


def hub_hashes(path: str) -> tuple[str, str | None]:
    """``(sha256 of the file, the sha256 its Hub blob name publishes or None)``: LFS blobs are named by their sha256."""
    blob = os.path.basename(os.path.realpath(path))
    expected = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None
    return (sha256(path) if expected else ""), expected


def download(url: str, path: str) -> None:
    """Downloads ``url`` to ``path`` through a temporary file in the same folder (no half-written file remains)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310
            shutil.copyfileobj(response, out)
        os.replace(partial, path)
    except (urllib.error.URLError, OSError) as error:
        raise PretrainedError(
            f"Could not download {url} ({getattr(error, 'reason', error)}); put the file at {path} by hand."
        ) from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_hash(item: Entry, path: str) -> None:
    """torch.hub's ``check_hash``: the file's sha256 starts with the prefix in its published name."""
    expected = item.expected_hash()
    if expected is None:
        return
    actual = sha256(path)
    if not actual.startswith(expected):
        moved = move_aside(path)
        if not offline():
            try:
                download(item.url, path)
                if sha256(path).startswith(expected):
                    return
                move_aside(path)
            except PretrainedError:
                pass
        raise PretrainedError(
            f"The cached {item.filename} has sha256 {actual[:12]}..., not the published {expected}... "
            f"(moved to {moved}); put a good copy from {item.url} at {path}."
        )


def move_aside(path: str) -> str:
    """Renames a bad cached file to ``<path>.corrupt-<time>`` (kept for inspection) and returns the new path."""
    real = os.path.realpath(path)  # a Hub snapshot is a link to a blob: move the blob, drop the link
    target = f"{real}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(real, target)
    if os.path.islink(path):
        os.remove(path)
    return target
