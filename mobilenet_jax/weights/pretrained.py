"""``pretrained(name)``: published MobileNet weights by name, converted once and cached.

::

    import mobilenet_jax

    model, variables = mobilenet_jax.pretrained("timm/mobilenetv2_100.ra_in1k")
    loaded = mobilenet_jax.pretrained("torchvision/mobilenet_v2")
    loaded.preprocessing  # how the weights expect their inputs (normalisation, resize, crop)

The names (:func:`list_pretrained`, :mod:`mobilenet_jax.weights.hub`) work wherever a model
directory does: ``--config.init_from=NAME``, ``--config.teacher=NAME`` and
``mobilenet-jax convert NAME OUT_DIR``. The source file comes from its ecosystem's cache
(downloaded into it unless offline); the converted copy is a model directory under
:func:`~mobilenet_jax.weights.hub.converted_cache`, reused while the source file is unchanged.
A cached source file that cannot be read is moved aside and downloaded again when possible.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from mobilenet_jax.data.preprocessing import Preprocessing
from mobilenet_jax.weights import checkpoint, convert, hub

SOURCE_JSON = "source.json"


class Pretrained(tuple):
    """``(model, variables)``, as :func:`mobilenet_jax.weights.convert.load` returns, plus what was published.

    Attributes: ``model``, ``variables``, ``preprocessing`` (the inputs the weights expect),
    ``entry`` (the catalogue record: source, URL, published top-1) and ``directory`` (the
    converted copy, a model directory).
    """

    def __new__(cls, model: Any, variables: dict, preprocessing: Preprocessing, entry: hub.Entry, directory: str):
        self = super().__new__(cls, (model, variables))
        self.model, self.variables, self.preprocessing, self.entry, self.directory = (
            model,
            variables,
            preprocessing,
            entry,
            directory,
        )
        return self


def pretrained(name: str) -> Pretrained:
    """The published model ``name`` as ``(model, variables)``; see :func:`list_pretrained` for the names."""
    directory = model_dir(name)
    model, variables = checkpoint.load_model(directory)
    return Pretrained(model, variables, checkpoint.read_preprocessing(directory), hub.entry(name), directory)


def model_dir(name: str) -> str:
    """The converted copy of ``name`` (a model directory), made if missing or older than the source file."""
    item = hub.entry(name)
    path = hub.fetch(item)
    directory = os.path.join(hub.converted_cache(), name.replace(":", "_").replace("/", "__"))
    if _read_record(directory) == _source_record(path):
        return directory
    converted, path = convert.load_published(item, path)  # the file may have been fetched again
    record = _source_record(path)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".converting-")
    try:
        checkpoint.save_model(staging, converted.model, converted.variables, converted.preprocessing)
        with open(os.path.join(staging, SOURCE_JSON), "w") as f:
            json.dump(record, f, indent=2)
        if os.path.isdir(directory):
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.rename(staging, directory)
        except OSError:  # another process converted it at the same time: theirs is as good
            if _read_record(directory) != record:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _source_record(path: str) -> dict[str, Any]:
    real = os.path.realpath(path)
    stat = os.stat(real)
    return {"file": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_record(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, SOURCE_JSON)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def local_source(source: str) -> str:
    """A model directory for ``source``: the converted copy when it is a published name, else ``source`` itself.

    What ``--config.init_from`` and ``--config.teacher`` read.
    """
    return model_dir(source) if hub.is_name(source) else source


def list_pretrained() -> str:
    """The catalogue as a table: name, architecture, width, resolution, published top-1, and the source file."""
    rows = [f"{'name':42s} {'architecture':12s} {'width':>5s} {'size':>4s} {'top-1':>6s}  file"]
    for item in hub.CATALOGUE.values():
        top1 = f"{item.top1:6.2f}" if item.top1 is not None else "     -"
        rows.append(
            f"{item.name:42s} {item.architecture:12s} {item.width:5.2f} {item.image_size:4d} {top1}  {item.url}"
        )
    return "\n".join(rows)
