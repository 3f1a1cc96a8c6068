"""1D and 3D pooling, upsampling, cropping, 1D padding, Resizing and
CenterCrop (channels_last; a channels_first input is moved to channels_last
and back)."""

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

SHAPES = "from models.keras_layers import shapes"


def _pool3d(kind: str):
  def call(config, callee, inputs, ctx):
    ctx.need(SHAPES)
    pool = _triple(config.get("pool_size", 2))
    strides = _triple(config.get("strides") or pool)
    x = inputs[0]
    if _channels_first(config):
      x = to_last(x, 5, ctx)
    out = (f"shapes.pool({x}, {kind!r}, {pool!r}, {strides!r}, "
           f"{_padding(config, ctx)!r})")
    return to_first(out, 5, ctx) if _channels_first(config) else out
  return call


def _triple(value) -> tuple[int, int, int]:
  value = lit_value(value)
  return (value,) * 3 if isinstance(value, int) else tuple(value)


register("MaxPooling3D", LayerTranslation(call=_pool3d("max")))
register("AveragePooling3D", LayerTranslation(call=_pool3d("avg")))


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


# --- Resizing and CenterCrop (images: rank 4) ---------------------------------

PREPROCESSING = "from models.keras_layers import preprocessing"
# TF's bicubic and lanczos kernels differ from jax.image.resize's by 1e-3.
INTERPOLATIONS = ("bilinear", "nearest")


def _image_rank(ctx) -> None:
  if len(ctx.call.args[0].shape) != 4:
    raise refuse(ctx, f"an input of rank {len(ctx.call.args[0].shape)}",
                 "give it batches of images (rank 4)")


def _resizing(config, callee, inputs, ctx):
  _image_rank(ctx)
  for key in ("crop_to_aspect_ratio", "pad_to_aspect_ratio"):
    if config.get(key):
      raise refuse(ctx, f"{key}=True", f"resize without {key}")
  interpolation = config.get("interpolation", "bilinear")
  if interpolation not in INTERPOLATIONS:
    raise refuse(ctx, f"interpolation={interpolation!r}",
                 f"use one of {', '.join(INTERPOLATIONS)}")
  ctx.need(PREPROCESSING)
  x = inputs[0]
  first = _channels_first(config)
  if first:
    x = to_last(x, 4, ctx)
  args = [x, str(int(config["height"])), str(int(config["width"]))]
  if interpolation != "bilinear":
    args.append(repr(interpolation))
  if config.get("antialias"):
    args.append("antialias=True")
  out = f"preprocessing.resize({', '.join(args)})"
  return to_first(out, 4, ctx) if first else out


register("Resizing", LayerTranslation(
    call=_resizing, ignores_training=True, note="bilinear and nearest; "
    "crop_to_aspect_ratio and pad_to_aspect_ratio refused"))


def _center_crop(config, callee, inputs, ctx):
  _image_rank(ctx)
  first = _channels_first(config)
  shape = ctx.call.args[0].shape
  h, w = (shape[2], shape[3]) if first else (shape[1], shape[2])
  height, width = int(config["height"]), int(config["width"])
  if h is None or w is None or h < height or w < width:
    raise refuse(ctx, f"an input of {h}x{w} for a {height}x{width} crop",
                 "give it a fixed input size at least as large as the crop "
                 "(Keras resizes smaller images instead of cropping them)")
  top, left = (h - height) // 2, (w - width) // 2
  rows, cols = f"{top}:{top + height}", f"{left}:{left + width}"
  if first:
    return f"{inputs[0]}[:, :, {rows}, {cols}]"
  return f"{inputs[0]}[:, {rows}, {cols}, :]"


register("CenterCrop", LayerTranslation(
    call=_center_crop, ignores_training=True, note="inputs smaller than the crop refused"))
