"""Reading a built Keras model: its layers, their weights and their names.

Nothing here builds or imports Keras: the model is given. Building models
lives in ``translate.keras_build``, weights files in
``translate.weights_files``, randomization in ``translate.random_weights``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

import numpy as np

from models.layers import snake_case
from models.recurrent import MASKING_UNSUPPORTED


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """The weights of one Keras layer, as read from the model.

  Attributes:
    name: the layer name in the model.
    cls: the layer class name (``"Conv2D"``); selects the translation rule.
    weights: weight name (``"kernel"``, ``"moving_mean"``) to array, in the
      layer's own order.
    outer: for a sublayer of a container (``Bidirectional``'s
      ``forward_lstm``, named ``"bidirectional/forward_lstm"``), the
      containers' class names, outermost first; empty otherwise.
  """

  name: str
  cls: str
  weights: dict[str, np.ndarray]
  outer: tuple[str, ...] = ()  # classes of the containers it sits in


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


class UnsupportedLayerError(ValueError):
  """The Keras model uses a feature the Flax modules do not reproduce."""




def _sublayers(layer: Any) -> list[Any]:
  flatten = getattr(layer, "_flatten_layers", None)  # Keras 3 and tf-keras
  return list(flatten(include_self=False, recursive=False)) if flatten else []


def container_parts(layer: Any) -> list[Any]:
  """The sublayers of a layer whose weights all live in two or more of its
  own layers, each weight in exactly one (``Bidirectional``: its
  ``forward_lstm`` and ``backward_lstm``), else ``[]``. Such a layer is
  translated as its parts, each by its own class's rule; an LSTM (all its
  weights in one ``LSTMCell``) stays one layer."""
  parts = [s for s in _sublayers(layer) if s.weights]
  if len(parts) < 2:
    return []
  held = [id(v) for s in parts for v in s.weights]
  own = {id(v) for v in layer.weights}
  return parts if len(held) == len(set(held)) and set(held) == own else []


def read_layer(layer: Any, name: str, outer: tuple[str, ...] = ()
               ) -> Iterator[KerasLayer]:
  """One layer's weights as ``KerasLayer``s named ``name`` (a container's
  parts as ``name/<part>``, see ``container_parts``)."""
  parts = container_parts(layer)
  if parts:
    for part in parts:
      yield from read_layer(part, f"{name}/{part.name}",
                             (*outer, type(layer).__name__))
    return
  weights: dict[str, np.ndarray] = {}
  for v in layer.weights:
    key = weight_name(v)
    if key in weights:
      raise ValueError(f"Keras layer {name!r} has two weights named "
                       f"{key!r}; cannot translate it unambiguously")
    weights[key] = np.asarray(v.numpy())
  if weights:
    yield KerasLayer(name, type(layer).__name__, weights, outer)


def read_weights(model: Any) -> list[KerasLayer]:
  """Every weight of every layer that has weights, with its layer's name and
  class; a container layer (see ``container_parts``) gives its parts as
  ``"<container>/<part>"``. Raises if a layer holds two weights of the same
  name, and ``UnsupportedLayerError`` if the model masks (``mask_zero=True``
  or a ``Masking`` layer)."""
  out = []
  for layer in iter_layers(model):
    if getattr(layer, "mask_zero", False) or type(layer).__name__ == "Masking":
      what = ("mask_zero=True" if getattr(layer, "mask_zero", False)
              else "a Masking layer")
      raise UnsupportedLayerError(
          f"Keras layer {layer.name!r} ({type(layer).__name__}) has {what}: "
          f"{MASKING_UNSUPPORTED}")
    out.extend(read_layer(layer, layer.name, ()))
  return out


def canonical_names(layers: list[KerasLayer]) -> dict[str, str]:
  """See ``canonical_names_by_base``; bases come from the layer classes.

  A container's part (``bidirectional_3/forward_lstm_7``) gets the
  container's canonical name, and its own name renumbered among the parts
  of that container that share its base (``forward_lstm``: Keras names the
  parts ``forward_`` / ``backward_`` + the wrapped layer's auto name).
  """
  tops = {l.name.split("/")[0]: snake_case((l.outer or (l.cls,))[0])
          for l in layers}
  top = canonical_names_by_base(list(tops.items()))
  out = {l.name: top[l.name] for l in layers if not l.outer}
  groups: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
  for l in layers:
    if not l.outer:
      continue
    path = l.name.split("/")
    parent = "/".join([top[path[0]], *path[1:-1]])
    base = re.escape(snake_case(l.cls))
    m = re.fullmatch(rf"((?:.*_)?{base})(?:_(\d+))?", path[-1])
    if m is None:
      out[l.name] = f"{parent}/{path[-1]}"
    else:
      groups.setdefault((parent, m.group(1)), []).append(
          (int(m.group(2) or 0), path[-1], l.name))
  for (parent, base), members in groups.items():
    numbers = sorted({n for n, _, _ in members})
    for n, _, full in members:
      rank = numbers.index(n)
      out[full] = f"{parent}/{base}" + (f"_{rank}" if rank else "")
  return out


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
