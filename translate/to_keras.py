"""Flax variables -> Keras weights: the rules table read backwards.

``to_keras`` builds Keras' own application with the arguments of
``models.create`` and fills every one of its weights from the Flax variables,
strictly: the layers are paired by name as in the forward direction
(``translate.match``), each Keras weight's rule (chosen by its layer class in
``translate.rules.RULES``) names the Flax leaf it comes from, and
``Rule.invert`` rearranges it back (``h w 1 (c m) -> h w c m`` for depthwise
kernels; BatchNorm ``scale/bias/mean/var`` to ``gamma/beta/moving_mean/
moving_variance``). Every Keras weight is filled exactly once and every Flax
leaf used exactly once, or nothing is assigned and the error lists both
sides. Arrays are copied bit for bit. Nothing here knows a model by name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator

from flax import traverse_util
import jax
import numpy as np

import models
from translate import keras_io
from translate.from_keras import emitted_graph, load_keras
from translate.core import MergeError, variable_shapes
from translate.keras_build import build_keras
from translate.fold import conv_bn_pairs
from translate.io import to_numpy
from translate.match import match
from translate.rules import rule_for


class FoldedVariablesError(ValueError):
  """The variables come from ``translate.fold_batchnorm``: no Keras form."""


def refuse_folded(module: Any, variables: Any,
                  input_shape: tuple[int, ...]) -> None:
  """Raises ``FoldedVariablesError`` if BatchNorms of ``module`` that follow
  a convolution have no variables at all in ``variables`` while that
  convolution has a bias (what ``fold_batchnorm`` leaves: the scale, bias
  and statistics moved into the convolution's kernel and bias, which
  Keras' model cannot hold)."""
  given = set(traverse_util.flatten_dict(to_numpy(variables)))
  shapes = traverse_util.flatten_dict(variable_shapes(module, input_shape))
  if all(k in given for k in shapes):
    return  # the common case: no trace of the pairs needed
  by_module: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
  for key in shapes:
    by_module.setdefault(key[1:-1], []).append(key)
  pairs = conv_bn_pairs(module, variable_shapes(module, input_shape),
                        input_shape)
  # Folded: the BatchNorm is gone and its convolution got a bias (the
  # variables of another model lack the convolution too).
  folded = [p for p in pairs
            if not any(k in given for k in by_module.get(p["bn"], []))
            and ("params", *p["conv"], "bias") in given]
  if folded:
    first = folded[0]
    raise FoldedVariablesError(
        f"the variables are folded (translate.fold_batchnorm): "
        f"{len(folded)} BatchNorm(s) were merged into their convolutions, "
        f"first {'/'.join(first['bn'])} into {'/'.join(first['conv'])}; a "
        "folded BatchNorm has no Keras form (Keras' model keeps the "
        "BatchNormalization layer and a bias-free convolution); pass the "
        "unfolded variables")


def _keras_dtype(variable: Any) -> np.dtype:
  return np.dtype(getattr(variable.dtype, "name", variable.dtype))


def pairs_by_name(keras_model: Any, flat: dict[tuple[str, ...], Any],
                  prefix: tuple[str, ...] = ()
                  ) -> list[tuple[tuple[str, ...], Any]]:
  """``(Flax module path, Keras layer)`` for every weighted layer of
  ``keras_model``, paired by name with the modules of ``flat`` under
  ``prefix`` (exact, normalized, then fuzzy with a margin, as in
  ``translate.merge``)."""
  n = len(prefix)
  modules = sorted({"/".join(k[1 + n:-1]) for k in flat
                    if k[1:1 + n] == prefix})
  layers = [l for l in keras_io.iter_layers(keras_model) if l.weights]
  canonical = keras_io.canonical_names(
      [keras_io.KerasLayer(l.name, type(l).__name__, {}) for l in layers])
  by_name = {canonical[l.name]: l for l in layers}
  return [((*prefix, *m.flax.split("/")), by_name[m.keras])
          for m in match(list(by_name), modules)]


def assign_variables(keras_model: Any, variables: Any,
                     pairs: list[tuple[tuple[str, ...], Any]] | None = None
                     ) -> int:
  """Writes Flax ``variables`` into the weights of ``keras_model``, strictly.

  Keras layers and Flax modules are paired by name (exact, normalized, then
  fuzzy with a margin, as in ``translate.merge``); each Keras weight takes
  the Flax leaf its rule names, rearranged back by ``Rule.invert``. A weight
  whose rule is ``DROP`` (Normalization's sample ``count``) keeps Keras'
  value. All checks run before anything is assigned.

  Args:
    keras_model: a built Keras model of the same architecture.
    variables: ``{"params": ..., "batch_stats": ...}`` (numpy, jax or
      FrozenDict leaves).
    pairs: ``(Flax module path, Keras layer)`` pairs when the caller knows
      them (``translate.from_keras``' graph); default ``pairs_by_name``.

  Returns:
    The number of Keras weights assigned.

  Raises:
    MatchError: the layer names cannot be paired (lists both sides).
    MergeError: weights and leaves do not fit one-to-one, or a shape or
      dtype differs; lists the Keras-side and the Flax-side problems.
  """
  flat = traverse_util.flatten_dict(to_numpy(variables))
  if pairs is None:
    pairs = pairs_by_name(keras_model, flat)
  modules: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
  for key in flat:
    modules.setdefault(key[1:-1], []).append(key)
  plan: list[tuple[Any, np.ndarray]] = []
  used: set[tuple[str, ...]] = set()
  errors: list[str] = []
  for path, layer in pairs:
    cls = type(layer).__name__
    rules = rule_for(cls, layer.name)
    seen: set[str] = set()
    for v in layer.weights:
      wname = keras_io.weight_name(v)
      where = f"Keras {layer.name}/{wname}"
      if wname in seen:
        errors.append(f"{where}: the layer has two weights of that name")
        continue
      seen.add(wname)
      if wname not in rules:
        errors.append(f"{where}: no rule for weight {wname!r} of {cls}")
        continue
      rule = rules[wname]
      if rule is None:
        continue  # DROP: no Flax counterpart, Keras keeps its own value
      key = (rule.collection, *path, rule.leaf)
      if key not in flat:
        errors.append(f"{where} needs Flax {'/'.join(key)}, which the "
                      f"variables lack (they have "
                      f"{['/'.join(k) for k in modules.get(path, [])]})")
        continue
      if key in used:
        errors.append(f"Flax {'/'.join(key)} used twice (again by {where})")
        continue
      used.add(key)
      shape = tuple(v.shape)
      array = flat[key]
      want = tuple(jax.eval_shape(
          rule.apply, jax.ShapeDtypeStruct(shape, np.float32)).shape)
      if tuple(array.shape) != want:
        errors.append(f"Flax {'/'.join(key)} {tuple(array.shape)} -> {where}"
                      f" {shape}: the Flax leaf should be {want}")
        continue
      dtype = _keras_dtype(v)
      if array.dtype.kind != dtype.kind:
        errors.append(f"Flax {'/'.join(key)} is {array.dtype}, {where} is "
                      f"{dtype}")
        continue
      plan.append((v, np.asarray(rule.invert(array, shape), dtype=dtype)))
  unused = [k for k in flat if k not in used]
  if errors or unused:
    lines = errors[:8] + [f"Flax {'/'.join(k)} {tuple(flat[k].shape)} fills "
                          "no Keras weight" for k in unused[:8]]
    more = len(errors) + len(unused) - len(lines)
    raise MergeError(
        f"the Flax variables do not fit {keras_model.name} ({len(errors)} "
        f"Keras-side and {len(unused)} Flax-side problem(s)): "
        + "; ".join(lines) + (f"; … and {more} more" if more > 0 else ""))
  for v, value in plan:
    v.assign(value)
  for _, layer in pairs:
    if hasattr(layer, "finalize_state"):
      layer.finalize_state()  # Normalization derives its tensors from them
  return len(plan)


def to_keras(name: str, variables: Any, **create_kwargs: Any) -> Any:
  """Keras' own application ``name``, holding the Flax ``variables``.

  The inverse of ``translate.convert``: the Keras model is built with
  ``weights=None`` and the arguments of ``models.create`` (``include_top``,
  ``classes``, ``pooling``, ``classifier_activation``, ``input_shape`` and
  family options), then every weight is filled from ``variables`` by
  ``assign_variables``. Save it with
  ``model.save_weights("x.weights.h5")`` (or ``write_weights_atomically``).

  Args:
    name: a registered model name (``"resnet50"``) or Keras spelling; or a
      user's own Keras model (the object, or a ``.keras`` / whole-model
      ``.h5`` path) whose ``translate.from_keras`` variables these are: the
      model gets them back (``from_keras.to_keras_model``).
    variables: ``{"params", "batch_stats"}`` of
      ``models.create(name, **create_kwargs)``, e.g. fine-tuned in Flax.
    **create_kwargs: as in ``models.create``.

  Returns:
    The Keras model.

  Raises:
    FoldedVariablesError: ``variables`` come from ``fold_batchnorm``.
    MatchError, MergeError: they do not fit the model (lists both sides).
    ValueError: an option only Keras' ImageNet build has, or a bad shape.
  """
  if not isinstance(name, str) or name.endswith((".keras", ".h5")):
    if create_kwargs:
      raise ValueError("to_keras(model_or_path, variables) takes no options "
                       "for a Keras model or file: its architecture is given")
    return to_keras_model(name, variables)
  spec = models.get_spec(name)
  imagenet_only = sorted(set(create_kwargs) & set(spec.imagenet_options))
  if imagenet_only:
    raise ValueError(
        f"{imagenet_only} only exist in Keras' weights='imagenet' build of "
        f"{spec.keras_name}; Keras' weights=None model, which the weights go "
        "into, has no such layer: leave them out")
  input_shape = models.resolve_input_shape(name,
                                           create_kwargs.get("input_shape"))
  module = models.create(name, **create_kwargs)
  refuse_folded(module, variables, input_shape)
  keras_model = build_keras(name, None, **create_kwargs)
  assign_variables(keras_model, variables)
  return keras_model


@contextlib.contextmanager
def atomic_weights_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary ``.weights.h5`` path beside ``path``; when the block
  succeeds the file is fsynced and renamed onto ``path``, otherwise removed.

  Keras writes by path (and wants the ``.weights.h5`` suffix), so the block
  saves there itself and may read it back (a parity check) before it
  commits::

    with atomic_weights_path("out.weights.h5") as tmp:
      keras_model.save_weights(tmp)
  """
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp.weights.h5",
                             dir=os.path.dirname(path) or ".")
  os.close(fd)
  try:
    mask = os.umask(0)
    os.umask(mask)
    yield tmp
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def write_weights_atomically(keras_model: Any, path: str | os.PathLike
                             ) -> str:
  """``keras_model.save_weights(path)``, all or nothing; returns ``path``."""
  with atomic_weights_path(path) as tmp:
    keras_model.save_weights(tmp)
  return os.fspath(path)


def graph_pairs(emitted: Any, flat: dict[tuple[str, ...], Any]
                ) -> list[tuple[tuple[str, ...], Any]]:
  """``(Flax module path, Keras layer)`` for every weighted Keras layer of
  the graph: layers by their exact path (a container's parts, such as
  Bidirectional's, under ``<path>/<part>``), each application's layers
  paired by name inside its subtree (as ``translate.to_keras`` pairs a
  registered model)."""
  pairs = []
  for path, layer, _ in emitted.layers:
    parts = keras_io.container_parts(layer)
    if parts:
      pairs += [((*path, p.name), p) for p in parts]
    elif layer.weights:
      pairs.append((path, layer))
  for path, app_model, _ in emitted.applications:
    pairs += pairs_by_name(app_model, flat, prefix=path)
  return pairs


def to_keras_model(model_or_path: Any, variables: Any) -> Any:
  """The user's Keras model (the object, or rebuilt from its file) holding
  Flax ``variables`` (``from_keras``' tree, e.g. fine-tuned): every weight
  assigned from its leaf, bit for bit, strictly (``to_keras``' checks).
  Returns the Keras model; save it with ``save_weights`` or ``save``."""
  model = load_keras(model_or_path)
  _, emitted = emitted_graph(model)
  flat = traverse_util.flatten_dict(to_numpy(variables))
  assign_variables(model, variables,
                                pairs=graph_pairs(emitted, flat))
  return model
