"""Building the registered models: ``create``, input shapes and
preprocessing (re-exported by ``models``, which users import)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from models.inference import Inference
from models.preprocess import preprocess_mode
from models.registry import get_spec


def resolve_input_shape(name: str, input_shape: Any = None
                        ) -> tuple[int, int, int]:
  """Validates ``input_shape`` for model ``name`` (``None``: native size).

  Raises:
    ValueError: the shape is not (height, width, channels), the channels are
      not 1 or 3, or a side is below the model's minimum size.
  """
  spec = get_spec(name)
  if input_shape is None:
    return spec.input_shape
  shape = tuple(int(s) for s in input_shape)
  if len(shape) != 3:
    raise ValueError(f"input_shape must be (height, width, channels), got "
                     f"{shape}; e.g. {spec.input_shape}")
  if shape[2] not in (1, 3):
    raise ValueError(f"input_shape {shape} has {shape[2]} channels; "
                     f"{spec.keras_name} takes 3 (RGB) channels")
  if min(shape[:2]) < spec.min_size:
    raise ValueError(f"input_shape {shape} is too small for "
                     f"{spec.keras_name}: height and width must be at least "
                     f"{spec.min_size}")
  return shape


def create(name: str, include_top: bool = True, classes: int = 1000,
           pooling: str | None = None,
           classifier_activation: Any = "softmax",
           input_shape: Any = None, inference: bool = False,
           module_name: str | None = None, **options: Any):
  """Builds the Flax module for a registered model.

  ``module.apply(variables, x)`` with ``x`` NHWC float32, already passed
  through the model's preprocessing, returns what the Keras model built with
  the same arguments returns.

  Args:
    name: registry name (``"resnet50"``) or Keras spelling (``"ResNet50"``).
    include_top: include the classifier (``predictions``) layer.
    classes: number of classes of the classifier.
    pooling: ``None``, ``"avg"`` or ``"max"``; used when ``include_top`` is
      False, as in Keras.
    classifier_activation: ``"softmax"`` (default) or ``None`` for logits.
    input_shape: ``(height, width, channels)``; validated against the
      model's minimum size (the module itself is shape-agnostic).
    inference: return the inference form, whose variables come from
      ``translate.fold_batchnorm``: BatchNorms that follow a convolution are
      folded into it (fewer ops under ``jax.jit``); it cannot train.
    module_name: the Flax ``name`` of the module, when it is a submodule of
      your own model (``name`` is the registry name here).
    **options: family options listed in the spec (e.g. ``alpha``), and the
      spec's ``imagenet_options`` for a module that will hold Keras'
      ImageNet weights (``translate.convert`` adds those itself).

  Returns:
    A ``flax.linen.Module``.
  """
  spec = get_spec(name)
  resolve_input_shape(name, input_shape)
  accepted = set(spec.options) | set(spec.imagenet_options)
  unknown = set(options) - accepted
  if unknown:
    raise ValueError(
        f"{spec.keras_name} takes no option(s) {sorted(unknown)}; it accepts "
        f"{sorted(accepted) or 'none'}")
  if pooling not in (None, "avg", "max"):
    raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
  if int(classes) < 1:
    raise ValueError(f"classes must be a positive integer, got {classes}")
  kwargs = dict(include_top=include_top, classes=int(classes),
                pooling=pooling, classifier_activation=classifier_activation,
                **{**spec.options, **options})
  if inference:
    return Inference(inner=spec.flax_cls(**kwargs, parent=None),
                     name=module_name)
  return spec.flax_cls(**kwargs, name=module_name)


def preprocess(name: str, images: jax.Array | np.ndarray) -> jax.Array:
  """The model's Keras ``preprocess_input``, in pure jax.numpy.

  Args:
    name: a registered model name.
    images: RGB images, NHWC or HWC, uint8 or float in [0, 255].
  """
  return preprocess_mode(images, get_spec(name).preprocess)


def decode_predictions(preds: Any, top: int = 5) -> list:
  """ImageNet ``(class_id, name, score)`` tuples, re-used from Keras'
  ``imagenet_utils.decode_predictions`` (which downloads the class index
  once and caches it)."""
  from models.backend import ensure_backend  # pylint: disable=g-import-not-at-top
  ensure_backend()
  from keras.applications import imagenet_utils  # pylint: disable=g-import-not-at-top
  return imagenet_utils.decode_predictions(np.asarray(preds), top=top)
