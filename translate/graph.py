"""A built Keras model as a graph of calls, walked the way Keras runs it.

``read_graph(model)`` gives a ``Graph``: the model's inputs, its calls in
Keras' execution order (``_nodes_by_depth``, deepest first, as
``Function._run_through_graph`` walks them) and its outputs. A call is one
node: a layer (a shared layer has one call per use), a ``keras.ops``
operation of a functional graph, or a nested model (its own ``Graph``, read
once however often it is called). Keras 3 and tf-keras models alike; the
walker knows no layer class: what each class becomes is
``translate.layer_table``'s business.
"""

from __future__ import annotations

import dataclasses
import keyword
import re
from typing import Any

import numpy as np

from models.layers import snake_case


class GraphError(ValueError):
  """The model cannot be read as a graph (subclassed, unbuilt, ...)."""


@dataclasses.dataclass
class Value:
  """One tensor of the graph (an edge).

  Attributes:
    var: the Python name it gets in generated source.
    shape: its shape, batch axis first (None where unknown).
    dtype: its dtype name (``"float32"``, ``"int32"``).
  """

  var: str
  shape: tuple[int | None, ...]
  dtype: str


@dataclasses.dataclass
class Call:
  """One node: ``outputs = op(*args, **kwargs)``.

  Attributes:
    op: the Keras layer, operation or model object.
    cls: its class name (``"Conv2D"``; ``"Add"`` for ``keras.ops.add``).
    name: its Keras name (``op.name``), which names its Flax submodule.
    kind: ``"layer"``, ``"op"`` (a ``keras.ops`` operation) or ``"model"``.
    config: ``op.get_config()`` for layers and operations; None for models.
    args, kwargs: the call's arguments, ``Value`` where a tensor was passed
      and Python constants elsewhere, in the structure Keras called with.
    outputs: the tensors it produced, flattened.
    graph: for a nested model, its ``Graph``.
  """

  op: Any
  cls: str
  name: str
  kind: str
  config: dict[str, Any] | None
  args: tuple[Any, ...]
  kwargs: dict[str, Any]
  outputs: list[Value]
  graph: Graph | None = None


@dataclasses.dataclass
class Graph:
  """A model's calls in execution order between its inputs and outputs."""

  model: Any
  name: str
  cls: str
  inputs: list[Value]
  calls: list[Call]
  outputs: list[Value]
  single_output: bool  # ``model.outputs`` is one tensor, not a list

  def layers(self) -> list[Call]:
    """The distinct layer and model calls' first uses, in order."""
    seen, out = set(), []
    for c in self.calls:
      if c.kind != "op" and id(c.op) not in seen:
        seen.add(id(c.op))
        out.append(c)
    return out


def identifier(name: str) -> str:
  """A Python identifier for a Keras name (``conv1/conv`` -> ``conv1_conv``,
  ``1x1`` -> ``v_1x1``, ``lambda`` -> ``lambda_``)."""
  out = re.sub(r"\W", "_", name)
  if not out or out[0].isdigit():
    out = "v_" + out
  return out + "_" if keyword.iskeyword(out) else out


def _is_model(op: Any) -> bool:
  return hasattr(op, "_nodes_by_depth") or type(op).__name__ in (
      "Sequential", "Functional")


def _package(model: Any) -> str:
  return type(model).__module__.split(".")[0]


def _nodes(model: Any) -> dict[int, list[Any]]:
  """The model's ``_nodes_by_depth``; Keras 3's Sequential keeps its graph
  in ``_functional``."""
  functional = getattr(model, "_functional", None)
  if type(model).__name__ == "Sequential" and _package(model) == "keras":
    if functional is None:
      raise GraphError(
          f"Sequential model {model.name!r} is not built with an input "
          "shape; start it with keras.Input(shape) (or call build()) so its "
          "graph exists")
    model = functional
  nodes = getattr(model, "_nodes_by_depth", None)
  if nodes is None:
    raise GraphError(
        f"model {model.name!r} ({type(model).__name__}) is a subclassed "
        "keras.Model, which has no graph to read; build it as a functional "
        "or Sequential model of layers (or register a Flax version of its "
        "class with translate.register_layer)")
  return nodes


def _node_parts(node: Any) -> tuple[Any, tuple, dict, list[Any]]:
  """``(op, args, kwargs, outputs)`` of a Keras 3 or tf-keras node."""
  if hasattr(node, "operation"):  # Keras 3
    return (node.operation, tuple(node.arguments.args),
            dict(node.arguments.kwargs), list(node.outputs))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return (node.layer, tuple(node.call_args), dict(node.call_kwargs),
          list(tf.nest.flatten(node.outputs)))


def _is_tensor(x: Any) -> bool:
  return type(x).__name__ == "KerasTensor"


def _flatten(x: Any) -> list[Any]:
  if isinstance(x, (list, tuple)):
    return [y for item in x for y in _flatten(item)]
  if isinstance(x, dict):
    return [y for k in sorted(x) for y in _flatten(x[k])]
  return [x]


def _map(fn, x: Any) -> Any:
  if isinstance(x, list):
    return [_map(fn, y) for y in x]
  if isinstance(x, tuple):
    return tuple(_map(fn, y) for y in x)
  if isinstance(x, dict):
    return {k: _map(fn, v) for k, v in x.items()}
  return fn(x)


def _dtype(t: Any) -> str:
  d = getattr(t, "dtype", "float32")
  return str(getattr(d, "name", d))


def _shape(t: Any) -> tuple[int | None, ...]:
  return tuple(None if d is None else int(d) for d in t.shape)


class _Names:
  """Unique Python names, first come first served."""

  def __init__(self, reserved: tuple[str, ...] = ()):
    self.used = set(reserved)

  def take(self, base: str) -> str:
    base = identifier(base)
    name, n = base, 1
    while name in self.used:
      name = f"{base}_{n}"
      n += 1
    self.used.add(name)
    return name


# Names the emitted source binds (imports, arguments): a layer named like
# one gets another variable name.
RESERVED = ("self", "train", "nn", "jnp", "jax", "np", "models", "L", "K",
            "recurrent", "attention", "conv", "normalization",
            "preprocessing", "shapes", "create")


def read_graph(model: Any, _cache: dict[int, Graph] | None = None) -> Graph:
  """Reads ``model`` (built, functional or Sequential; Keras 3 or tf-keras).

  Raises:
    GraphError: the model has no graph (subclassed, or an unbuilt
      Sequential), or a call's output is not connected.
  """
  cache = {} if _cache is None else _cache
  if id(model) in cache:
    return cache[id(model)]
  nodes = _nodes(model)
  names = _Names(RESERVED)
  values: dict[int, Value] = {}
  inputs = []
  for t in model.inputs:
    history = getattr(t, "_keras_history", None)
    layer = history[0] if history is not None else None
    var = names.take(getattr(layer, "name", None) or "inputs")
    values[id(t)] = Value(var, _shape(t), _dtype(t))
    inputs.append(values[id(t)])

  calls = []
  pending = []
  for depth in sorted(nodes, reverse=True):
    pending.extend(nodes[depth])
  for node in pending:
    if getattr(node, "is_input", False):
      continue
    op, args, kwargs, outputs = _node_parts(node)
    if op is None or type(op).__name__ == "InputLayer":
      continue
    tensors = [x for x in _flatten((args, kwargs)) if _is_tensor(x)]
    if any(id(t) not in values for t in tensors):
      continue  # not computable from the inputs (Keras skips it too)
    args_v = _map(lambda x: values[id(x)] if _is_tensor(x) else x, args)
    kwargs_v = _map(lambda x: values[id(x)] if _is_tensor(x) else x, kwargs)
    base = getattr(op, "name", None) or snake_case(type(op).__name__)
    outs = []
    for i, t in enumerate(outputs):
      var = names.take(base if len(outputs) == 1 else f"{base}_{i}")
      values[id(t)] = Value(var, _shape(t), _dtype(t))
      outs.append(values[id(t)])
    if _is_model(op):
      kind, config, sub = "model", None, read_graph(op, cache)
    else:
      kind = "layer" if hasattr(op, "weights") and hasattr(
          op, "trainable") else "op"
      config, sub = _config(op), None
    calls.append(Call(op, type(op).__name__, op.name, kind, config, args_v,
                      kwargs_v, outs, sub))

  outputs = []
  for t in model.outputs:
    if id(t) not in values:
      raise GraphError(f"an output of model {model.name!r} is not "
                       "connected to its inputs")
    outputs.append(values[id(t)])
  graph_owner = (getattr(model, "_functional", None)
                 if type(model).__name__ == "Sequential"
                 and _package(model) == "keras" else model)
  struct = getattr(graph_owner, "_outputs_struct",  # Keras 3
                   getattr(graph_owner, "_nested_outputs", None))  # tf-keras
  single = not isinstance(struct, (list, tuple))
  graph = Graph(model, model.name, type(model).__name__, inputs, calls,
                outputs, single)
  cache[id(model)] = graph
  return graph


def _config(op: Any) -> dict[str, Any]:
  get = getattr(op, "get_config", None)
  if get is None:
    return {}
  try:
    config = get()
  except NotImplementedError:
    return {}
  return {k: (v.tolist() if isinstance(v, np.ndarray) else v)
          for k, v in config.items()}
