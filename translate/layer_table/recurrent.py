"""Recurrent layers and wrappers: LSTM, GRU, SimpleRNN, Bidirectional,
TimeDistributed.

The recurrent layers become ``models.recurrent`` modules (Keras' names and
fused layouts: the weights are copies, ``RULES["LSTM"]`` …);
``Bidirectional`` becomes ``recurrent.Bidirectional`` around the wrapped
layer, whose Keras parts ``<layer>/forward_<name>`` and
``<layer>/backward_<name>`` (``translate.keras_io.read_layer``) are its
submodules. ``TimeDistributed`` runs the translation of the wrapped layer
on the time steps folded into the batch. Masking is not supported (the
modules run every step): ``Embedding(mask_zero=True)`` is refused by its
translation, and a mask reaching a call by the emitter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from models import layers as L
from translate.graph import Call, Value
from translate.layer_table.base import (Context, LayerTranslation, lookup,
                                        refuse, register, require)
from translate.rules import RULES, Rule

IMPORT = "from models import recurrent"

_DEFAULTS = {"return_sequences": False, "return_state": False,
             "go_backwards": False, "use_bias": True}
_ACTIVATION_DEFAULTS = {"LSTM": ("tanh", "sigmoid"),
                        "GRU": ("tanh", "sigmoid"),
                        "SimpleRNN": ("tanh", None)}


def _activation_name(value: Any) -> Any:
  if isinstance(value, dict):  # a serialized function
    value = value.get("config", value.get("class_name"))
  return value


def _rnn_source(cls: str, config: dict[str, Any], ctx: Context,
                name: str | None = None) -> str:
  """``recurrent.<cls>(units, ...)``: Keras' non-default options."""
  require(config, ctx, stateful=(False,), time_major=(False,))
  for key in ("dropout", "recurrent_dropout"):
    if float(config.get(key, 0.0) or 0.0) != 0.0:
      raise refuse(ctx, f"{key}={config[key]!r}",
                   f"set {key}=0 (the Flax modules have no recurrent "
                   "dropout; inference is the same)")
  args = [str(int(config["units"]))]
  for key, default in _DEFAULTS.items():
    if bool(config.get(key, default)) != default:
      args.append(f"{key}={bool(config[key])!r}")
  act_default, rec_default = _ACTIVATION_DEFAULTS[cls]
  for key, default in (("activation", act_default),
                       ("recurrent_activation", rec_default)):
    if default is None:
      continue
    value = _activation_name(config.get(key, default))
    value = "linear" if value is None else value
    if value not in L.ACTIVATIONS:
      raise refuse(ctx, f"{key}={value!r}",
                   f"use one of {sorted(str(k) for k in L.ACTIVATIONS)}")
    if value != default:
      args.append(f"{key}={value!r}")
  if cls == "GRU" and not config.get("reset_after", True):
    args.append("reset_after=False")
  if config.get("unroll"):
    args.append("unroll=True")
  if name is not None:
    args.append(f"name={name!r}")
  ctx.need(IMPORT)
  return f"recurrent.{cls}({', '.join(args)})"


def _rnn(cls: str):
  def module(config, ctx):
    return _rnn_source(cls, config, ctx)

  def call(config, callee, inputs, ctx):
    extra = [k for k in ctx.kw_sources if k != "initial_state"]
    if len(inputs) > 2 or extra:
      raise refuse(ctx, f"the call arguments {extra or inputs[2:]}",
                   "call it on the sequence and initial_state only")
    state = (ctx.call.args[1] if len(inputs) == 2
             else ctx.call.kwargs.get("initial_state"))
    if state is None:
      return f"{callee}({inputs[0]})"
    given = inputs[1] if len(inputs) == 2 else ctx.kw_sources["initial_state"]
    return f"{callee}({inputs[0]}, initial_state={given})"

  return LayerTranslation(module=module, call=call, rules=RULES[cls])


for _cls in ("LSTM", "GRU", "SimpleRNN"):
  register(_cls, _rnn(_cls))


# --- Bidirectional -----------------------------------------------------------

def _bidirectional_module(config, ctx):
  op = ctx.call.op
  forward, backward = op.forward_layer, op.backward_layer
  cls = type(forward).__name__
  if cls not in _ACTIVATION_DEFAULTS or type(backward).__name__ != cls:
    raise refuse(ctx, f"wrapping {cls}", "wrap an LSTM, GRU or SimpleRNN")
  f_config, b_config = forward.get_config(), backward.get_config()
  base = forward.name[len("forward_"):]
  if (not forward.name.startswith("forward_")
      or backward.name != f"backward_{base}"):
    raise refuse(ctx, f"sublayers named {forward.name!r} and "
                 f"{backward.name!r}", "let Keras name them (forward_<name> "
                 "and backward_<name> of the wrapped layer)")
  same = ("name", "go_backwards")
  if ({k: v for k, v in f_config.items() if k not in same}
      != {k: v for k, v in b_config.items() if k not in same}):
    raise refuse(ctx, "a backward_layer configured unlike the forward one",
                 "build it without backward_layer= (Keras' copy of the "
                 "forward layer)")
  merge = config.get("merge_mode", "concat")
  inner = _rnn_source(cls, f_config, ctx, name=base)
  merge_arg = "" if merge == "concat" else f", merge_mode={merge!r}"
  return f"recurrent.Bidirectional({inner}{merge_arg})"


def _bidirectional_call(config, callee, inputs, ctx):
  if len(inputs) > 1 or ctx.kw_sources:
    given = list(ctx.kw_sources) or inputs[1:]
    raise refuse(ctx, f"the call arguments {given}",
                 "call it on the sequence only (no initial_state)")
  return f"{callee}({inputs[0]})"


# The parts are LSTM/GRU/SimpleRNN layers, filled by their own rules.
register("Bidirectional", LayerTranslation(
    module=_bidirectional_module, call=_bidirectional_call, rules={},
    note="LSTM, GRU or SimpleRNN inside; no initial_state, no custom "
         "backward_layer"))


# --- TimeDistributed ---------------------------------------------------------

# The wrapped layer's weights are read as the TimeDistributed layer's own
# (one sublayer holds them all): a wrapped class is supported when its rules
# are these.
TIME_DISTRIBUTED_RULES = {"kernel": Rule("params", "kernel"),
                          "bias": Rule("params", "bias")}


def _inner(ctx: Context) -> tuple[Any, Context]:
  """The wrapped layer's translation and the context it sees: a call on
  one time step's shape."""
  layer = ctx.call.op.layer
  cls = type(layer).__name__
  translation = lookup(cls, "layer")
  if translation is None or cls in ("Bidirectional", "TimeDistributed"):
    raise refuse(ctx, f"wrapping {cls}", "wrap a layer the table translates "
                 "(Dense, Conv2D, ...)")
  if translation.module is None:
    raise refuse(ctx, f"wrapping {cls} (a layer without weights)",
                 f"apply {cls} to the sequence directly or reshape with "
                 "keras.ops")
  rules = RULES.get(cls, {})
  if any(TIME_DISTRIBUTED_RULES.get(k) != r for k, r in rules.items()):
    raise refuse(ctx, f"wrapping {cls}", "wrap a layer whose weights are a "
                 "kernel and a bias in Keras' layout (Dense, Conv2D)")
  x = ctx.call.args[0]
  if len(x.shape) < 3:
    raise refuse(ctx, f"rank-{len(x.shape)} inputs",
                 "give (batch, time, ...) inputs")
  step = Value(x.var, (None, *x.shape[2:]), x.dtype)
  call = Call(layer, cls, ctx.name, "layer", layer.get_config(), (step,),
              {}, [])
  return translation, dataclasses.replace(ctx, call=call)


def _time_distributed_module(config, ctx):
  translation, inner = _inner(ctx)
  return translation.module(inner.call.config, inner)


def _time_distributed_call(config, callee, inputs, ctx):
  translation, inner = _inner(ctx)
  x = inputs[0]
  step = ctx.call.args[0].shape[2:]
  out = ctx.call.outputs[0].shape[1:]
  if out[1:].count(None) > 1:
    raise refuse(ctx, "several free output dimensions",
                 "give the inputs static shapes after the time axis")
  # Keras runs the layer on each time step; folding the steps into the
  # batch computes the same for a layer without batch statistics.
  fold = (", ".join(str(d) for d in step) if None not in step
          else f"*{x}.shape[2:]")
  y = translation.call(inner.call.config, callee,
                       [f"{x}.reshape(-1, {fold})"], inner)
  if None not in out:
    dims = ", ".join(["-1"] + [str(d) for d in out])
  else:  # a free time axis: batch and time from the input
    dims = ", ".join([f"*{x}.shape[:2]"] + [
        "-1" if d is None else str(d) for d in out[1:]])
  return f"({y}).reshape({dims})"


register("TimeDistributed", LayerTranslation(
    module=_time_distributed_module, call=_time_distributed_call,
    rules=TIME_DISTRIBUTED_RULES,
    note="a layer with kernel and bias inside (Dense, Conv2D)"))
