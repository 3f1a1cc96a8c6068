"""Core layers: Dense, Conv2D, BatchNormalization, activations, Dropout,
shape layers, merging layers, 2D pooling, Rescaling, Embedding.

Semantics from ``keras/src/layers/``: Keras' defaults and arithmetic (the
BatchNorm epsilon 1e-3 and Keras' momentum, exact gelu, TF's "same"
padding), channels_last unless a layer's ``data_format`` says otherwise.
"""

from __future__ import annotations

from typing import Any

from translate.layer_table.base import (Context, LayerTranslation, lit, lit_value,
                                   refuse, register, require)
from models.recurrent import MASKING_UNSUPPORTED
from translate.keras_io import UnsupportedLayerError
from translate.rules import RULES, Rule

L_IMPORT = "from models import layers as L"
JNP = "import jax.numpy as jnp"

# Keras activation name -> source template ({x} the input).
_ACTIVATIONS = {
    "linear": "{x}",
    "relu": "nn.relu({x})",
    "relu6": "nn.relu6({x})",
    "sigmoid": "nn.sigmoid({x})",
    "tanh": "jnp.tanh({x})",
    "softmax": "nn.softmax({x}, axis=-1)",
    "log_softmax": "nn.log_softmax({x}, axis=-1)",
    "swish": "nn.silu({x})",
    "silu": "nn.silu({x})",
    "gelu": "nn.gelu({x}, approximate=False)",  # Keras' gelu is exact
    "elu": "nn.elu({x})",
    "selu": "nn.selu({x})",
    "softplus": "nn.softplus({x})",
    "softsign": "nn.soft_sign({x})",
    "exponential": "jnp.exp({x})",
    # Keras 3: relu6(x + 3) / 6; hard_silu is x times that.
    "hard_sigmoid": "(nn.relu6({x} + 3.0) / 6.0)",
    "hard_silu": "({x} * nn.relu6({x} + 3.0) / 6.0)",
    "hard_swish": "({x} * nn.relu6({x} + 3.0) / 6.0)",
    "leaky_relu": "nn.leaky_relu({x}, negative_slope=0.2)",
    "mish": "({x} * jnp.tanh(nn.softplus({x})))",
}


def activation_source(name: Any, x: str, ctx: Context) -> str:
  """Source applying the Keras activation ``name`` to expression ``x``."""
  if isinstance(name, dict):  # a serialized function: custom or built in
    name = name.get("config", name.get("class_name"))
  if name is None:
    name = "linear"
  if name not in _ACTIVATIONS:
    raise refuse(ctx, f"activation {name!r}",
                 f"use one of {sorted(_ACTIVATIONS)}")
  template = _ACTIVATIONS[name]
  if "jnp." in template:
    ctx.need(JNP)
  return template.format(x=x)


def _channels_first(config: dict[str, Any]) -> bool:
  return config.get("data_format", "channels_last") == "channels_first"


def to_last(x: str, rank: int, ctx: Context) -> str:
  """``x`` (channels first, ``rank`` axes with the batch) as channels last."""
  ctx.need(JNP)
  return f"jnp.moveaxis({x}, 1, -1)" if rank > 2 else x


def to_first(x: str, rank: int, ctx: Context) -> str:
  ctx.need(JNP)
  return f"jnp.moveaxis({x}, -1, 1)" if rank > 2 else x


def in_rank(ctx: Context) -> int:
  """The rank (with the batch axis) of the call's first tensor input."""
  return len(ctx.call.args[0].shape) if not isinstance(
      ctx.call.args[0], list) else len(ctx.call.args[0][0].shape)


def ignore_initializers(config: dict[str, Any]) -> None:
  """Initializers, regularizers and constraints do not change the function
  of a layer whose weights are given (they matter only to Keras' own
  training)."""


# --- Dense -------------------------------------------------------------------

def _dense_module(config, ctx):
  require(config, ctx, lora_rank=(None, 0), quantization_config=(None,))
  bias = "" if config.get("use_bias", True) else ", use_bias=False"
  return f"nn.Dense({config['units']}{bias})"


register("Dense", LayerTranslation(
    module=_dense_module,
    call=lambda config, callee, inputs, ctx: activation_source(
        config.get("activation"), f"{callee}({inputs[0]})", ctx),
    rules=RULES["Dense"]))


# --- Conv2D --------------------------------------------------------------------

def _padding(config: dict[str, Any], ctx: Context) -> str:
  padding = config.get("padding", "valid")
  if padding not in ("valid", "same"):
    raise refuse(ctx, f"padding={padding!r}", "use 'valid' or 'same'")
  return padding.upper()  # TF's "same" is Flax's "SAME", strides included


def _conv2d_module(config, ctx):
  require(config, ctx, lora_rank=(None, 0))
  kernel = lit(config["kernel_size"])
  args = [str(config["filters"]), kernel]
  if lit_value(config.get("strides", (1, 1))) != (1, 1):
    args.append(f"strides={lit(config['strides'])}")
  args.append(f"padding={_padding(config, ctx)!r}")
  if lit_value(config.get("dilation_rate", (1, 1))) not in ((1, 1), 1):
    args.append(f"kernel_dilation={lit(config['dilation_rate'])}")
  if config.get("groups", 1) != 1:
    args.append(f"feature_group_count={config['groups']}")
  if not config.get("use_bias", True):
    args.append("use_bias=False")
  ctx.need(L_IMPORT)
  return f"L.Conv({', '.join(args)})"


def _conv2d_call(config, callee, inputs, ctx):
  x = inputs[0]
  if _channels_first(config):
    out = f"{callee}({to_last(x, 4, ctx)})"
    out = activation_source(config.get("activation"), out, ctx)
    return to_first(out, 4, ctx)
  return activation_source(config.get("activation"), f"{callee}({x})", ctx)


register("Conv2D", LayerTranslation(module=_conv2d_module,
                                    call=_conv2d_call,
                                    rules=RULES["Conv2D"]))


# --- BatchNormalization ------------------------------------------------------

def _bn_axis(config: dict[str, Any]) -> int:
  axis = config.get("axis", -1)
  if isinstance(axis, (list, tuple)):
    if len(axis) != 1:
      return 99  # several axes: refused below
    axis = axis[0]
  return int(axis)


def _bn_module(config, ctx):
  require(config, ctx, renorm=(False,), synchronized=(False,),
          virtual_batch_size=(None,), adjustment=(None,))
  axis = _bn_axis(config)
  rank = in_rank(ctx)
  if axis not in (-1, rank - 1, 1):
    raise refuse(ctx, f"axis={config.get('axis')!r}",
                 "normalize the channels axis (-1, or 1 for channels_first)")
  args = ["use_running_average=not train",
          f"momentum={config.get('momentum', 0.99)!r}",
          f"epsilon={config.get('epsilon', 1e-3)!r}"]
  if not config.get("center", True):
    args.append("use_bias=False")
  if not config.get("scale", True):
    args.append("use_scale=False")
  # tf-keras sends 4D float inputs on the channels axis to TF's fused kernel,
  # whose training arithmetic differs (models.layers.BatchNorm).
  if (type(ctx.call.op).__module__.startswith("tf_keras") and rank == 4
      and config.get("fused") is not False):
    args.append('arithmetic="tf_fused"')
  ctx.need(L_IMPORT)
  return f"L.BatchNorm({', '.join(args)})"


def _bn_call(config, callee, inputs, ctx):
  rank = in_rank(ctx)
  axis = _bn_axis(config)
  if axis == 1 and rank > 2:
    return to_first(f"{callee}({to_last(inputs[0], rank, ctx)})", rank, ctx)
  return f"{callee}({inputs[0]})"


register("BatchNormalization", LayerTranslation(
    module=_bn_module, call=_bn_call, rules=RULES["BatchNormalization"]))


# --- Activations ---------------------------------------------------------------

register("Activation", LayerTranslation(
    call=lambda config, callee, inputs, ctx: activation_source(
        config["activation"], inputs[0], ctx)))


def _relu(config, callee, inputs, ctx):
  x = inputs[0]
  max_value = config.get("max_value")
  slope = float(config.get("negative_slope", 0.0) or 0.0)
  threshold = float(config.get("threshold", 0.0) or 0.0)
  if max_value is None and slope == 0.0 and threshold == 0.0:
    return f"nn.relu({x})"
  ctx.need(JNP)
  # keras.activations.relu: x >= threshold -> x (capped at max_value),
  # else negative_slope * (x - threshold).
  below = "0.0" if slope == 0.0 else f"{slope!r} * ({x} - {threshold!r})"
  above = x if max_value is None else f"jnp.minimum({x}, {float(max_value)!r})"
  return f"jnp.where({x} >= {threshold!r}, {above}, {below})"


register("ReLU", LayerTranslation(call=_relu))
register("LeakyReLU", LayerTranslation(
    call=lambda config, callee, inputs, ctx: (
        f"nn.leaky_relu({inputs[0]}, negative_slope="
        f"{float(config.get('negative_slope', config.get('alpha', 0.3)))!r})")))
register("ELU", LayerTranslation(
    call=lambda config, callee, inputs, ctx: (
        f"nn.elu({inputs[0]}, alpha={float(config.get('alpha', 1.0))!r})")))


def _prelu_module(config, ctx):
  ctx.need("from models.keras_layers import activations")
  shared = lit_value(config.get("shared_axes")) or ()
  shared = (shared,) if isinstance(shared, int) else tuple(shared)
  ndim = len(ctx.call.args[0].shape)
  shared = tuple(sorted(a % ndim for a in shared))  # Keras counts from 0
  return (f"activations.PReLU(shared_axes={shared!r})" if shared
          else "activations.PReLU()")


register("PReLU", LayerTranslation(
    module=_prelu_module,
    call=lambda config, callee, inputs, ctx: f"{callee}({inputs[0]})",
    rules={"alpha": Rule("params", "alpha")}))


def _softmax(config, callee, inputs, ctx):
  if len(inputs) > 1 or ctx.kw_sources.get("mask"):
    raise refuse(ctx, "a mask", "call Softmax without a mask")
  axis = config.get("axis", -1)
  return f"nn.softmax({inputs[0]}, axis={lit(axis)})"


register("Softmax", LayerTranslation(call=_softmax))


# --- Dropout -----------------------------------------------------------------

def _dropout_module(config, ctx, spatial_axes=()):
  rate = float(config["rate"])
  noise = config.get("noise_shape")
  dims = tuple(spatial_axes)
  if noise is not None:
    dims = tuple(i for i, d in enumerate(noise) if d == 1)
  extra = f", broadcast_dims={dims!r}" if dims else ""
  return f"nn.Dropout({rate!r}{extra}, deterministic=not train)"


register("Dropout", LayerTranslation(
    module=_dropout_module,
    call=lambda config, callee, inputs, ctx: f"{callee}({inputs[0]})"))


def _spatial_dropout(rank):
  def module(config, ctx):
    first = _channels_first(config)
    axes = tuple(range(2, rank + 2)) if first else tuple(range(1, rank + 1))
    return _dropout_module({**config, "noise_shape": None}, ctx, axes)
  return module


for _rank in (1, 2, 3):
  register(f"SpatialDropout{_rank}D", LayerTranslation(
      module=_spatial_dropout(_rank),
      call=lambda config, callee, inputs, ctx: f"{callee}({inputs[0]})"))


# --- Shapes --------------------------------------------------------------------

def _flatten(config, callee, inputs, ctx):
  x = inputs[0]
  rank = in_rank(ctx)
  if _channels_first(config) and rank > 2:
    x = to_last(x, rank, ctx)
  return f"{x}.reshape(({x}).shape[0], -1)" if x == inputs[0] else (
      f"({x}).reshape(({x}).shape[0], -1)")


register("Flatten", LayerTranslation(call=_flatten))
register("Reshape", LayerTranslation(
    call=lambda config, callee, inputs, ctx: (
        f"{inputs[0]}.reshape(({inputs[0]}).shape[0], "
        f"*{lit(config['target_shape'])})")))


def _permute(config, callee, inputs, ctx):
  ctx.need(JNP)
  dims = (0, *[int(d) for d in config["dims"]])
  return f"jnp.transpose({inputs[0]}, {dims!r})"


register("Permute", LayerTranslation(call=_permute))


def _repeat_vector(config, callee, inputs, ctx):
  ctx.need(JNP)
  return f"jnp.repeat({inputs[0]}[:, None, :], {int(config['n'])}, axis=1)"


register("RepeatVector", LayerTranslation(call=_repeat_vector))


# --- Merging -------------------------------------------------------------------

def _listed(inputs: list[str]) -> list[str]:
  """A merging layer is called with one list: ``[a, b]`` -> ``["a", "b"]``."""
  text = inputs[0]
  assert text.startswith("[") and text.endswith("]"), text
  return [s.strip() for s in text[1:-1].split(",") if s.strip()]


def _reduce(op: str):
  def call(config, callee, inputs, ctx):
    xs = _listed(inputs)
    return "(" + f" {op} ".join(xs) + ")"
  return call


register("Add", LayerTranslation(call=_reduce("+")))
register("Multiply", LayerTranslation(call=_reduce("*")))


def _subtract(config, callee, inputs, ctx):
  a, b = _listed(inputs)
  return f"({a} - {b})"


register("Subtract", LayerTranslation(call=_subtract))


def _fold(fn: str):
  def call(config, callee, inputs, ctx):
    ctx.need(JNP)
    xs = _listed(inputs)
    out = xs[0]
    for x in xs[1:]:
      out = f"{fn}({out}, {x})"
    return out
  return call


register("Maximum", LayerTranslation(call=_fold("jnp.maximum")))
register("Minimum", LayerTranslation(call=_fold("jnp.minimum")))


def _average(config, callee, inputs, ctx):
  xs = _listed(inputs)
  return "((" + " + ".join(xs) + f") / {len(xs)})"


register("Average", LayerTranslation(call=_average))


def _concatenate(config, callee, inputs, ctx):
  ctx.need(JNP)
  return f"jnp.concatenate({inputs[0]}, axis={int(config.get('axis', -1))})"


register("Concatenate", LayerTranslation(call=_concatenate))


# --- Global pooling and 2D pooling -------------------------------------------

def _global_pool(fn: str, rank: int):
  def call(config, callee, inputs, ctx):
    ctx.need(JNP)
    first = _channels_first(config)
    axes = tuple(range(2, rank + 2)) if first else tuple(range(1, rank + 1))
    keep = ", keepdims=True" if config.get("keepdims") else ""
    return f"{fn}({inputs[0]}, axis={axes!r}{keep})"
  return call


for _rank in (1, 2, 3):
  register(f"GlobalAveragePooling{_rank}D", LayerTranslation(
      call=_global_pool("jnp.mean", _rank)))
  register(f"GlobalMaxPooling{_rank}D", LayerTranslation(
      call=_global_pool("jnp.max", _rank)))


def _pool2d(kind: str):
  def call(config, callee, inputs, ctx):
    ctx.need(L_IMPORT)
    pool = lit(config.get("pool_size", (2, 2)))
    strides = config.get("strides") or config.get("pool_size", (2, 2))
    padding = _padding(config, ctx)
    x = inputs[0]
    if _channels_first(config):
      return to_first(f"L.{kind}({to_last(x, 4, ctx)}, {pool}, "
                      f"{lit(strides)}, {padding!r})", 4, ctx)
    return f"L.{kind}({x}, {pool}, {lit(strides)}, {padding!r})"
  return call


register("MaxPooling2D", LayerTranslation(call=_pool2d("max_pool")))
register("AveragePooling2D", LayerTranslation(call=_pool2d("avg_pool")))


def _zero_pad2d(config, callee, inputs, ctx):
  ctx.need(JNP)
  pad = lit_value(config.get("padding", 1))
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  elif isinstance(pad[0], int):
    pad = ((pad[0], pad[0]), (pad[1], pad[1]))
  if _channels_first(config):
    pads = ((0, 0), (0, 0), *pad)
  else:
    pads = ((0, 0), *pad, (0, 0))
  return f"jnp.pad({inputs[0]}, {tuple(tuple(p) for p in pads)!r})"


register("ZeroPadding2D", LayerTranslation(call=_zero_pad2d))


# --- Rescaling, Embedding --------------------------------------------------------

def _rescaling(config, callee, inputs, ctx):
  ctx.need(JNP)
  scale, offset = lit_value(config["scale"]), lit_value(config["offset"])
  x = inputs[0]
  s = (f"jnp.asarray({scale!r}, {x}.dtype)" if isinstance(scale, tuple)
       else repr(float(scale)))
  o = (f"jnp.asarray({offset!r}, {x}.dtype)" if isinstance(offset, tuple)
       else repr(float(offset)))
  return f"({x} * {s} + {o})"


register("Rescaling", LayerTranslation(call=_rescaling))


def _embedding_module(config, ctx):
  if config.get("mask_zero"):
    raise UnsupportedLayerError(
        f"Keras layer {ctx.name!r} (Embedding) has mask_zero=True: "
        f"{MASKING_UNSUPPORTED}")
  require(config, ctx, lora_rank=(None, 0), quantization_config=(None,))
  ctx.need("from models import recurrent")
  return (f"recurrent.Embedding({int(config['input_dim'])}, "
          f"{int(config['output_dim'])})")


register("Embedding", LayerTranslation(
    module=_embedding_module,
    call=lambda config, callee, inputs, ctx: f"{callee}({inputs[0]})",
    rules=RULES["Embedding"]))
