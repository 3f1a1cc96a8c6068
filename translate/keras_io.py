"""Reading built Keras models and building them.

Keras is imported lazily (and with the TensorFlow backend unless the user chose
another) so that ``import translate`` stays cheap. Weights files live in
``translate.weights_files``, randomization in ``translate.random_weights``, the
backend choice in ``models.backend``; their names are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from typing import Any, Iterator

import numpy as np

from models.backend import ensure_backend, quiet_native_stderr  # noqa: F401


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """The weights of one Keras layer, as read from the model.

  Attributes:
    name: the layer name in the model.
    cls: the layer class name (``"Conv2D"``); selects the translation rule.
    weights: weight name (``"kernel"``, ``"moving_mean"``) to array, in the
      layer's own order.
  """

  name: str
  cls: str
  weights: dict[str, np.ndarray]


def iter_layers(model: Any) -> Iterator[Any]:
  """Yields the leaf layers of ``model``, descending into nested models."""
  for layer in model.layers:
    if hasattr(layer, "layers") and layer.layers:
      yield from iter_layers(layer)
    else:
      yield layer


def weight_name(variable: Any) -> str:
  """``"conv1/kernel:0"`` or ``"kernel"`` -> ``"kernel"`` (Keras 3, tf-keras)."""
  return variable.name.split("/")[-1].split(":")[0]


def read_weights(model: Any) -> list[KerasLayer]:
  """Every weight of every layer that has weights, with its layer's name and
  class. Raises if a layer holds two weights of the same name."""
  out = []
  for layer in iter_layers(model):
    weights: dict[str, np.ndarray] = {}
    for v in layer.weights:
      key = weight_name(v)
      if key in weights:
        raise ValueError(f"Keras layer {layer.name!r} has two weights named "
                         f"{key!r}; cannot translate it unambiguously")
      weights[key] = np.asarray(v.numpy())
    if weights:
      out.append(KerasLayer(layer.name, type(layer).__name__, weights))
  return out


# Keras names an unnamed layer snake_case(class) + "_<session counter>".
def _snake_case(name: str) -> str:
  name = re.sub(r"\W+", "", name)
  name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
  return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def canonical_names(layers: list[KerasLayer]) -> dict[str, str]:
  """See ``canonical_names_by_base``; bases come from the layer classes."""
  return canonical_names_by_base([(l.name, _snake_case(l.cls))
                                  for l in layers])


def canonical_names_by_base(named: list[tuple[str, str]]) -> dict[str, str]:
  """Renames auto-named layers so the names do not depend on the session.

  Keras names an unnamed ``Conv2D`` ``conv2d``, ``conv2d_1``, … from a counter
  shared by the whole process, so building another model first shifts every
  number. Auto-named layers (``<snake_case class>[_N]``) are renumbered by the
  rank of ``N`` among the layers of that class in the model: the first becomes
  ``conv2d``, the next ``conv2d_1``, exactly the names of a fresh session.
  Explicitly named layers keep their names.

  Args:
    named: ``(layer name, snake_case class name)`` pairs.

  Returns:
    Original layer name -> canonical name.
  """
  groups: dict[str, list[tuple[int, str]]] = {}
  mapping = {}
  for name, base in named:
    m = re.fullmatch(re.escape(base) + r"(?:_(\d+))?", name)
    if m:
      groups.setdefault(base, []).append((int(m.group(1) or 0), name))
    else:
      mapping[name] = name
  for base, members in groups.items():
    for rank, (_, name) in enumerate(sorted(members)):
      mapping[name] = base if rank == 0 else f"{base}_{rank}"
  return mapping


class WeightsDownloadError(RuntimeError):
  """Keras could not download the ImageNet weights (no network)."""


_GET_FILE_HOMES = ("keras.src.utils.file_utils", "tf_keras.src.utils.data_utils")


@contextlib.contextmanager
def record_downloads():
  """Records the local paths of the files Keras' ``get_file`` returns while
  building a model (the cached ImageNet weights), to hash them."""
  paths: list[str] = []
  patched = []
  for home in _GET_FILE_HOMES:
    mod = sys.modules.get(home)
    if mod is None:
      continue
    original = mod.get_file

    def wrapper(*args, _original=original, **kwargs):
      path = _original(*args, **kwargs)
      paths.append(path)
      return path

    mod.get_file = wrapper
    patched.append((mod, original))
  try:
    yield paths
  finally:
    for mod, original in patched:
      mod.get_file = original


def build(spec: Any, weights: str | None, *, include_top: bool = True,
          classes: int = 1000, pooling: str | None = None,
          classifier_activation: Any = "softmax",
          input_shape: Any = None, **options: Any) -> Any:
  """Builds the Keras model of ``spec``.

  Args:
    spec: a ``models.ModelSpec``.
    weights: ``"imagenet"`` (downloaded and cached by Keras), ``None``
      (Keras' random initialization) or a local file: ``.weights.h5`` or
      legacy or whole-model ``.h5`` or ``.keras`` (its weights loaded
      strictly by layer name into the registry architecture, see
      ``load_weights_file``; no code from the file is loaded). Options a
      whole-model file fixes come from ``weights_files.merge_file_options``.
  """
  ensure_backend()
  kwargs = dict(include_top=include_top, pooling=pooling, classes=classes,
                classifier_activation=classifier_activation,
                input_shape=None if input_shape is None else tuple(input_shape),
                **options)
  ctor = spec.keras_constructor()
  if weights is None:
    return ctor(weights=None, **kwargs)
  if weights == "imagenet":
    try:
      return ctor(weights="imagenet", **kwargs)
    except Exception as e:  # Keras raises a bare Exception on fetch failure
      if "fetch failure" in str(e) or isinstance(e, OSError):
        raise WeightsDownloadError(
            f"could not download the ImageNet weights of {spec.keras_name}: "
            "this machine seems to be offline; use --weights random (offline "
            "check) or --weights PATH (a local Keras weights file)") from e
      raise
  model = ctor(weights=None, **kwargs)
  load_weights_file(model, os.fspath(weights))
  return model


def keras_version(model: Any) -> str:
  """``keras 3.15.1`` or ``tf_keras 2.21.0``: the package that built model."""
  package = type(model).__module__.split(".")[0]
  return f"{package} {sys.modules[package].__version__}"


# Re-exported for callers of the former all-in-one module (imported last:
# both modules use the readers above).
# pylint: disable=g-import-not-at-top,wrong-import-position
from translate.weights_files import (WeightsFileError,  # noqa: E402,F401
                                     load_weights_file, read_weights_file)
from translate.random_weights import randomize  # noqa: E402,F401
