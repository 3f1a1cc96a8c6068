"""The model registry: one frozen spec per model name.

The CLI, the tests and the benchmarks all read this registry, so a model is
tested and exposed the moment it is registered (the timm habit).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything the project knows about one registered model.

  Attributes:
    name: lower-case registry name, e.g. ``"resnet50"``.
    keras_name: the Keras spelling, e.g. ``"ResNet50"`` (also accepted).
    family: the family module in ``models/`` (``"resnet"``).
    flax_cls: a callable building the Flax module from the keyword arguments
      ``include_top, classes, pooling, classifier_activation`` plus ``options``.
    keras_fn: dotted path of the Keras constructor, resolved lazily so that
      importing ``models`` does not import TensorFlow.
    keras_preprocess: dotted path of the Keras module whose
      ``preprocess_input`` the model expects.
    input_shape: native ``(height, width, channels)``.
    preprocess: ``preprocess_input`` mode: ``caffe``, ``tf``, ``torch`` or
      ``none``.
    bn_epsilon: the BatchNormalization epsilon Keras uses in this family.
    min_size: smallest height/width Keras accepts for this model.
    options: extra ``create`` keyword arguments with their defaults, e.g.
      ``{"alpha": 1.0}`` for MobileNetV2.
    imagenet_options: module options that hold only with Keras' ImageNet
      weights (Keras builds a slightly different graph for
      ``weights="imagenet"``, e.g. EfficientNet's second ``Rescaling``).
    option_choices: the values Keras accepts (with ImageNet weights) for
      options that change the architecture, e.g. ``{"alpha": (0.35, 0.5,
      ...)}``: ``translate.from_keras`` tries them to recognise a nested
      application by its structure.
    slow: too expensive for the default test run (still run in CI).
    name_aliases: ``(pattern, replacement)`` regular-expression rewrites
      from layer names older Keras versions gave (in weights files) to the
      current ones, e.g. tf-keras MobileNetV3's ``Conv/BatchNorm`` to Keras
      3's ``conv_bn``; names that differ only by ``/`` vs ``_`` or case need
      none.
  """

  name: str
  keras_name: str
  family: str
  flax_cls: Callable[..., nn.Module]
  keras_fn: str
  keras_preprocess: str
  input_shape: tuple[int, int, int]
  preprocess: str
  bn_epsilon: float
  min_size: int = 32
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  imagenet_options: Mapping[str, Any] = dataclasses.field(
      default_factory=dict)
  option_choices: Mapping[str, tuple[Any, ...]] = dataclasses.field(
      default_factory=dict)
  slow: bool = False
  name_aliases: tuple[tuple[str, str], ...] = ()

  @property
  def params(self) -> int | None:
    """Trainable parameters at the defaults, from ``models.param_counts``
    (None for a model registered outside this package)."""
    from models.param_counts import PARAMS  # pylint: disable=g-import-not-at-top
    return PARAMS.get(self.name)

  def keras_constructor(self) -> Callable[..., Any]:
    """Imports and returns the Keras constructor (imports TensorFlow)."""
    return _resolve(self.keras_fn)

  def keras_preprocess_input(self) -> Callable[..., Any]:
    """Imports and returns Keras' own ``preprocess_input`` for this model."""
    return _resolve(self.keras_preprocess + ".preprocess_input")


_REGISTRY: dict[str, ModelSpec] = {}


def _resolve(dotted: str) -> Any:
  from models.backend import ensure_backend  # pylint: disable=g-import-not-at-top
  ensure_backend()
  module, _, attr = dotted.rpartition(".")
  return getattr(importlib.import_module(module), attr)


def register(spec: ModelSpec) -> ModelSpec:
  """Adds ``spec`` to the registry; registering a name twice raises."""
  for key in {spec.name, spec.keras_name.lower()}:
    if key in _REGISTRY:
      raise ValueError(f"model {key!r} is already registered")
  if spec.name != spec.name.lower():
    raise ValueError(f"registry names are lower-case, got {spec.name!r}")
  _REGISTRY[spec.name] = spec
  return spec


class UnknownModelError(ValueError):
  """Raised for a model name that is not registered."""


def suggest(name: str, limit: int = 3) -> list[str]:
  """The registered names closest to ``name`` (rapidfuzz)."""
  from rapidfuzz import fuzz, process  # pylint: disable=g-import-not-at-top
  hits = process.extract(name.lower(), list(_REGISTRY), scorer=fuzz.WRatio,
                         limit=limit)
  return [h[0] for h in hits]


def get_spec(name: str) -> ModelSpec:
  """Looks up a model by registry name or Keras spelling (any case)."""
  key = name.lower()
  if key in _REGISTRY:
    return _REGISTRY[key]
  for spec in _REGISTRY.values():
    if spec.keras_name.lower() == key:
      return spec
  raise UnknownModelError(
      f"unknown model {name!r}; closest registered names: "
      f"{', '.join(suggest(name))} (see `python main.py --list`)")


def list_models() -> list[str]:
  """All registered names, in registration order."""
  return list(_REGISTRY)
