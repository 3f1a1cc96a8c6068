"""Keras' augmentation layers, which the translation runs only at inference
(where Keras makes them the identity)."""

from __future__ import annotations

import jax


def inference_only(x: jax.Array, train: bool, name: str, cls: str
                   ) -> jax.Array:
  """``x`` at inference; in training mode an error naming the layer (the
  random augmentation is not reproduced)."""
  if train:
    raise ValueError(
        f"Keras layer {name!r} ({cls}) runs only at inference in the Flax "
        "translation (it is the identity there, as in Keras); augment the "
        "data in your input pipeline for training, or drop the layer")
  return x


def resize(x: jax.Array, height: int, width: int,
           interpolation: str = "bilinear", antialias: bool = False
           ) -> jax.Array:
  """``keras.layers.Resizing`` of channels-last images ``x`` (N, H, W, C):
  Keras' JAX backend's ``jax.image.resize`` (half-pixel centres)."""
  method = {"bilinear": "linear"}.get(interpolation, interpolation)
  shape = (x.shape[0], height, width, x.shape[-1])
  return jax.image.resize(x, shape, method=method, antialias=antialias)
