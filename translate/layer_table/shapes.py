"""1D pooling, upsampling, cropping and 1D padding (channels_last; a
channels_first input is moved to channels_last and back)."""

from __future__ import annotations

from translate.layer_table.base import (LayerTranslation, lit_value, refuse,
                                        register)
from translate.layer_table.core import (JNP, L_IMPORT, _channels_first,
                                        _padding, to_first, to_last)


def _first(value):
  value = lit_value(value)
  return value[0] if isinstance(value, tuple) else value


def _pool1d(kind: str):
  def call(config, callee, inputs, ctx):
    ctx.need(L_IMPORT)
    pool = int(_first(config.get("pool_size", 2)))
    strides = int(_first(config.get("strides") or pool))
    x = inputs[0]
    if _channels_first(config):
      x = to_last(x, 3, ctx)
    out = (f"L.{kind}({x}[:, :, None, :], ({pool}, 1), ({strides}, 1), "
           f"{_padding(config, ctx)!r})[:, :, 0, :]")
    return to_first(out, 3, ctx) if _channels_first(config) else out
  return call


register("MaxPooling1D", LayerTranslation(call=_pool1d("max_pool")))
register("AveragePooling1D", LayerTranslation(call=_pool1d("avg_pool")))


def _upsampling(rank: int):
  def call(config, callee, inputs, ctx):
    ctx.need(JNP)
    if config.get("interpolation", "nearest") != "nearest":
      raise refuse(ctx, f"interpolation={config['interpolation']!r}",
                   "use interpolation='nearest'")
    size = lit_value(config.get("size", 2))
    sizes = (size,) * rank if isinstance(size, int) else tuple(size)
    x = inputs[0]
    first = _channels_first(config)
    if first:
      x = to_last(x, rank + 2, ctx)
    for axis, n in enumerate(sizes, start=1):
      if n != 1:
        x = f"jnp.repeat({x}, {int(n)}, axis={axis})"
    return to_first(x, rank + 2, ctx) if first else x
  return call


register("UpSampling1D", LayerTranslation(call=_upsampling(1)))
register("UpSampling2D", LayerTranslation(call=_upsampling(2)))


def _pairs(value, rank: int) -> tuple[tuple[int, int], ...]:
  value = lit_value(value)
  if isinstance(value, int):
    return ((value, value),) * rank
  if rank == 1:
    return (tuple(value),)
  return tuple((v, v) if isinstance(v, int) else tuple(v) for v in value)


def _zero_pad1d(config, callee, inputs, ctx):
  ctx.need(JNP)
  (a, b), = _pairs(config.get("padding", 1), 1)
  pads = (((0, 0), (0, 0), (a, b)) if _channels_first(config)
          else ((0, 0), (a, b), (0, 0)))
  return f"jnp.pad({inputs[0]}, {pads!r})"


register("ZeroPadding1D", LayerTranslation(call=_zero_pad1d))


def _cropping(rank: int):
  def call(config, callee, inputs, ctx):
    pairs = _pairs(config.get("cropping", 1), rank)
    slices = [f"{a}:{-b if b else ''}" for a, b in pairs]
    lead = ":, :, " if _channels_first(config) else ":, "
    tail = "" if _channels_first(config) else ", :"
    return f"{inputs[0]}[{lead}{', '.join(slices)}{tail}]"
  return call


register("Cropping1D", LayerTranslation(call=_cropping(1)))
register("Cropping2D", LayerTranslation(call=_cropping(2)))
register("Cropping3D", LayerTranslation(call=_cropping(3)))
