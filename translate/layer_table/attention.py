"""Attention layers: MultiHeadAttention and Dot.

``MultiHeadAttention`` becomes ``models.keras_layers.attention
.MultiHeadAttention`` (Keras' equations and weight shapes). Its Keras
weights live in four ``EinsumDense`` sublayers (five with ``use_gate``),
which ``translate.keras_io.read_layer`` reads as parts
``<layer>/query`` … ``<layer>/attention_output``; the Flax module has
submodules of those names, and the parts are filled by
``RULES["EinsumDense"]`` (copies: Keras' shapes). ``Dot`` becomes
``attention.dot`` (Keras' ``batch_dot``).
"""

from __future__ import annotations

import inspect

from translate.layer_table.base import LayerTranslation, lit, refuse, register
from translate.rules import Rule

IMPORT = "from models.keras_layers import attention"

# EinsumDense keeps Keras' kernel and bias shapes (models.keras_layers
# .attention.EinsumDense): copies.
EINSUM_DENSE_RULES = {"kernel": Rule("params", "kernel"),
                      "bias": Rule("params", "bias")}


def _einsum_dense_module(config, ctx):
  ctx.need(IMPORT)
  if config.get("lora_rank") or config.get("quantization_config"):
    raise refuse(ctx, "LoRA or quantization", "merge the LoRA weights (or "
                 "dequantize) before translating")
  activation = config.get("activation")
  if isinstance(activation, dict):
    activation = activation.get("config", activation.get("class_name"))
  args = [f"equation={config['equation']!r}",
          f"output_shape={lit(config['output_shape'])}"]
  if activation not in (None, "linear"):
    args.append(f"activation={activation!r}")
  if config.get("bias_axes"):
    args.append(f"bias_axes={config['bias_axes']!r}")
  return f"attention.EinsumDense({', '.join(args)})"


register("EinsumDense", LayerTranslation(
    module=_einsum_dense_module,
    call=lambda config, callee, inputs, ctx: f"{callee}({inputs[0]})",
    rules=EINSUM_DENSE_RULES))


def _mha_arguments(ctx) -> dict:
  """The call's arguments by name (``query``, ``value``, ``key``, …),
  however they were passed."""
  op = ctx.call.op
  bound = inspect.signature(type(op).call).bind(op, *ctx.call.args,
                                                **ctx.call.kwargs)
  return dict(bound.arguments)


def _mha_module(config, ctx):
  args = [f"num_heads={int(config['num_heads'])}",
          f"key_dim={int(config['key_dim'])}"]
  value_dim = config.get("value_dim")
  if value_dim and value_dim != config["key_dim"]:
    args.append(f"value_dim={int(value_dim)}")
  dropout = float(config.get("dropout", 0.0) or 0.0)
  if dropout:
    args.append(f"dropout={dropout!r}")
  if not config.get("use_bias", True):
    args.append("use_bias=False")
  if config.get("output_shape"):
    args.append(f"output_shape={lit(config['output_shape'])}")
  axes = config.get("attention_axes")
  if isinstance(axes, int):
    axes = (axes,)
  # A built layer's config holds its axes; Keras' default (every axis but
  # batch, heads and features of the projected rank) is left out.
  rank = len(_mha_arguments(ctx)["value"].shape) + 1
  if axes is not None and tuple(axes) != tuple(range(1, rank - 2)):
    args.append(f"attention_axes={lit(axes)}")
  if config.get("sliding_window") is not None:
    args.append(f"sliding_window={int(config['sliding_window'])}")
  if config.get("use_gate"):
    args.append("use_gate=True")
  ctx.need(IMPORT)
  return f"attention.MultiHeadAttention({', '.join(args)})"


def _mha_call(config, callee, inputs, ctx):
  # Imported here: translate.emit imports this table.
  from translate.layer_table.base import source_of  # pylint: disable=g-import-not-at-top
  given = _mha_arguments(ctx)
  if given.get("attention_mask") is not None:
    raise refuse(ctx, "attention_mask", "call it without attention_mask "
                 "(use_causal_mask=True gives the causal mask)")
  for name in ("query_mask", "value_mask", "key_mask"):
    if given.get(name) is not None:
      raise refuse(ctx, name, f"call it without {name} (masking is not "
                   "supported)")
  causal = bool(given.get("use_causal_mask", False))
  rank = len(given["query"].shape)
  if (causal or config.get("sliding_window") is not None) and rank != 3:
    raise refuse(ctx, f"use_causal_mask or sliding_window on rank-{rank} "
                 "inputs", "use (batch, time, features) inputs")
  args = [source_of(given[k]) for k in ("query", "value", "key")
          if given.get(k) is not None]
  if causal:
    args.append("use_causal_mask=True")
  if given.get("return_attention_scores"):
    args.append("return_attention_scores=True")
  args.append("train=train")
  return f"{callee}({', '.join(args)})"


register("MultiHeadAttention", LayerTranslation(
    module=_mha_module, call=_mha_call, rules={},
    note="attention_mask and Keras masks refused; weights in the parts "
         "query/key/value/attention_output (EinsumDense)"))


def _dot(config, callee, inputs, ctx):
  (pair,) = ctx.call.args  # Keras' Dot takes exactly two
  ctx.need(IMPORT)
  normalize = ", normalize=True" if config.get("normalize") else ""
  # Imported here: translate.emit imports this table.
  from translate.layer_table.base import source_of  # pylint: disable=g-import-not-at-top
  a, b = (source_of(x) for x in pair)
  return f"attention.dot({a}, {b}, axes={lit(config['axes'])}{normalize})"


register("Dot", LayerTranslation(call=_dot))
