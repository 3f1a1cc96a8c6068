"""A ``translate.graph.Graph`` as readable Flax NNX source.

The NNX counterpart of ``translate.emit`` (whose linen source, its call
expressions and its layer table this reuses): one ``nnx.Module`` class per
Keras model (the outer one and each nested model that is not a registered
application), one attribute per Keras layer with variables (named after the
layer; a shared layer is one attribute called several times), one line per
Keras call in ``__call__(*inputs, train=False)``.

- Native NNX: Dense -> ``nnx.Linear``, Conv1D/2D/3D and DepthwiseConv
  (``models.layers.Conv`` in linen) -> ``nnx.Conv``, BatchNormalization on
  the last axis -> ``nnx.BatchNorm`` (Keras' epsilon and momentum, the
  two-pass variance), LayerNormalization on the last axis ->
  ``nnx.LayerNorm``, Embedding -> ``nnx.Embed``, Dropout and SpatialDropout
  -> ``nnx.Dropout``.
- Any other layer with variables: its linen module (what the linen source
  builds) in ``models.nnx_bridge.LinenLayer``, holding its variables; a
  nested registered application: ``models.create(...)`` in
  ``models.nnx_bridge.LinenModel``.
- Stateless layers and operations: the linen source's own expressions
  (plain jax / flax functions).

Each class takes the linen variables of its subtree (``{"params",
"batch_stats"}`` keyed like the linen module's), copies them into its NNX
variables (``LEAVES``: attribute, collection, linen path) and gives them
back with ``to_variables()``; ``create(variables)`` checks every array is
used once.
"""

from __future__ import annotations

import ast
import collections
import re
from typing import Any

from flax import nnx

from translate import layer_table
from translate.emit import (_fresh, _import_order, _shape_text, class_name,
                            wrap_source)
from translate.graph import Call, Graph, identifier
from translate.layer_table.base import Context, source_of

# The linen emitter's call kwargs that are not inputs of the call.
_IGNORED_KWARGS = ("training", "mask")

# Names a layer attribute must not take: nnx.Module's own, the class's.
_RESERVED = set(dir(nnx.Module)) | {"rngs", "variables", "to_variables",
                                    "LEAVES", "SUBMODULES", "self", "train"}


def _features(call: Call, channels_first: bool = False) -> int | None:
  """The channel count of the call's first tensor input."""
  arg = call.args[0]
  shape = arg[0].shape if isinstance(arg, list) else arg.shape
  d = shape[1] if channels_first and len(shape) > 2 else shape[-1]
  return None if d is None else int(d)


def _native(ctor: str, call: Call
            ) -> tuple[str, list[tuple[str, str, str]], dict[str, str]] | None:
  """``(nnx constructor, [(nnx leaf, collection, linen leaf)], {call
  keyword: source})`` for a linen constructor NNX has natively, else None.
  """
  node = ast.parse(ctor, mode="eval").body
  if not isinstance(node, ast.Call):
    return None
  func = ast.unparse(node.func)
  args = [ast.unparse(a) for a in node.args]
  try:
    kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords
          if k.arg != "use_running_average" and k.arg != "deterministic"}
  except ValueError:
    return None
  if any(k.arg is None for k in node.keywords):
    return None
  config = call.config or {}
  first = config.get("data_format", "channels_last") == "channels_first"

  def build(cls: str, positional: list[str], keywords: dict[str, Any]) -> str:
    parts = positional + [f"{k}={v!r}" for k, v in keywords.items()]
    return f"nnx.{cls}({', '.join(parts + ['rngs=rngs'])})"

  def kernel_bias(use_bias: bool) -> list[tuple[str, str, str]]:
    leaves = [("kernel", "params", "kernel")]
    return leaves + ([("bias", "params", "bias")] if use_bias else [])

  if func == "nn.Dense" and len(args) == 1 and set(kw) <= {"use_bias"}:
    n = _features(call)
    if n is None:
      return None
    return (build("Linear", [str(n), args[0]], kw),
            kernel_bias(kw.get("use_bias", True)), {})
  if func == "L.Conv" and len(args) == 2 and set(kw) <= {
      "strides", "padding", "kernel_dilation", "feature_group_count",
      "use_bias"}:
    n = _features(call, first)
    if n is None:
      return None
    return (build("Conv", [str(n), *args], kw),
            kernel_bias(kw.get("use_bias", True)), {})
  if func == "L.BatchNorm" and not args and set(kw) <= {
      "momentum", "epsilon", "use_bias", "use_scale"}:
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 \
        else axis
    rank = len(call.args[0].shape)
    if axis not in (-1, rank - 1):
      return None  # the bridge (and the linen source's transposes)
    n = _features(call)
    if n is None:
      return None
    keywords = {"momentum": kw.get("momentum", 0.99),
                "epsilon": kw.get("epsilon", 1e-3)}
    keywords.update({k: kw[k] for k in ("use_bias", "use_scale") if k in kw})
    keywords["use_fast_variance"] = False  # Keras' two-pass variance
    leaves = [("scale", "params", "scale")] if kw.get("use_scale", True) \
        else []
    if kw.get("use_bias", True):
      leaves.append(("bias", "params", "bias"))
    leaves += [("mean", "batch_stats", "mean"), ("var", "batch_stats", "var")]
    return (build("BatchNorm", [str(n)], keywords), leaves,
            {"use_running_average": "not train"})
  if (func == "normalization.LayerNormalization" and not args
      and set(kw) <= {"epsilon", "center", "scale"}):
    n = _features(call)
    if n is None:
      return None
    keywords = {"epsilon": kw.get("epsilon", 1e-3)}
    if not kw.get("center", True):
      keywords["use_bias"] = False
    if not kw.get("scale", True):
      keywords["use_scale"] = False
    keywords["use_fast_variance"] = False  # Keras' two-pass variance
    leaves = [("scale", "params", "scale")] if kw.get("scale", True) else []
    if kw.get("center", True):
      leaves.append(("bias", "params", "bias"))
    return build("LayerNorm", [str(n)], keywords), leaves, {}
  if func == "recurrent.Embedding" and len(args) == 2 and not kw:
    return (build("Embed", args, {}),
            [("embedding", "params", "embeddings")], {})
  if func == "nn.Dropout" and len(args) == 1 and set(kw) <= {
      "broadcast_dims"}:
    return build("Dropout", args, kw), [], {"deterministic": "not train"}
  return None


class _AddKeywords(ast.NodeTransformer):
  """Adds keywords to the calls of one callee; calls an inline linen
  module without variables (``Cls(...)(x)``) as ``Cls(...).apply({}, x)``."""

  def __init__(self, callee: str | None, keywords: dict[str, str]):
    self.callee, self.keywords = callee, keywords

  def visit_Call(self, node: ast.Call) -> ast.AST:
    self.generic_visit(node)
    if self.callee and ast.unparse(node.func) == self.callee:
      for k, v in self.keywords.items():
        node.keywords.append(ast.keyword(k, ast.parse(v, mode="eval").body))
    elif isinstance(node.func, ast.Call):
      inner = ast.unparse(node.func.func)
      if (not inner.startswith("self.") and
          inner.split(".")[-1][:1].isupper()):
        node.func = ast.Attribute(node.func, "apply", ast.Load())
        node.args.insert(0, ast.Dict([], []))
    return node


def _rewrite(expr: str, callee: str | None, keywords: dict[str, str]) -> str:
  if not keywords and ")(" not in expr:
    return expr
  tree = ast.parse(expr, mode="eval")
  tree = ast.fix_missing_locations(_AddKeywords(callee, keywords).visit(tree))
  return ast.unparse(tree)


class _Emitter:

  def __init__(self, detect):
    self.detect = detect  # nested model -> Application | None
    self.imports: set[str] = {"from flax import nnx",
                              "from models import nnx_bridge"}
    self.classes: dict[int, str] = {}
    self.class_sources: list[str] = []
    self.used_class_names: set[str] = set()
    self.native: collections.Counter = collections.Counter()
    self.bridged: collections.Counter = collections.Counter()

  def graph_class(self, graph: Graph) -> str:
    if id(graph.model) in self.classes:
      return self.classes[id(graph.model)]
    name = class_name(graph.name)
    base, n = name, 1
    while name in self.used_class_names:
      n += 1
      name = f"{base}{n}"
    self.used_class_names.add(name)
    self.classes[id(graph.model)] = name
    self.class_sources.append(self.write_class(graph, name))
    return name

  def write_class(self, graph: Graph, name: str) -> str:
    init: list[str] = []
    body: list[str] = []
    leaves: list[tuple[str, str, str]] = []
    children: list[tuple[str, str]] = []
    attrs: dict[int, str] = {}  # id(op) -> attribute
    taken = set(_RESERVED)
    uses = collections.Counter(id(c.op) for c in graph.calls
                               if c.kind != "op")
    for call in graph.calls:
      kwargs = {k: v for k, v in call.kwargs.items()
                if k not in _IGNORED_KWARGS}
      inputs = [source_of(a) for a in call.args]
      targets = ", ".join(o.var for o in call.outputs)
      if call.kind == "model":
        if id(call.op) not in attrs:
          attr = _fresh(identifier(call.name), taken)
          attrs[id(call.op)] = attr
          init.append(f"self.{attr} = {self.model_ctor(call)}")
          children.append((attr, call.name))
        inputs += [f"{k}={source_of(v)}" for k, v in kwargs.items()]
        body.append(f"{targets} = self.{attrs[id(call.op)]}("
                    f"{', '.join(inputs)}, train=train)")
        continue
      translation = layer_table.lookup(call.cls, call.kind)
      scratch: set[str] = set()  # the linen constructor's imports
      ctor = None
      if translation.module is not None:
        ctor = translation.module(call.config,
                                  Context(call.name, call, scratch))
      callee, keywords = None, {}
      if ctor is not None:
        native = _native(ctor, call)
        new = id(call.op) not in attrs
        if new:
          attr = _fresh(identifier(call.name), taken)
          attrs[id(call.op)] = attr
        attr = attrs[id(call.op)]
        shared = (f"  # shared: {uses[id(call.op)]} calls"
                  if uses[id(call.op)] > 1 else "")
        if native is not None:
          nnx_ctor, native_leaves, keywords = native
          callee = f"self.{attr}"
          if new:
            init.append(f"self.{attr} = {nnx_ctor}{shared}")
            leaves += [(f"{attr}.{leaf}", collection, f"{call.name}/{path}")
                       for leaf, collection, path in native_leaves]
            self.native[call.cls] += 1
        else:
          self.imports.update(scratch)
          callee = f"self.{attr}.bound(train)"
          if new:
            init.append(
                f"self.{attr} = nnx_bridge.LinenLayer(lambda train: {ctor}, "
                f"nnx_bridge.subtree(variables, {call.name!r}), "
                f"rngs=rngs){shared}")
            children.append((attr, call.name))
            self.bridged[call.cls] += 1
      ctx = Context(call.name, call, self.imports)
      ctx.kw_sources = {k: source_of(v) for k, v in kwargs.items()}
      expr = translation.call(call.config, callee, inputs, ctx)
      body.append(f"{targets} = {_rewrite(expr, callee, keywords)}")
    outs = [v.var for v in graph.outputs]
    body.append(f"return {outs[0]}" if graph.single_output
                else f"return [{', '.join(outs)}]")
    return self.wrap_class(graph, name, init, body, leaves, children)

  def model_ctor(self, call: Call) -> str:
    app = self.detect(call.op) if self.detect else None
    variables = f"nnx_bridge.subtree(variables, {call.name!r})"
    if app is not None:
      self.imports.add("import models")
      kwargs = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}"
                       for k, v in app.create_kwargs.items())
      self.bridged[f"application {app.spec_name}"] += 1
      return (f"nnx_bridge.LinenModel(models.create({app.spec_name!r}"
              f"{kwargs}), {variables}, rngs=rngs)")
    return f"{self.graph_class(call.graph)}({variables}, rngs=rngs)"

  def wrap_class(self, graph, name, init, body, leaves, children) -> str:
    args = ", ".join(v.var for v in graph.inputs)
    shapes = "; ".join(f"``{v.var}`` {_shape_text(v)}" for v in graph.inputs)
    outs = "; ".join(_shape_text(v) for v in graph.outputs)
    doc = (f'  """Keras {graph.cls} {graph.name!r} in Flax NNX.\n\n'
           f"  Inputs: {shapes}. Returns {outs}"
           f"{'' if graph.single_output else ' (a list, in Keras order)'}."
           "\n  ``train=True`` is Keras' training mode (BatchNorm on batch "
           "statistics,\n  its moving statistics updated in place; Dropout "
           "from ``rngs``).\n  \"\"\"")
    lines = [f"class {name}(nnx.Module):", doc, "",
             "  # (NNX variable, linen collection, linen path), native "
             "layers."]
    if leaves:
      lines.append("  LEAVES = (")
      lines += [f"      {leaf!r}," for leaf in leaves]
      lines.append("  )")
    else:
      lines.append("  LEAVES = ()")
    lines.append("  # (attribute, linen name): bridged or nested modules.")
    lines.append(f"  SUBMODULES = {tuple(children)!r}")
    lines += ["", "  def __init__(self, variables: dict, *, rngs: nnx.Rngs):"]
    lines += ["    " + line for line in init]
    lines += ["    nnx_bridge.load(self, variables, self.LEAVES)", "",
              f"  def __call__(self, {args}, train: bool = False):"]
    lines += ["    " + line for line in body]
    lines += ["", "  def to_variables(self) -> dict:",
              '    """The linen variables ``{"params", "batch_stats"}`` '
              '(current arrays)."""',
              "    return nnx_bridge.dump(self, self.LEAVES, self.SUBMODULES)"]
    return "\n".join(lines)


def _order(line: str) -> tuple[int, tuple[int, str]]:
  """``translate.emit``'s import order, ``from flax import nnx`` beside
  ``import flax.linen``."""
  key = _import_order(line.replace("from flax import nnx", "import flax.nnx"))
  return key[0], (0 if line.startswith("import") else 1, key[1])


def emit_nnx(graph: Graph, detect=None, header: str = "") -> str:
  """The NNX source of ``graph``: its classes (nested ones first) and
  ``create(variables, rngs=None)``, returning the outer module.

  Args:
    graph: from ``translate.graph.read_graph`` (translated by
      ``translate.emit.emit`` first, which refuses what has no translation).
    detect: nested model -> ``Application`` or None.
    header: the file's docstring text.
  """
  e = _Emitter(detect)
  name = e.graph_class(graph)
  text = "\n".join(e.class_sources)
  imports = set(e.imports)
  for line, alias in (("import flax.linen as nn", "nn"),
                      ("import jax.numpy as jnp", "jnp"),
                      ("import numpy as np", "np")):
    if re.search(rf"(?<![\w.]){alias}\.", text):
      imports.add(line)
    else:
      imports.discard(line)
  parts = [f'"""{header}\n"""' if header else None,
           "\n".join(sorted(imports, key=_order))]
  parts += e.class_sources
  parts.append(
      "def create(variables: dict, *, rngs: nnx.Rngs | None = None"
      f") -> {name}:\n"
      '  """The model holding ``variables`` (linen\'s: '
      "translate.load_variables);\n  Dropout draws from ``rngs`` (default "
      '``nnx.Rngs(0)``)."""\n'
      f"  model = {name}(variables, rngs=rngs if rngs is not None "
      "else nnx.Rngs(0))\n"
      "  nnx_bridge.check_same(variables, model.to_variables())\n"
      "  return model")
  return wrap_source("\n\n\n".join(p for p in parts if p) + "\n")


def summary(graph: Graph, detect=None) -> dict[str, dict[str, int]]:
  """``{"native": {class: count}, "bridged": {...}}`` of the NNX source."""
  e = _Emitter(detect)
  e.graph_class(graph)
  return {"native": dict(e.native), "bridged": dict(e.bridged)}
