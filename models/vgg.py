"""VGG16 and VGG19, mirroring ``keras/src/applications/vgg16.py`` and
``vgg19.py``.

Five blocks of ``same`` 3x3 ReLU convolutions (``block<b>_conv<i>``), each
followed by a 2x2/2 max pool; the top is ``Flatten`` (row-major over height,
width, channels, as Keras' channels-last ``Flatten``), ``fc1`` and ``fc2``
(4096, ReLU) and ``predictions``. No BatchNorm; ``preprocess_input`` is
``caffe`` (BGR, ImageNet mean subtracted).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from models import layers as L
from models.registry import ModelSpec, register

# (filters, convolutions) of block1 … block5, copied from Keras.
BLOCKS = {
    16: ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)),
    19: ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4)),
}
FC_UNITS = 4096  # fc1 and fc2


class VGG(nn.Module):
  """Keras ``VGG16`` / ``VGG19``.

  Attributes:
    blocks: ``(filters, convolutions)`` per block (``BLOCKS[16]``, …).
    include_top: add ``flatten``, ``fc1``, ``fc2`` and ``predictions``; the
      input size then fixes ``fc1``'s input width (25088 at 224x224).
    classes: size of the ``predictions`` layer.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None``.
  """

  blocks: tuple[tuple[int, int], ...]
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm, no Dropout
    for b, (filters, convs) in enumerate(self.blocks, start=1):
      for i in range(1, convs + 1):
        x = nn.relu(L.conv(x, filters, 3, padding="SAME",
                           name=f"block{b}_conv{i}"))
      x = L.max_pool(x, 2, 2)  # block<b>_pool, 'valid': odd sizes floor
    if not self.include_top:
      return x if self.pooling is None else L.global_pool(x, self.pooling)
    x = x.reshape(x.shape[0], -1)  # Keras Flatten: (h, w, c) row-major
    x = nn.relu(L.dense(x, FC_UNITS, name="fc1"))
    x = nn.relu(L.dense(x, FC_UNITS, name="fc2"))
    x = L.dense(x, self.classes, name="predictions")
    return L.activation(self.classifier_activation)(x)


for _depth, _blocks in BLOCKS.items():
  register(ModelSpec(
      name=f"vgg{_depth}",
      keras_name=f"VGG{_depth}",
      family="vgg",
      flax_cls=functools.partial(VGG, blocks=_blocks),
      keras_fn=f"keras.applications.VGG{_depth}",
      keras_preprocess=f"keras.applications.vgg{_depth}",
      input_shape=(224, 224, 3),
      preprocess="caffe",
      bn_epsilon=0.0,  # no BatchNormalization layer
      min_size=32,
      slow=_depth != 16,
  ))
