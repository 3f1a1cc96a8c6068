"""A ``translate.graph.Graph`` as readable Flax linen source.

One ``nn.Module`` class per Keras model (the outer one and each nested model
that is not a registered application), with one line per Keras call, named
after the layer that produced it (torch.fx's habit: the generated file is the
documentation). Submodules carry the Keras layer names, so the variables are
keyed ``<layer>/<leaf>`` (``<nested model>/<layer>/<leaf>`` inside a nested
model). A nested registered application is one ``models.create(...)`` line.
What each Keras class becomes comes from ``translate.layer_table``; this
module knows no layer.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import io
import re
import tokenize
from typing import Any

from translate import layer_table
from models.recurrent import MASKING_UNSUPPORTED
from translate.graph import Call, Graph, Value, identifier
from translate.layer_table.base import (Context, UnsupportedLayerError,
                                        source_of)


@dataclasses.dataclass
class Application:
  """A nested model recognised as a registered application."""

  spec_name: str
  create_kwargs: dict[str, Any]


@dataclasses.dataclass
class Emitted:
  """The generated source and what the merge needs to fill its variables.

  Attributes:
    source: the Python file's text.
    class_name: the outer module's class name.
    layers: ``(flax path, Keras layer, rules)`` for every layer with
      variables outside applications, the path as a tuple of names.
    applications: ``(flax path, nested Keras model, Application)``.
  """

  source: str
  class_name: str
  layers: list[tuple[tuple[str, ...], Any, dict]]
  applications: list[tuple[tuple[str, ...], Any, Application]]


def class_name(name: str) -> str:
  """``"my_model_1"`` -> ``"MyModel1"`` (a valid, capitalized identifier)."""
  parts = re.split(r"[^0-9a-zA-Z]+", name)
  out = "".join(p[:1].upper() + p[1:] for p in parts if p)
  if not out or out[0].isdigit():
    out = "Model" + out
  return out


# Keras 3 records training=False for a symbolic call that gave none.
_CALL_KWARGS_IGNORED = {"training": (None, False), "mask": (None,)}


class _Emitter:

  def __init__(self, detect):
    self.detect = detect  # nested model -> Application | None
    self.imports: set[str] = {"import flax.linen as nn"}
    self.classes: dict[int, str] = {}  # id(model) -> class name
    self.class_sources: list[str] = []
    self.used_class_names: set[str] = set()
    self.layers: list[tuple[tuple[str, ...], Any, dict]] = []
    self.applications: list[tuple[tuple[str, ...], Any, Application]] = []
    self.apps: dict[int, Application | None] = {}

  def application(self, model: Any) -> Application | None:
    if id(model) not in self.apps:
      self.apps[id(model)] = self.detect(model) if self.detect else None
    return self.apps[id(model)]

  def graph_class(self, graph: Graph) -> str:
    """Emits the class of ``graph`` (once) and returns its name."""
    if id(graph.model) in self.classes:
      return self.classes[id(graph.model)]
    name = class_name(graph.name)
    base, n = name, 1
    while name in self.used_class_names:
      n += 1
      name = f"{base}{n}"
    self.used_class_names.add(name)
    self.classes[id(graph.model)] = name
    body = self.body(graph)
    self.class_sources.append(self.wrap_class(graph, name, body))
    return name

  def wrap_class(self, graph: Graph, name: str, body: list[str]) -> str:
    args = ", ".join(v.var for v in graph.inputs)
    shapes = "; ".join(f"``{v.var}`` {_shape_text(v)}" for v in graph.inputs)
    outs = "; ".join(_shape_text(v) for v in graph.outputs)
    doc = (f'  """Keras {graph.cls} {graph.name!r}.\n\n'
           f"  Inputs: {shapes}. Returns {outs}"
           f"{'' if graph.single_output else ' (a list, in Keras order)'}."
           '\n  """')
    lines = [f"class {name}(nn.Module):", doc, "",
             "  @nn.compact",
             f"  def __call__(self, {args}, train: bool = False):"]
    lines += ["    " + line for line in body]
    return "\n".join(lines)

  def body(self, graph: Graph) -> list[str]:
    uses = collections.Counter(id(c.op) for c in graph.calls
                               if c.kind != "op")
    hoisted: dict[int, str] = {}
    lines: list[str] = []
    taken = {v.var for v in graph.inputs} | {
        o.var for c in graph.calls for o in c.outputs}
    for call in graph.calls:
      if call.cls == "Masking" or isinstance(call.kwargs.get("mask"), Value):
        raise UnsupportedLayerError(
            f"Keras layer {call.name!r} ({call.cls}) "
            f"{'masks' if call.cls == 'Masking' else 'is called with a mask'}"
            f": {MASKING_UNSUPPORTED}")
      translation = (layer_table.lookup(call.cls, call.kind)
                     if call.kind != "model" else None)
      for key, ok in _CALL_KWARGS_IGNORED.items():
        if key == "training" and translation and translation.ignores_training:
          continue
        if key in call.kwargs and call.kwargs[key] not in ok:
          raise UnsupportedLayerError(
              f"Keras layer {call.name!r} ({call.cls}) is called with "
              f"{key}={call.kwargs[key]!r} in the graph; call it without "
              f"{key} (the translated module takes train= for the whole "
              "model)")
      kwargs = {k: v for k, v in call.kwargs.items()
                if k not in _CALL_KWARGS_IGNORED}
      targets = ", ".join(o.var for o in call.outputs)
      if len(call.outputs) == 1:
        targets = call.outputs[0].var
      if call.kind == "model":
        callee, ctor = self.model_callee(graph, call)
      else:
        callee, ctor = None, None
        translation = layer_table.lookup(call.cls, call.kind)
        if translation is None:
          raise _unsupported(call)
        ctx = Context(call.name, call, self.imports)
        if translation.module is not None:
          ctor = translation.module(call.config, ctx)
        if ctor is not None:  # None: this configuration has no variables
          ctor = _with_name(ctor, call.name)
          self.layers.append(((*graph_path(graph), call.name), call.op,
                              translation.rules))
      if ctor is not None:
        if uses[id(call.op)] > 1:
          if id(call.op) not in hoisted:
            var = _fresh(identifier(call.name) + "_layer", taken)
            lines.append(f"{var} = {ctor}  # shared: "
                         f"{uses[id(call.op)]} calls")
            hoisted[id(call.op)] = var
          callee = hoisted[id(call.op)]
        else:
          callee = ctor
      if call.kind == "model":
        inputs = [source_of(a) for a in call.args]
        inputs += [f"{k}={source_of(v)}" for k, v in kwargs.items()]
        expr = f"{callee}({', '.join(inputs)}, train=train)"
      else:
        inputs = [source_of(a) for a in call.args]
        ctx = Context(call.name, call, self.imports)
        ctx.kw_sources = {k: source_of(v) for k, v in kwargs.items()}
        expr = translation.call(call.config, callee, inputs, ctx)
      lines.append(f"{targets} = {expr}")
    outs = [v.var for v in graph.outputs]
    lines.append(f"return {outs[0]}" if graph.single_output
                 else f"return [{', '.join(outs)}]")
    return lines

  def model_callee(self, graph: Graph, call: Call) -> tuple[str, str]:
    app = self.application(call.op)
    path = (*graph_path(graph), call.name)
    if app is not None:
      self.imports.add("import models")
      if not any(p == path for p, _, _ in self.applications):
        self.applications.append((path, call.op, app))
      kwargs = "".join(f", {k}={_lit(v)}" for k, v in
                       app.create_kwargs.items())
      return None, (f"models.create({app.spec_name!r}{kwargs}, "
                    f"module_name={call.name!r})")
    _PATHS[id(call.graph)] = path
    name = self.graph_class(call.graph)
    return None, f"{name}(name={call.name!r})"


_PATHS: dict[int, tuple[str, ...]] = {}


def graph_path(graph: Graph) -> tuple[str, ...]:
  return _PATHS.get(id(graph), ())


def _lit(v: Any) -> str:
  return repr(tuple(v) if isinstance(v, list) else v)


def _fresh(base: str, taken: set[str]) -> str:
  name, n = base, 1
  while name in taken:
    name = f"{base}_{n}"
    n += 1
  taken.add(name)
  return name


def _with_name(ctor: str, name: str) -> str:
  assert ctor.endswith(")"), ctor
  inner = ctor[ctor.index("(") + 1:-1].strip()
  sep = ", " if inner else ""
  return f"{ctor[:-1]}{sep}name={name!r})"


def _shape_text(v: Value) -> str:
  dims = ", ".join("N" if d is None else str(d) for d in v.shape)
  return f"({dims}) {v.dtype}"


def _unsupported(call: Call) -> UnsupportedLayerError:
  if call.cls == "Lambda":
    return UnsupportedLayerError(
        f"Keras layer {call.name!r} is a Lambda (arbitrary Python code), "
        "which cannot be translated or loaded safely; rewrite it with Keras "
        "layers or keras.ops calls")
  what = "operation" if call.kind == "op" else "layer"
  return UnsupportedLayerError(
      f"Keras {what} {call.name!r} ({call.cls}) has no Flax translation; "
      "write a Flax module for its class and register it with "
      "translate.register_layer(keras_class, flax_module_class, rule) "
      "(docs/own-model.md)")


def emit(graph: Graph, detect=None, header: str = "") -> Emitted:
  """The linen source of ``graph``: its classes (nested ones first) and
  ``create()``, returning the outer module.

  Args:
    graph: from ``translate.graph.read_graph``.
    detect: nested model -> ``Application`` or None (registered
      applications become ``models.create`` lines).
    header: the file's docstring text.
  """
  _PATHS.clear()
  e = _Emitter(detect)
  name = e.graph_class(graph)
  imports = sorted(e.imports, key=_import_order)
  parts = [f'"""{header}\n"""' if header else None, "\n".join(imports)]
  parts += e.class_sources
  parts.append(f"def create() -> nn.Module:\n"
               f'  """The translated model; its variables come from '
               f'translate.load_variables."""\n  return {name}()')
  source = "\n\n\n".join(p for p in parts if p) + "\n"
  return Emitted(wrap_source(source), name, e.layers, e.applications)


WIDTH = 80


def wrap_line(line: str, width: int = WIDTH) -> str:
  """``line`` broken after commas inside brackets, each continuation
  aligned after its opening bracket (or indented four more than the line
  where that is too deep), so that it fits ``width`` where it can (strings
  are never split). Returns ``line`` unchanged when it fits."""
  if len(line) <= width:
    return line
  try:
    tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
  except (tokenize.TokenError, IndentationError):
    return line
  opens, breaks = [], []  # breaks: (column after a comma, its bracket's)
  for tok in tokens:
    if tok.type == tokenize.OP and tok.string in "([{":
      opens.append(tok.end[1])
    elif tok.type == tokenize.OP and tok.string in ")]}":
      opens.pop()
    elif tok.type == tokenize.OP and tok.string == "," and opens:
      breaks.append((tok.end[1], opens[-1]))
  base = len(line) - len(line.lstrip())
  segments = [(0, 0)]  # (original start column, displayed indent)

  def shown(col: int) -> int:
    start, indent = max(s for s in segments if s[0] <= col)
    return indent + col - start

  parts, start, previous = [], 0, None
  for col, bracket in breaks + [(len(line), None)]:
    indent = segments[-1][1]
    if indent + col - start > width and previous is not None:
      cut, at = previous
      parts.append(line[start:cut].rstrip())
      start = cut + (len(line[cut:]) - len(line[cut:].lstrip()))
      aligned = shown(at)
      segments.append((start, aligned if aligned <= width // 2
                       else base + 4))
      previous = None
    if bracket is not None and col > start:
      previous = (col, bracket)
  parts.append(line[start:])
  return "\n".join(" " * indent + part if i else part for i, (part, (
      _, indent)) in enumerate(zip(parts, segments)))


def wrap_source(source: str) -> str:
  """Every line of generated ``source`` through ``wrap_line``; a line whose
  wrapping would change the program (it never should) stays as it was."""
  lines = []
  for line in source.split("\n"):
    wrapped = wrap_line(line)
    if wrapped != line:
      try:
        same = ast.dump(ast.parse(line.strip())) == ast.dump(
            ast.parse(wrapped.strip()))
      except SyntaxError:
        same = False
      if not same:
        wrapped = line
    lines.append(wrapped)
  return "\n".join(lines)


def _import_order(line: str) -> tuple[int, str]:
  order = ["import numpy", "import jax", "import jax.numpy", "import flax",
           "import models", "from models"]
  for i, prefix in enumerate(order):
    if line.startswith(prefix):
      return (i, line)
  return (len(order), line)
