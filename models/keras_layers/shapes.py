"""Keras' pooling layers of any rank (``MaxPooling3D``,
``AveragePooling3D``), channels last, in TF's arithmetic: "same" pads the
max with -inf and leaves the padded cells out of the average (Flax's
``avg_pool`` counts them unless told not to)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


def pool(x: jax.Array, kind: str, pool_size: Sequence[int],
         strides: Sequence[int], padding: str) -> jax.Array:
  """``kind`` "max" or "avg" over the spatial axes of ``x`` (N, ..., C)."""
  window, strides, padding = tuple(pool_size), tuple(strides), padding.upper()
  if kind == "max":
    return nn.max_pool(x, window, strides, padding)
  if kind == "avg":
    return nn.avg_pool(x, window, strides, padding, count_include_pad=False)
  raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
