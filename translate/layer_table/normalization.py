"""LayerNormalization and UnitNormalization
(``models.keras_layers.normalization``, Keras' arithmetic)."""

from __future__ import annotations

from translate.layer_table.base import LayerTranslation, lit, register
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
