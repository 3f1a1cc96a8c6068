"""Convolutions beyond Conv2D: Conv1D, Conv3D, DepthwiseConv2D and
SeparableConv2D.

Each becomes ``models.layers.Conv`` (a ``flax.linen.Conv``: the CPU fast
forms and ``translate.fold_batchnorm`` apply) or ``models.layers
.SeparableConv``; Keras' kernels keep their layout except the depthwise
ones, Keras' ``(h, w, c, m)`` against Flax's grouped ``(h, w, 1, c * m)``
(the rules in ``translate.rules.RULES``).
"""

from __future__ import annotations

from translate.layer_table.base import LayerTranslation, lit_value
from translate.layer_table.base import refuse, register, require
from translate.layer_table.core import (L_IMPORT, _channels_first, _padding,
                                        activation_source,
                                        to_first, to_last)
from translate.rules import RULES, Rule


def _tuple(value, n):
  value = lit_value(value)
  return tuple(value) if isinstance(value, tuple) else (value,) * n


def _conv_nd(n: int):
  def module(config, ctx):
    require(config, ctx, lora_rank=(None, 0))
    padding = config.get("padding", "valid")
    if padding == "causal":
      if n != 1:
        raise refuse(ctx, "padding='causal'", "use 'valid' or 'same'")
      k = _tuple(config["kernel_size"], 1)[0]
      d = _tuple(config.get("dilation_rate", 1), 1)[0]
      pad = f"(({d * (k - 1)}, 0),)"  # all on the left: keras causal
    else:
      pad = repr(_padding(config, ctx))
    args = [str(config["filters"]), repr(_tuple(config["kernel_size"], n))]
    strides = _tuple(config.get("strides", 1), n)
    if strides != (1,) * n:
      args.append(f"strides={strides!r}")
    args.append(f"padding={pad}")
    dilation = _tuple(config.get("dilation_rate", 1), n)
    if dilation != (1,) * n:
      args.append(f"kernel_dilation={dilation!r}")
    if config.get("groups", 1) != 1:
      args.append(f"feature_group_count={config['groups']}")
    if not config.get("use_bias", True):
      args.append("use_bias=False")
    ctx.need(L_IMPORT)
    return f"L.Conv({', '.join(args)})"

  def call(config, callee, inputs, ctx):
    x = inputs[0]
    if _channels_first(config):
      out = activation_source(config.get("activation"),
                              f"{callee}({to_last(x, n + 2, ctx)})", ctx)
      return to_first(out, n + 2, ctx)
    return activation_source(config.get("activation"), f"{callee}({x})",
                             ctx)
  return module, call


for _n in (1, 3):
  _module, _call = _conv_nd(_n)
  register(f"Conv{_n}D", LayerTranslation(
      module=_module, call=_call,
      rules={"kernel": Rule("params", "kernel"),
             "bias": Rule("params", "bias")}))


def _depthwise_module(config, ctx):
  require(config, ctx, lora_rank=(None, 0))
  channels = ctx.call.args[0].shape[1 if _channels_first(config) else -1]
  m = int(config.get("depth_multiplier", 1))
  args = [str(channels * m), repr(_tuple(config["kernel_size"], 2))]
  strides = _tuple(config.get("strides", 1), 2)
  if strides != (1, 1):
    args.append(f"strides={strides!r}")
  args.append(f"padding={_padding(config, ctx)!r}")
  dilation = _tuple(config.get("dilation_rate", 1), 2)
  if dilation != (1, 1):
    args.append(f"kernel_dilation={dilation!r}")
  args.append(f"feature_group_count={channels}")
  if not config.get("use_bias", True):
    args.append("use_bias=False")
  ctx.need(L_IMPORT)
  return f"L.Conv({', '.join(args)})"


def _conv2d_like_call(config, callee, inputs, ctx):
  x = inputs[0]
  if _channels_first(config):
    out = activation_source(config.get("activation"),
                            f"{callee}({to_last(x, 4, ctx)})", ctx)
    return to_first(out, 4, ctx)
  return activation_source(config.get("activation"), f"{callee}({x})", ctx)


register("DepthwiseConv2D", LayerTranslation(
    module=_depthwise_module, call=_conv2d_like_call,
    rules=RULES["DepthwiseConv2D"]))


def _separable_module(config, ctx):
  require(config, ctx, lora_rank=(None, 0))
  if _tuple(config.get("dilation_rate", 1), 2) != (1, 1):
    raise refuse(ctx, f"dilation_rate={config['dilation_rate']!r}",
                 "use dilation_rate=1")
  args = [str(config["filters"]), repr(_tuple(config["kernel_size"], 2))]
  strides = _tuple(config.get("strides", 1), 2)
  if strides != (1, 1):
    args.append(f"strides={strides!r}")
  args.append(f"padding={_padding(config, ctx)!r}")
  if int(config.get("depth_multiplier", 1)) != 1:
    args.append(f"depth_multiplier={int(config['depth_multiplier'])}")
  if not config.get("use_bias", True):
    args.append("use_bias=False")
  ctx.need(L_IMPORT)
  return f"L.SeparableConv({', '.join(args)})"


register("SeparableConv2D", LayerTranslation(
    module=_separable_module, call=_conv2d_like_call,
    rules=RULES["SeparableConv2D"]))

