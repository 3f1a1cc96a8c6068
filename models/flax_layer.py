"""A port as a Keras layer: ``keras.layers.FlaxLayer`` on Keras' JAX backend.

``keras_layer("resnet50", variables, include_top=False, pooling="avg")`` is a
Keras layer that runs the Flax module with ``variables`` as its weights, so
a translated (or Flax-fine-tuned) backbone goes into a Keras functional model
with a Keras head and trains with ``fit``. The module's ``params`` become
trainable Keras weights and its ``batch_stats`` non-trainable ones that
``FlaxLayer`` updates in training mode (``mutable=DenyList(["params"])``, as
``FlaxLayer`` documents); dropout draws from the ``"dropout"`` RNG that
``FlaxLayer`` passes when training.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import flax.linen as nn
from flax import serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from models.factory import create, resolve_input_shape
from models.layers import snake_case
from models.registry import get_spec


def _call(module: nn.Module, inputs: jax.Array, training: bool = False
          ) -> jax.Array:
  """``FlaxLayer``'s calling convention (``training``) -> our ``train``."""
  return module(inputs, train=training)


def _check_fits(flat: dict[tuple[str, ...], Any],
                shapes: dict[tuple[str, ...], Any], what: str) -> None:
  missing = [k for k in shapes if k not in flat]
  extra = [k for k in flat if k not in shapes]
  misfit = [k for k in shapes if k in flat
            and tuple(np.shape(flat[k])) != tuple(shapes[k].shape)]
  if missing or extra or misfit:
    names = lambda keys: ", ".join("/".join(k) for k in keys[:4])  # noqa
    parts = []
    if missing:
      parts.append(f"{len(missing)} leaf(s) of the module missing from the "
                   f"variables, first: {names(missing)}")
    if extra:
      parts.append(f"{len(extra)} leaf(s) of the variables not in the "
                   f"module, first: {names(extra)}")
    if misfit:
      parts.append(f"{len(misfit)} leaf(s) of another shape, first: "
                   + "; ".join(f"{'/'.join(k)} {tuple(np.shape(flat[k]))} "
                               f"(module {tuple(shapes[k].shape)})"
                               for k in misfit[:3]))
    raise ValueError(f"the variables do not fit {what}: " + "; ".join(parts)
                     + " (check the model name, include_top, classes and "
                     "options; folded variables need inference=True)")


def _call_many(module: nn.Module, inputs: Any, training: bool = False
               ) -> Any:
  """``FlaxLayer``'s convention for a module of several inputs (a
  ``translate.from_keras`` translation): a list of inputs, unpacked."""
  if isinstance(inputs, (list, tuple)):
    return module(*inputs, train=training)
  return module(inputs, train=training)


def keras_layer(name: str | nn.Module, variables: Any,
                **create_kwargs: Any) -> Any:
  """The Flax port of ``name`` as a ``keras.layers.FlaxLayer``.

  ``name`` may also be a module (``translate.from_keras``' translation of a
  user's Keras model, or ``create()`` of its emitted source): the layer
  then runs it with ``variables``, a list of inputs for several; the only
  keyword is ``layer_name`` (default: the module's class name in
  snake_case).

  ``layer(x)`` equals ``models.create(name, **create_kwargs).apply(variables,
  x)``: ``x`` is NHWC float32 already preprocessed (``models.preprocess``,
  or a Keras ``Rescaling`` layer for the ``tf`` mode). In training mode
  (``fit``) BatchNorm normalizes with batch statistics and updates its
  moving statistics (non-trainable Keras weights), and dropout is on.

  Needs Keras' JAX backend: if Keras is not imported yet and
  ``KERAS_BACKEND`` is unset, the JAX backend is selected.

  Args:
    name: a registered model name (``"resnet50"``) or Keras spelling.
    variables: ``{"params", "batch_stats"}`` of that module, e.g. from
      ``translate.convert`` or ``translate.load_variables``.
    **create_kwargs: as in ``models.create`` (``include_top``, ``pooling``,
      ``input_shape``, family options, …).

  Returns:
    A ``keras.layers.FlaxLayer`` named after the model.

  Raises:
    RuntimeError: Keras runs on another backend.
    ValueError: the variables do not fit the module (lists both sides).
  """
  if isinstance(name, nn.Module):
    return _module_layer(name, variables, **create_kwargs)
  spec = get_spec(name)
  module = create(spec.name, **create_kwargs)
  input_shape = resolve_input_shape(spec.name, create_kwargs.get("input_shape"))
  flat = traverse_util.flatten_dict(serialization.to_state_dict(variables))
  shapes = traverse_util.flatten_dict(jax.eval_shape(
      module.init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)))
  _check_fits(flat, shapes, spec.keras_name)
  tree = traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in flat.items()})
  return _jax_keras().layers.FlaxLayer(module, method=_call, variables=tree,
                                       name=spec.name)


def _module_layer(module: nn.Module, variables: Any,
                  layer_name: str | None = None) -> Any:
  tree = traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in traverse_util.flatten_dict(
          serialization.to_state_dict(variables)).items()})
  return _jax_keras().layers.FlaxLayer(
      module, method=_call_many, variables=tree,
      name=layer_name or snake_case(type(module).__name__))


def _jax_keras() -> Any:
  """Keras, on its JAX backend (selected if Keras is not imported yet)."""
  if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras  # pylint: disable=g-import-not-at-top
  if keras.backend.backend() != "jax":
    raise RuntimeError(
        "models.keras_layer needs Keras' JAX backend (keras.layers.FlaxLayer "
        "runs the Flax module as JAX code); this process runs Keras on "
        f"{keras.backend.backend()!r}. Set KERAS_BACKEND=jax before Keras is "
        "first imported, or use translate.to_keras for a native Keras model")
  return keras
