"""Building Keras models: the registry's Keras constructors, with ImageNet,
random or a local file's weights.

Keras is imported lazily (and with the TensorFlow backend unless the user
chose another, ``models.backend``) so that ``import translate`` stays cheap.
The options a whole-model weights file fixes are merged into the caller's in
one place, ``resolve_options``; ``build_keras`` is that plus ``build_model``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import numpy as np

import models
from models.backend import ensure_backend
from translate import weights_files
from translate.parity import random_images
from translate.random_weights import randomize


def is_file(weights: Any) -> bool:
  """Whether ``weights`` names a local weights file (not ``"imagenet"``,
  ``"random"`` or None)."""
  return isinstance(weights, (str, os.PathLike)) and str(weights) not in (
      "imagenet", "random")


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
      ``weights_files.load_weights_file``; no code from the file is loaded).
      Options a whole-model file fixes come from ``resolve_options``.
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
  weights_files.load_weights_file(model, os.fspath(weights),
                                  spec.name_aliases)
  return model


def keras_version(model: Any) -> str:
  """``keras 3.15.1`` or ``tf_keras 2.21.0``: the package that built model."""
  package = type(model).__module__.split(".")[0]
  return f"{package} {sys.modules[package].__version__}"


def resolve_options(name: str, weights: Any,
                    create_kwargs: dict[str, Any]) -> dict[str, Any]:
  """The ``create`` options for model ``name`` with ``weights``: the given
  ones, completed with those a whole-model file fixes (a contradiction is a
  ``WeightsFileError``), with ``input_shape`` resolved to a concrete size
  (the native one by default). The one place options are merged; the result
  goes to ``build_model`` and ``models.create`` unchanged."""
  if is_file(weights):  # a whole-model file fixes some options itself
    create_kwargs = weights_files.merge_file_options(weights, create_kwargs)
  shape = models.resolve_input_shape(name, create_kwargs.get("input_shape"))
  return {**create_kwargs, "input_shape": shape}


def build_model(name: str, weights: str | None, *, seed: int = 0,
                **resolved: Any) -> Any:
  """Builds the Keras model ``name`` from options ``resolve_options``
  returned; see ``build_keras`` for ``weights``."""
  spec = models.get_spec(name)
  if weights == "random":
    model = build(spec, None, **resolved)
    images = random_images(resolved["input_shape"], batch=4, seed=seed + 1)
    calibration = spec.keras_preprocess_input()(images)
    randomize(model, seed, calibration=np.asarray(calibration))
    return model
  return build(spec, weights, **resolved)


def build_keras(name: str, weights: str | None = "imagenet", *, seed: int = 0,
                **create_kwargs: Any) -> Any:
  """Builds the Keras model ``name`` with the same arguments as ``create``.

  Args:
    name: a registered model name or its Keras spelling.
    weights: ``"imagenet"``, ``None`` (Keras' initializers), ``"random"``
      (``None``, then every weight and BatchNorm statistic randomized from
      ``seed``, the statistics around those of random preprocessed images
      so that activations stay O(1)) or a local weights file (a whole-model
      file fixes the options it was saved with, ``resolve_options``).
    seed: seed of ``weights="random"``.
    **create_kwargs: as in ``models.create``.
  """
  return build_model(name, weights, seed=seed,
                     **resolve_options(name, weights, create_kwargs))
