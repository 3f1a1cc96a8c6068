"""``keras.ops`` operations of a functional graph (keys ``"ops.<Class>"``).

A ``keras.ops`` call on a symbolic tensor is a node whose operation's
``get_config()`` holds its options (``Mean``: ``axis``, ``keepdims``) and
whose arguments hold tensors and constants (``keras.ops.add(x, 1.0)``:
``Add`` with ``(x, 1.0)``; ``x[:, :2]``: ``GetItem`` with a tuple of
slices). Each becomes one ``jnp`` / ``jax.nn`` expression computing what
``keras/src/ops/`` computes: Keras' defaults (``gelu`` approximate unless
the config says not), numpy's semantics where Keras follows numpy, and the
same dtypes (int inputs stay int where Keras keeps them int).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from translate.graph import Value
from translate.layer_table.base import (Context, LayerTranslation, lit,
                                        refuse, register)

JNP = "import jax.numpy as jnp"
JAX = "import jax"
NP = "import numpy as np"

# A constant tensor argument (computed eagerly, outside the graph) is
# written into the source as a literal up to this many elements.
MAX_CONSTANT_ELEMENTS = 4096


def _source(x: Any, ctx: Context) -> str:
  """Source of one argument: a tensor's name, a constant's literal."""
  # Imported here: translate.emit imports this table.
  from translate.layer_table.base import source_of  # pylint: disable=g-import-not-at-top
  if isinstance(x, Value):
    return x.var
  if isinstance(x, (list, tuple)):
    inner = [_source(v, ctx) for v in x]
    if isinstance(x, list):
      return "[" + ", ".join(inner) + "]"
    return f"({inner[0]},)" if len(inner) == 1 else f"({', '.join(inner)})"
  if hasattr(x, "numpy") and hasattr(x, "dtype") and hasattr(x, "shape"):
    x = np.asarray(x.numpy())  # an eager tensor (TF, JAX or torch)
  if isinstance(x, np.ndarray) or type(x).__module__ == "numpy":
    size = int(np.size(x))
    if size > MAX_CONSTANT_ELEMENTS:
      raise refuse(ctx, f"a constant tensor argument of {size} elements",
                   "compute it from the model's inputs with keras.ops, or "
                   "keep it in a layer's weight")
    ctx.need(NP)
    return source_of(np.asarray(x))
  return source_of(x)


def _arguments(ctx: Context) -> list[Any]:
  """The op's call arguments in its ``call`` signature's order (defaults
  filled, ``*operands`` spread)."""
  op = ctx.call.op
  signature = inspect.signature(type(op).call)
  bound = signature.bind(op, *ctx.call.args, **ctx.call.kwargs)
  bound.apply_defaults()
  out = []
  for name, param in signature.parameters.items():
    if name == "self" or param.kind is param.VAR_KEYWORD:
      continue
    value = bound.arguments.get(name)
    if param.kind is param.VAR_POSITIONAL:
      out.extend(value)
    else:
      out.append(value)
  return out


def _op(template: Callable[..., str], *imports: str) -> LayerTranslation:
  """A translation from ``template(config, ctx, *argument sources)``."""

  def call(config, callee, inputs, ctx):
    for line in imports:
      ctx.need(line)
    args = [_source(a, ctx) for a in _arguments(ctx)]
    return template(config, ctx, *args)

  return LayerTranslation(call=call)


def _kw(config: dict[str, Any], *keys: str, **defaults: Any) -> str:
  """``", axis=1, keepdims=True"`` for the config entries that are not
  at their Keras default."""
  out = ""
  for key in keys:
    if key in config and config[key] != defaults.get(key, object()):
      out += f", {key}={lit(config[key])}"
  return out


# --- Elementwise -------------------------------------------------------------

_INFIX = {"Add": "+", "Subtract": "-", "Multiply": "*", "Divide": "/",
          "TrueDivide": "/"}
for _cls, _sym in _INFIX.items():
  register(f"ops.{_cls}", _op(
      lambda config, ctx, a, b, s=_sym: f"({a} {s} {b})"))

_BINARY = {"Power": "jnp.power", "Maximum": "jnp.maximum",
           "Minimum": "jnp.minimum", "Matmul": "jnp.matmul",
           "FloorDivide": "jnp.floor_divide", "Mod": "jnp.mod",
           "Greater": "jnp.greater", "GreaterEqual": "jnp.greater_equal",
           "Less": "jnp.less", "LessEqual": "jnp.less_equal",
           "Equal": "jnp.equal", "NotEqual": "jnp.not_equal",
           "LogicalAnd": "jnp.logical_and", "LogicalOr": "jnp.logical_or"}
for _cls, _fn in _BINARY.items():
  register(f"ops.{_cls}", _op(
      lambda config, ctx, a, b, f=_fn: f"{f}({a}, {b})", JNP))

_UNARY = {"Absolute": "jnp.abs", "Exp": "jnp.exp", "Log": "jnp.log",
          "Sqrt": "jnp.sqrt", "Square": "jnp.square",
          "Negative": "jnp.negative", "Rsqrt": "jax.lax.rsqrt",
          "Reciprocal": "jnp.reciprocal", "Sin": "jnp.sin",
          "Cos": "jnp.cos", "Floor": "jnp.floor", "Sign": "jnp.sign",
          "Erf": "jax.scipy.special.erf", "Tanh": "jnp.tanh",
          "LogicalNot": "jnp.logical_not",
          # keras.ops nn: jax.nn has the same formulas.
          "Relu": "jax.nn.relu", "Relu6": "jax.nn.relu6",
          "Sigmoid": "jax.nn.sigmoid", "Silu": "jax.nn.silu",
          "Softplus": "jax.nn.softplus"}
for _cls, _fn in _UNARY.items():
  _need = (JNP,) if _fn.startswith("jnp.") else (JAX,)
  if _fn.startswith("jax.scipy"):
    _need = ("import jax.scipy.special",)
  register(f"ops.{_cls}", _op(
      lambda config, ctx, x, f=_fn: f"{f}({x})", *_need))

def _gelu(config, ctx, x):
  approximate = bool(config.get("approximate", True))  # keras.ops' default
  return f"jax.nn.gelu({x}, approximate={approximate!r})"


register("ops.Gelu", _op(_gelu, JAX))
register("ops.LeakyRelu", _op(
    lambda config, ctx, x: (
        f"jax.nn.leaky_relu({x}, negative_slope="
        f"{float(config.get('negative_slope', 0.2))!r})"), JAX))
register("ops.Softmax", _op(
    lambda config, ctx, x: (
        f"jax.nn.softmax({x}, axis={lit(config.get('axis', -1))})"), JAX))
register("ops.LogSoftmax", _op(
    lambda config, ctx, x: (
        f"jax.nn.log_softmax({x}, axis={lit(config.get('axis', -1))})"), JAX))
register("ops.Cast", _op(
    lambda config, ctx, x: f"{x}.astype({_dtype(config['dtype'])!r})"))
register("ops.Clip", _op(
    lambda config, ctx, x: (f"jnp.clip({x}, {lit(config['x_min'])}, "
                            f"{lit(config['x_max'])})"), JNP))


def _dtype(dtype: Any) -> str:
  """A dtype name (``"float32"``) from a Keras config entry."""
  if isinstance(dtype, dict):  # a serialized DTypePolicy
    dtype = dtype.get("config", {}).get("name", dtype)
  return str(getattr(dtype, "name", dtype))


def _where(config, ctx, condition, x1, x2):
  if x1 == "None" or x2 == "None":
    raise refuse(ctx, "where(condition) without x1 and x2",
                 "give both branches (keras.ops.where(c, x1, x2))")
  return f"jnp.where({condition}, {x1}, {x2})"


register("ops.Where", _op(_where, JNP))


def _like(fn: str):
  def template(config, ctx, x):
    dtype = config.get("dtype")
    extra = f", dtype={_dtype(dtype)!r}" if dtype is not None else ""
    return f"{fn}({x}{extra})"
  return template


register("ops.OnesLike", _op(_like("jnp.ones_like"), JNP))
register("ops.ZerosLike", _op(_like("jnp.zeros_like"), JNP))


def _cumsum(config, ctx, x):
  dtype = config.get("dtype")
  extra = f", dtype={_dtype(dtype)!r}" if dtype is not None else ""
  return f"jnp.cumsum({x}, axis={lit(config.get('axis'))}{extra})"


register("ops.Cumsum", _op(_cumsum, JNP))


# --- Reductions --------------------------------------------------------------

def _reduce(fn: str, *keys: str):
  def template(config, ctx, x):
    return (f"{fn}({x}, axis={lit(config.get('axis'))}"
            f"{_kw(config, *keys, keepdims=False, initial=None)})")
  return template


for _cls, _fn in (("Mean", "jnp.mean"), ("Sum", "jnp.sum"), ("Any", "jnp.any"),
                  ("All", "jnp.all"), ("Var", "jnp.var"), ("Std", "jnp.std"),
                  ("Argmax", "jnp.argmax"), ("Argmin", "jnp.argmin")):
  register(f"ops.{_cls}", _op(_reduce(_fn, "keepdims"), JNP))
for _cls, _fn in (("Max", "jnp.max"), ("Min", "jnp.min")):
  register(f"ops.{_cls}", _op(_reduce(_fn, "keepdims", "initial"), JNP))


# --- Shapes ------------------------------------------------------------------

def _index(key: Any, ctx: Context) -> str:
  """``x[...]``'s inside: slices as ``a:b:c``, ``...``, ``None``."""
  if isinstance(key, tuple):
    parts = [_index(k, ctx) for k in key]
    return parts[0] + "," if len(parts) == 1 else ", ".join(parts)
  if isinstance(key, slice):
    bounds = ["" if b is None else _source(b, ctx)
              for b in (key.start, key.stop, key.step)]
    return ":".join(bounds[:2]) + (f":{bounds[2]}" if bounds[2] else "")
  if key is Ellipsis:
    return "..."
  return _source(key, ctx)


def _get_item(config, callee, inputs, ctx):
  x, key = _arguments(ctx)
  return f"{_source(x, ctx)}[{_index(key, ctx)}]"


register("ops.GetItem", LayerTranslation(call=_get_item))

register("ops.ExpandDims", _op(
    lambda config, ctx, x: f"jnp.expand_dims({x}, {lit(config['axis'])})",
    JNP))
register("ops.Squeeze", _op(
    lambda config, ctx, x: f"jnp.squeeze({x}, axis={lit(config.get('axis'))})",
    JNP))
register("ops.Reshape", _op(  # newshape includes the batch axis
    lambda config, ctx, x: f"jnp.reshape({x}, {lit(config['newshape'])})",
    JNP))
register("ops.Transpose", _op(
    lambda config, ctx, x: (
        f"jnp.transpose({x}, {lit(config.get('axes'))})"), JNP))
register("ops.Moveaxis", _op(
    lambda config, ctx, x: (f"jnp.moveaxis({x}, {lit(config['source'])}, "
                            f"{lit(config['destination'])})"), JNP))
register("ops.Flip", _op(
    lambda config, ctx, x: f"jnp.flip({x}, axis={lit(config.get('axis'))})",
    JNP))
register("ops.Repeat", _op(
    lambda config, ctx, x: (f"jnp.repeat({x}, {lit(config['repeats'])}, "
                            f"axis={lit(config.get('axis'))})"), JNP))
register("ops.Tile", _op(
    lambda config, ctx, x: f"jnp.tile({x}, {lit(config['repeats'])})", JNP))
register("ops.Stack", _op(
    lambda config, ctx, xs: (
        f"jnp.stack({xs}, axis={int(config.get('axis', 0))})"), JNP))
register("ops.Concatenate", _op(
    lambda config, ctx, xs: (
        f"jnp.concatenate({xs}, axis={int(config.get('axis', 0))})"), JNP))
register("ops.Split", _op(
    lambda config, ctx, x: (
        f"jnp.split({x}, {lit(config['indices_or_sections'])}, "
        f"axis={int(config.get('axis', 0))})"), JNP))
register("ops.Einsum", _op(
    lambda config, ctx, *xs: (
        f"jnp.einsum({config['subscripts']!r}, {', '.join(xs)})"), JNP))


def _one_hot(config, ctx, x):
  if config.get("sparse"):
    raise refuse(ctx, "sparse=True", "use sparse=False")
  dtype = _dtype(config.get("dtype") or "float32")
  return (f"jax.nn.one_hot({x}, {int(config['num_classes'])}, "
          f"dtype={dtype!r}, axis={int(config.get('axis', -1))})")


register("ops.OneHot", _op(_one_hot, JAX))
