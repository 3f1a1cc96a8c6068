"""A user's own Keras layer and its Flax version, for
``examples/custom_layer.py`` (the Flax class lives in an importable module:
the source ``translate.emit_source`` writes imports it from here)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before Keras

import flax.linen as nn  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import keras  # noqa: E402  pylint: disable=g-import-not-at-top


@keras.saving.register_keras_serializable(package="my_layers")
class ScaledSoftplus(keras.layers.Layer):
  """``softplus(x * scale) + shift``, with one learned ``scale`` and
  ``shift`` per channel: a layer Keras does not have."""

  def __init__(self, init_scale: float = 1.0, **kwargs):
    super().__init__(**kwargs)
    self.init_scale = init_scale

  def build(self, input_shape):
    channels = input_shape[-1]
    self.scale = self.add_weight(
        name="scale", shape=(channels,),
        initializer=keras.initializers.Constant(self.init_scale))
    self.shift = self.add_weight(name="shift", shape=(channels,),
                                 initializer="zeros")

  def call(self, x):
    return keras.ops.softplus(x * self.scale) + self.shift

  def get_config(self):
    return {**super().get_config(), "init_scale": self.init_scale}


class FlaxScaledSoftplus(nn.Module):
  """The Flax version: the same function, the variables named like Keras'
  weights (``translate.register_layer`` is told which fills which).

  Attributes:
    init_scale: the Keras argument (used only when initializing anew).
  """

  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.constant(self.init_scale),
                       (channels,))
    shift = self.param("shift", nn.initializers.zeros, (channels,))
    return nn.softplus(x * scale) + shift
