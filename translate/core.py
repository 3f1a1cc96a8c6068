"""Keras weights -> Flax variables: strict merge, report and ``convert``."""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, NamedTuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

import models
from translate import keras_build, keras_io
from translate.match import Match, match
from translate.rules import rule_for


class MergeError(ValueError):
  """Raised when Keras weights and Flax variables do not fit one-to-one."""


@dataclasses.dataclass
class TranslationReport:
  """What a translation did.

  Attributes:
    match_counts: number of layers paired per kind (exact / normalized /
      fuzzy).
    fuzzy: ``(flax, keras, score)`` of every fuzzy pairing.
    renamed: auto-named Keras layers renumbered to their canonical names.
    keras_weights: Keras weight tensors read (and used, or dropped by rule).
    params: number of scalars in the ``params`` collection.
    stats: number of scalars in the other collections (``batch_stats``).
    bytes: size of all translated arrays.
    seconds: wall time of the translation (shapes, matching, merge).
  """

  match_counts: dict[str, int]
  fuzzy: list[tuple[str, str, float]]
  renamed: int
  keras_weights: int
  params: int
  stats: int
  bytes: int
  seconds: float

  def table(self) -> str:
    """A short human-readable table."""
    rows = [("matched exact", self.match_counts.get("exact", 0)),
            ("matched normalized", self.match_counts.get("normalized", 0)),
            ("matched fuzzy", self.match_counts.get("fuzzy", 0)),
            ("auto-named layers renumbered", self.renamed),
            ("Keras weight tensors", self.keras_weights),
            ("parameters", f"{self.params:,}"),
            ("batch statistics", f"{self.stats:,}"),
            ("size", f"{self.bytes / 2**20:.1f} MiB")]
    rows += [(f"  fuzzy {f} <- {k}", f"{s:.0f}") for f, k, s in self.fuzzy]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def variable_shapes(module: nn.Module, input_shape: tuple[int, ...],
                    dtype: Any = jnp.float32) -> Any:
  """The module's variable tree as ``ShapeDtypeStruct`` (no real init),
  traced on one input of ``input_shape`` (no batch axis) and ``dtype``
  (``"int32"`` for token ids)."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.dtype(dtype))
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)


def merge(keras_layers: list[keras_io.KerasLayer], shapes: Any,
          exact: bool = False) -> tuple[dict[str, Any], list[Match], int]:
  """Fills the Flax tree ``shapes`` from ``keras_layers``, strictly.

  Every Keras weight is used exactly once (or dropped by its rule), every Flax
  leaf is filled exactly once, and shapes must be equal.

  Args:
    keras_layers: the Keras weights, by layer.
    shapes: the Flax variable tree (``ShapeDtypeStruct`` leaves).
    exact: the layer names are the Flax module paths themselves
      (``translate.from_keras``' graph): no renumbering, no matching; a
      layer without its module is an error listed with the others.

  Returns:
    The variables (nested dict of numpy arrays), the matches and the number
    of auto-named Keras layers that were renumbered.

  Raises:
    MatchError: the layer names cannot be paired.
    MergeError: weights and leaves do not fit; lists both sides.
  """
  flat_shapes = traverse_util.flatten_dict(shapes)
  modules: dict[str, list[tuple[str, ...]]] = collections.OrderedDict()
  for key in flat_shapes:
    modules.setdefault("/".join(key[1:-1]), []).append(key)

  errors = []
  if exact:
    by_name = {l.name: l for l in keras_layers}
    matches = [Match(flax=n, keras=n, kind="exact") for n in by_name
               if n in modules]
    errors += [f"Keras layer {n!r} has no Flax module of that path"
               for n in by_name if n not in modules]
    return _fill(by_name, matches, modules, flat_shapes, errors, 0)
  canonical = keras_io.canonical_names(keras_layers)
  if {l.name for l in keras_layers} == set(modules):
    # The Flax modules carry the model's own names (a user's module named
    # after model.summary()): no renumbering.
    canonical = {l.name: l.name for l in keras_layers}
  by_name = {canonical[l.name]: l for l in keras_layers}
  renamed = sum(1 for k, v in canonical.items() if k != v)
  matches = match(list(by_name), list(modules))
  return _fill(by_name, matches, modules, flat_shapes, errors, renamed)


def _fill(by_name: dict[str, keras_io.KerasLayer], matches: list[Match],
          modules: dict[str, list[tuple[str, ...]]],
          flat_shapes: dict[tuple[str, ...], Any], errors: list[str],
          renamed: int) -> tuple[dict[str, Any], list[Match], int]:
  """The strict fill of ``merge`` once the layers are paired."""
  out: dict[tuple[str, ...], np.ndarray] = {}
  for m in matches:
    layer = by_name[m.keras]
    rules = rule_for(layer.cls, layer.name)
    path = tuple(m.flax.split("/"))
    for wname, array in layer.weights.items():
      if wname not in rules:
        errors.append(f"{layer.name}/{wname}: no rule for weight {wname!r} "
                      f"of {layer.cls}")
        continue
      rule = rules[wname]
      if rule is None:
        continue
      key = (rule.collection, *path, rule.leaf)
      if key not in flat_shapes:
        errors.append(f"{layer.name}/{wname} -> {'/'.join(key)}: no such Flax "
                      f"variable (Flax has "
                      f"{['/'.join(k) for k in modules[m.flax]]})")
        continue
      if key in out:
        errors.append(f"{'/'.join(key)} filled twice (again by "
                      f"{layer.name}/{wname})")
        continue
      value = rule.apply(array)
      want = tuple(flat_shapes[key].shape)
      if tuple(value.shape) != want:
        errors.append(f"{layer.name}/{wname} {tuple(array.shape)} -> "
                      f"{'/'.join(key)}: shape {tuple(value.shape)} != Flax "
                      f"{want}")
        continue
      out[key] = np.asarray(value, dtype=flat_shapes[key].dtype)
  missing = [k for k in flat_shapes if k not in out]
  if missing or errors:
    lines = errors[:8] + [f"Flax {'/'.join(k)} {tuple(flat_shapes[k].shape)} "
                          "not filled by any Keras weight"
                          for k in missing[:8]]
    more = len(errors) + len(missing) - len(lines)
    raise MergeError(
        f"weights do not fit the Flax model ({len(errors)} Keras-side and "
        f"{len(missing)} Flax-side problem(s)): " + "; ".join(lines)
        + (f"; … and {more} more" if more > 0 else ""))
  ordered = {k: out[k] for k in flat_shapes}
  return traverse_util.unflatten_dict(ordered), matches, renamed


def translate(module: nn.Module, keras_model: Any,
              input_shape: tuple[int, ...], dtype: Any = "float32"
              ) -> tuple[dict[str, Any], TranslationReport]:
  """Translates the weights of ``keras_model`` into variables for ``module``.

  Args:
    module: the Flax module (``models.create(...)``).
    keras_model: a built Keras model with the same architecture.
    input_shape: one input's shape without the batch axis, used to trace
      the shapes: ``(height, width, channels)``, or ``(time,)`` for token
      ids.
    dtype: the input dtype to trace with: ``"float32"``, or ``"int32"``
      for token ids (an ``Embedding`` first).

  Returns:
    ``(variables, report)``; ``variables`` is ``{"params": ...,
    "batch_stats": ...}`` of numpy arrays, usable with ``module.apply``.
  """
  start = time.perf_counter()
  layers = keras_io.read_weights(keras_model)
  shapes = variable_shapes(module, input_shape, dtype)
  variables, matches, renamed = merge(layers, shapes)
  kinds = collections.Counter(m.kind for m in matches)
  leaves = traverse_util.flatten_dict(variables)
  params = sum(v.size for k, v in leaves.items() if k[0] == "params")
  report = TranslationReport(
      match_counts=dict(kinds),
      fuzzy=[(m.flax, m.keras, m.score) for m in matches if m.kind == "fuzzy"],
      renamed=renamed,
      keras_weights=sum(len(l.weights) for l in layers),
      params=int(params),
      stats=int(sum(v.size for v in leaves.values()) - params),
      bytes=int(sum(v.nbytes for v in leaves.values())),
      seconds=time.perf_counter() - start)
  return variables, report


class Conversion(NamedTuple):
  """What ``convert`` returns (unpacks as a 4-tuple)."""
  module: nn.Module
  variables: dict[str, Any]
  report: TranslationReport
  keras_model: Any


def convert(name: str, weights: str | None = "imagenet", *, seed: int = 0,
            **create_kwargs: Any) -> Conversion:
  """Builds model ``name`` in Keras and Flax and translates its weights.

  Args:
    name: a registered model name (``"resnet50"``) or Keras spelling.
    weights: ``"imagenet"``, ``None``, ``"random"`` or a local file path; see
      ``translate.keras_build.build_keras``.
    seed: seed of ``weights="random"``.
    **create_kwargs: ``include_top``, ``classes``, ``pooling``,
      ``classifier_activation``, ``input_shape`` and family options, as in
      ``models.create``.

  Returns:
    ``Conversion(module, variables, report, keras_model)``.
  """
  spec = models.get_spec(name)
  resolved = keras_build.resolve_options(name, weights, create_kwargs)
  module_kwargs = dict(resolved)
  if weights == "imagenet":
    module_kwargs.update(spec.imagenet_options)
  module = models.create(name, **module_kwargs)
  keras_model = keras_build.build_model(name, weights, seed=seed, **resolved)
  variables, report = translate(module, keras_model, resolved["input_shape"])
  return Conversion(module, variables, report, keras_model)
