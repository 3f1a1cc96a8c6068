"""LayerNormalization, UnitNormalization, GroupNormalization and
Normalization (``models.keras_layers.normalization``, Keras' arithmetic)."""

from __future__ import annotations

import numpy as np

from translate.layer_table.base import (LayerTranslation, lit, lit_value,
                                        register)
from translate.layer_table.core import JNP
from translate.rules import RULES

IMPORT = "from models.keras_layers import normalization"


def _ln_module(config, ctx):
  ctx.need(IMPORT)
  args = []
  if lit(config.get("axis", -1)) not in ("-1", "(-1,)"):
    args.append(f"axis={lit(config['axis'])}")
  args.append(f"epsilon={float(config.get('epsilon', 1e-3))!r}")
  for key in ("center", "scale"):
    if not config.get(key, True):
      args.append(f"{key}=False")
  if config.get("rms_scaling"):
    args.append("rms_scaling=True")
  return f"normalization.LayerNormalization({', '.join(args)})"


register("LayerNormalization", LayerTranslation(
    module=_ln_module,
    call=lambda config, callee, inputs, ctx: f"{callee}({inputs[0]})",
    rules=RULES["LayerNormalization"]))


def _unit(config, callee, inputs, ctx):
  ctx.need(IMPORT)
  return (f"normalization.unit_normalization({inputs[0]}, "
          f"axis={lit(config.get('axis', -1))})")


register("UnitNormalization", LayerTranslation(call=_unit))


def _group_module(config, ctx):
  ctx.need(IMPORT)
  args = [f"groups={int(config.get('groups', 32))}"]
  if int(config.get("axis", -1)) != -1:
    args.append(f"axis={int(config['axis'])}")
  args.append(f"epsilon={float(config.get('epsilon', 1e-3))!r}")
  for key in ("center", "scale"):
    if not config.get(key, True):
      args.append(f"{key}=False")
  return f"normalization.GroupNormalization({', '.join(args)})"


register("GroupNormalization", LayerTranslation(
    module=_group_module,
    call=lambda config, callee, inputs, ctx: f"{callee}({inputs[0]})",
    rules=RULES["LayerNormalization"]))


def _kept_axes(config, ctx) -> tuple[int, ...]:
  axis = lit_value(config.get("axis", -1))
  if axis is None:
    return ()
  ndim = len(ctx.call.args[0].shape)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axis))


def _normalization_module(config, ctx):
  if config.get("mean") is not None:
    return None  # statistics in the config: constants in the source
  ctx.need(IMPORT)
  args = []
  axes = _kept_axes(config, ctx)
  if axes != (len(ctx.call.args[0].shape) - 1,):
    args.append(f"axis={axes!r}")
  if config.get("invert"):
    args.append("invert=True")
  return f"normalization.Normalization({', '.join(args)})"


def _normalization_call(config, callee, inputs, ctx):
  if callee is not None:
    return f"{callee}({inputs[0]})"
  # Built with mean= and variance=: Keras broadcasts them over the kept
  # axes (scalars to every position, arrays aligned to the last kept axes).
  ctx.need(IMPORT)
  ctx.need(JNP)
  shape = ctx.call.args[0].shape
  axes = _kept_axes(config, ctx)
  mean, var = lit_value(config["mean"]), lit_value(config["variance"])
  mean, var = np.asarray(mean, np.float32), np.asarray(var, np.float32)
  bshape = [1] * len(shape)
  if mean.ndim:
    for i in range(1, mean.ndim + 1):
      bshape[axes[-i]] = mean.shape[-i]
  m = f"jnp.asarray({lit(mean.tolist())}, jnp.float32).reshape({tuple(bshape)!r})"
  v = f"jnp.asarray({lit(var.tolist())}, jnp.float32).reshape({tuple(bshape)!r})"
  invert = ", invert=True" if config.get("invert") else ""
  return f"normalization.normalize({inputs[0]}, {m}, {v}{invert})"


register("Normalization", LayerTranslation(
    module=_normalization_module, call=_normalization_call,
    rules=RULES["Normalization"]))
