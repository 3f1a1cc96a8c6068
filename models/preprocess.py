"""``preprocess_input`` of every Keras Applications mode, in jax.numpy.

Mirrors ``keras/src/applications/imagenet_utils.py`` (channels-last only):
integer images are cast to float32 first, as Keras does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("caffe", "tf", "torch", "none")


def preprocess_mode(images: jax.Array | np.ndarray, mode: str) -> jax.Array:
  """Applies Keras' ``preprocess_input`` ``mode`` to NHWC/HWC RGB images."""
  x = jnp.asarray(images)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if mode == "tf":
    return x / 127.5 - 1.0
  if mode == "torch":
    return (x / 255.0 - jnp.asarray(TORCH_MEAN, x.dtype)) / jnp.asarray(
        TORCH_STD, x.dtype)
  if mode == "caffe":
    return x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, x.dtype)  # RGB -> BGR
  if mode == "none":
    return x
  raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {MODES}")
