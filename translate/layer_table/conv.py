"""Convolutions beyond Conv2D: Conv1D, Conv3D, DepthwiseConv1D/2D,
SeparableConv1D/2D and Conv1DTranspose/Conv2DTranspose.

Plain, grouped and depthwise ones become ``models.layers.Conv`` (a
``flax.linen.Conv``: the CPU fast forms and ``translate.fold_batchnorm``
apply), an undilated SeparableConv2D ``models.layers.SeparableConv``; the
rest ``models.keras_layers.conv`` (Keras' arithmetic). Keras' kernels keep
their layout (the transposed ones too: ``(*kernel_size, filters, in)``)
except the depthwise ones, Keras' ``(*k, c, m)`` against Flax's grouped
``(*k, 1, c * m)`` (the rules in ``translate.rules.RULES``). Each runs
channels last; a ``channels_first`` layer is transposed around it.
"""

from __future__ import annotations

from translate.layer_table.base import LayerTranslation, lit_value
from translate.layer_table.base import refuse, register, require
from translate.layer_table.core import (L_IMPORT, _channels_first, _padding,
                                        activation_source,
                                        to_first, to_last)
from translate.rules import RULES, Rule

IMPORT = "from models.keras_layers import conv"

_KERNEL_BIAS = {"kernel": Rule("params", "kernel"),
                "bias": Rule("params", "bias")}


def _tuple(value, n):
  value = lit_value(value)
  return tuple(value) if isinstance(value, tuple) else (value,) * n


def _causal_or_padding(config, ctx, n):
  """``nn.Conv``'s padding: ``"SAME"``/``"VALID"``, or Conv1D's causal one
  as explicit pairs (Keras builds no other causal convolution of these)."""
  if config.get("padding", "valid") != "causal":
    return repr(_padding(config, ctx))
  if n != 1:
    raise refuse(ctx, "padding='causal'", "use 'valid' or 'same'")
  k = _tuple(config["kernel_size"], 1)[0]
  d = _tuple(config.get("dilation_rate", 1), 1)[0]
  return f"(({d * (k - 1)}, 0),)"  # all on the left: keras causal


def _channels_last_call(n: int):
  """The call of an ``n``-D convolution module: channels last inside, then
  the activation."""
  def call(config, callee, inputs, ctx):
    x = inputs[0]
    if _channels_first(config):
      out = activation_source(config.get("activation"),
                              f"{callee}({to_last(x, n + 2, ctx)})", ctx)
      return to_first(out, n + 2, ctx)
    return activation_source(config.get("activation"), f"{callee}({x})",
                             ctx)
  return call


def _conv_nd(n: int):
  def module(config, ctx):
    require(config, ctx, lora_rank=(None, 0))
    args = [str(config["filters"]), repr(_tuple(config["kernel_size"], n))]
    strides = _tuple(config.get("strides", 1), n)
    if strides != (1,) * n:
      args.append(f"strides={strides!r}")
    args.append(f"padding={_causal_or_padding(config, ctx, n)}")
    dilation = _tuple(config.get("dilation_rate", 1), n)
    if dilation != (1,) * n:
      args.append(f"kernel_dilation={dilation!r}")
    if config.get("groups", 1) != 1:
      args.append(f"feature_group_count={config['groups']}")
    if not config.get("use_bias", True):
      args.append("use_bias=False")
    ctx.need(L_IMPORT)
    return f"L.Conv({', '.join(args)})"
  return module


for _n in (1, 3):
  register(f"Conv{_n}D", LayerTranslation(
      module=_conv_nd(_n), call=_channels_last_call(_n), rules=_KERNEL_BIAS))


def _depthwise_nd(n: int):
  def module(config, ctx):
    require(config, ctx, lora_rank=(None, 0))
    channels = ctx.call.args[0].shape[1 if _channels_first(config) else -1]
    m = int(config.get("depth_multiplier", 1))
    args = [str(channels * m), repr(_tuple(config["kernel_size"], n))]
    strides = _tuple(config.get("strides", 1), n)
    if strides != (1,) * n:
      args.append(f"strides={strides!r}")
    args.append(f"padding={_causal_or_padding(config, ctx, n)}")
    dilation = _tuple(config.get("dilation_rate", 1), n)
    if dilation != (1,) * n:
      args.append(f"kernel_dilation={dilation!r}")
    args.append(f"feature_group_count={channels}")
    if not config.get("use_bias", True):
      args.append("use_bias=False")
    ctx.need(L_IMPORT)
    return f"L.Conv({', '.join(args)})"
  return module


for _n in (1, 2):
  register(f"DepthwiseConv{_n}D", LayerTranslation(
      module=_depthwise_nd(_n), call=_channels_last_call(_n),
      rules=RULES[f"DepthwiseConv{_n}D"]))


def _separable_nd(n: int):
  def module(config, ctx):
    require(config, ctx, lora_rank=(None, 0))
    args = [str(config["filters"]), repr(_tuple(config["kernel_size"], n))]
    strides = _tuple(config.get("strides", 1), n)
    if strides != (1,) * n:
      args.append(f"strides={strides!r}")
    dilation = _tuple(config.get("dilation_rate", 1), n)
    padding = config.get("padding", "valid")
    if n == 2 and dilation == (1, 1):  # the CPU-fast models.layers form
      args.append(f"padding={_padding(config, ctx)!r}")
      cls = "L.SeparableConv"
      ctx.need(L_IMPORT)
    else:
      if padding not in ("valid", "same") and not (
          n == 1 and padding == "causal"):  # tf-keras' SeparableConv1D
        raise refuse(ctx, f"padding={padding!r}", "use 'valid' or 'same'")
      args.append(f"padding={padding!r}")
      if dilation != (1,) * n:
        args.append(f"dilation_rate={dilation!r}")
      cls = f"conv.SeparableConv{n}D"
      ctx.need(IMPORT)
    if int(config.get("depth_multiplier", 1)) != 1:
      args.append(f"depth_multiplier={int(config['depth_multiplier'])}")
    if not config.get("use_bias", True):
      args.append("use_bias=False")
    return f"{cls}({', '.join(args)})"
  return module


for _n in (1, 2):
  register(f"SeparableConv{_n}D", LayerTranslation(
      module=_separable_nd(_n), call=_channels_last_call(_n),
      rules=RULES[f"SeparableConv{_n}D"]))


def _transpose_nd(n: int):
  def module(config, ctx):
    padding = config.get("padding", "valid")
    if padding not in ("valid", "same"):
      raise refuse(ctx, f"padding={padding!r}", "use 'valid' or 'same'")
    args = [str(config["filters"]), repr(_tuple(config["kernel_size"], n))]
    strides = _tuple(config.get("strides", 1), n)
    if strides != (1,) * n:
      args.append(f"strides={strides!r}")
    args.append(f"padding={padding!r}")
    if config.get("output_padding") is not None:
      args.append(
          f"output_padding={_tuple(config['output_padding'], n)!r}")
    dilation = _tuple(config.get("dilation_rate", 1), n)
    if dilation != (1,) * n:
      args.append(f"dilation_rate={dilation!r}")
    if not config.get("use_bias", True):
      args.append("use_bias=False")
    ctx.need(IMPORT)
    return f"conv.Conv{n}DTranspose({', '.join(args)})"
  return module


for _n in (1, 2):
  # Keras' transposed kernel (*k, filters, in) is kept as it is.
  register(f"Conv{_n}DTranspose", LayerTranslation(
      module=_transpose_nd(_n), call=_channels_last_call(_n),
      rules=_KERNEL_BIAS))
