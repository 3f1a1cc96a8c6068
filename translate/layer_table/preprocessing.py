"""Keras' random augmentation layers: the identity at inference (as Keras);
in training mode the emitted code raises naming the layer
(``models.keras_layers.preprocessing.inference_only``)."""

from __future__ import annotations

from translate.layer_table.base import LayerTranslation, register

IMPORT = "from models.keras_layers import preprocessing"

AUGMENTATION = ("RandomBrightness", "RandomContrast", "RandomCrop",
                "RandomFlip", "RandomRotation", "RandomTranslation",
                "RandomZoom", "RandomGrayscale", "RandomHue",
                "RandomSaturation", "RandomSharpness", "RandomShear",
                "RandomColorJitter", "RandomErasing", "RandomGaussianBlur",
                "RandomInvert", "RandomPosterization", "RandomPerspective",
                "GaussianNoise", "GaussianDropout", "AlphaDropout")


def _inference_only(config, callee, inputs, ctx):
  ctx.need(IMPORT)
  return (f"preprocessing.inference_only({inputs[0]}, train, "
          f"{ctx.name!r}, {ctx.call.cls!r})")


for _cls in AUGMENTATION:
  register(_cls, LayerTranslation(
      call=_inference_only, ignores_training=True,
      note="identity at inference; training refused"))
