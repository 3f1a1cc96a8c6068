"""ResNet-RS 50 … 420, mirroring tf-keras'
``tf_keras/src/applications/resnet_rs.py`` (Keras 3 has no ResNet-RS).

Quirks copied on purpose so the layer names and numbers match tf-keras:
``name + "batch_norm_1"`` has no underscore while the other BatchNorms have
one; block names carry a double underscore (``BlockGroup2__block_0__conv_1``);
the stochastic-depth ``Dropout`` uses the *survival probability* as its drop
rate; BatchNorm momentum is 0.0 and epsilon 1e-5, in the arithmetic of
tf-keras' fused kernel (its moving variance takes the unbiased batch
variance).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-5  # ResNetRS(bn_epsilon=1e-5)
MOMENTUM = 0.0  # ResNetRS(bn_momentum=0.0)
# tf-keras runs BatchNormalization on these 4D float32 inputs through TF's
# fused kernel: centered arithmetic, and a moving variance that takes the
# unbiased (1/(N-1)) batch variance (Keras 3: biased); see
# layers.BatchNorm.
BN_ARITHMETIC = "tf_fused"
SE_RATIO = 0.25  # ResNetRS(se_ratio=0.25)
# include_preprocessing=True: Rescaling(scale=1.0 / 255), then, for 3
# channels, Normalization(mean=[0.485, 0.456, 0.406],
# variance=[0.229**2, 0.224**2, 0.225**2]) -- tf_keras/src/applications/
# resnet_rs.py lines 652-657. The mean/variance are constructor arguments,
# i.e. constants of the architecture (the layer has no weights), copied here.
RESCALE = 1.0 / 255
MEAN_RGB = (0.485, 0.456, 0.406)
VARIANCE_RGB = (0.229**2, 0.224**2, 0.225**2)
KERAS_EPSILON = 1e-7  # tf_keras backend.epsilon(), Normalization's floor

# depth: (blocks per group, drop_connect_rate, dropout_rate, native size);
# blocks from BLOCK_ARGS, rates from ResNetRS50 … ResNetRS420, native size
# the largest of DEPTH_TO_WEIGHT_VARIANTS (the ImageNet weights' size).
VARIANTS = {
    50: ((3, 4, 6, 3), 0.0, 0.25, 160),
    101: ((3, 4, 23, 3), 0.0, 0.25, 192),
    152: ((3, 8, 36, 3), 0.0, 0.25, 256),
    200: ((3, 24, 36, 3), 0.1, 0.25, 256),
    270: ((4, 29, 53, 4), 0.1, 0.25, 256),
    350: ((4, 36, 72, 4), 0.1, 0.4, 320),
    420: ((4, 44, 87, 4), 0.1, 0.4, 320),
}
GROUP_FILTERS = (64, 128, 256, 512)


def conv_fixed_padding(x: jax.Array, filters: int, kernel_size: int,
                       strides: int, name: str) -> jax.Array:
  """tf-keras ``Conv2DFixedPadding``.

  A strided conv is preceded by ``fixed_padding``: ``ZeroPadding2D`` of
  ``(k-1)//2`` before and the rest after, whatever the input size (TF's SAME
  would pad (0, 1) for a 3x3/2 conv on an even size), then a ``valid`` conv;
  a stride-1 conv is ``same``.

  Args:
    x: NHWC input.
    filters: output channels.
    kernel_size: square kernel size.
    strides: 1 or 2.
    name: the Keras ``Conv2D`` layer name.

  Returns:
    The convolution output (no bias, as in tf-keras).
  """
  if strides > 1:
    beg = (kernel_size - 1) // 2
    end = kernel_size - 1 - beg
    x = L.zero_pad(x, ((beg, end), (beg, end)))
  return L.conv(x, filters, kernel_size, strides=strides,
                padding="SAME" if strides == 1 else "VALID", use_bias=False,
                name=name)


def preprocessing(x: jax.Array) -> jax.Array:
  """tf-keras' ``Rescaling`` and (RGB only) ``Normalization``, op for op.

  ``Rescaling`` multiplies by ``float32(1/255)`` (not a division), and
  ``Normalization`` divides by ``max(sqrt(float32(variance)), 1e-7)``, as
  Keras does (XLA's division itself may still round 1 ulp differently).
  """
  x = x * jnp.asarray(RESCALE, x.dtype)
  if x.shape[-1] == 3:
    mean = jnp.asarray(MEAN_RGB, x.dtype)
    std = jnp.maximum(jnp.sqrt(jnp.asarray(VARIANCE_RGB, x.dtype)),
                      KERAS_EPSILON)
    x = (x - mean) / std
  return x


class ResNetRS(nn.Module):
  """tf-keras ``ResNetRS`` (``include_preprocessing=True``).

  Takes pixels in [0, 255]: the model rescales and normalizes them itself.

  Attributes:
    blocks: bottleneck blocks in each of the four groups (``BLOCK_ARGS``).
    drop_connect_rate: ``drop_connect_rate`` of the tf-keras constructor;
      group ``g`` (2..5) uses ``rate * g / 5`` as its stochastic-depth rate.
    dropout_rate: ``top_dropout`` rate before the ``predictions`` layer.
    include_top: add global average pooling, dropout and ``predictions``.
    classes: size of the ``predictions`` layer.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None`` for
      logits.
  """

  blocks: Sequence[int]
  drop_connect_rate: float = 0.0
  dropout_rate: float = 0.25
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, momentum=MOMENTUM,
                           arithmetic=BN_ARITHMETIC, train=train)
    x = preprocessing(x)
    # STEM; tf-keras names it from a counter: "stem_1" in a fresh session
    # (keras_resnet_rs below resets that counter).
    for i, (filters, strides) in enumerate(((32, 2), (32, 1), (64, 1),
                                            (64, 2))):
      x = conv_fixed_padding(x, filters, 3, strides,
                             name=f"stem_1_stem_conv_{i + 1}")
      x = nn.relu(bn(x, name=f"stem_1_stem_batch_norm_{i + 1}"))

    total = len(self.blocks) + 1
    for i, (filters, repeats) in enumerate(zip(GROUP_FILTERS, self.blocks)):
      # get_survival_probability(init_rate, block_num=i + 2, total_blocks)
      survival = self.drop_connect_rate * float(i + 2) / total
      group = f"BlockGroup{i + 2}_"
      for j in range(repeats):
        # Only a group's first block strides (not in BlockGroup2) and
        # projects the shortcut.
        x = _bottleneck(x, bn, train, filters,
                        strides=2 if i > 0 and j == 0 else 1,
                        use_projection=j == 0, survival=survival,
                        name=f"{group}_block_{j}_")
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation,
                  dropout=self.dropout_rate, train=train)


def _bottleneck(inputs: jax.Array, bn: Callable[..., jax.Array], train: bool,
                filters: int, strides: int, use_projection: bool,
                survival: float, name: str) -> jax.Array:
  """tf-keras ``BottleneckBlock`` with squeeze-excite and drop connect.

  Args:
    inputs: NHWC input.
    bn: ``L.batch_norm`` bound to the family's epsilon, momentum and mode.
    train: training mode (batch statistics, stochastic depth on).
    filters: bottleneck width; the block outputs ``4 * filters`` channels.
    strides: stride of the 3x3 conv (and of the projection shortcut).
    use_projection: the first block of a group projects the shortcut.
    survival: ``get_survival_probability(...)`` of the group; tf-keras uses
      it as the ``Dropout`` *rate* (sic), so 0 disables the layer.
    name: the block's Keras name prefix, e.g. ``"BlockGroup3__block_0_"``.

  Returns:
    ``relu(residual + shortcut)``.
  """
  shortcut = inputs
  if use_projection:
    if strides == 2:
      shortcut = L.avg_pool(inputs, 2, strides=2, padding="SAME")
      shortcut = conv_fixed_padding(shortcut, filters * 4, 1, 1,
                                    name=name + "_projection_conv")
    else:
      shortcut = conv_fixed_padding(inputs, filters * 4, 1, strides,
                                    name=name + "_projection_conv")
    shortcut = bn(shortcut, name=name + "_projection_batch_norm")
  x = conv_fixed_padding(inputs, filters, 1, 1, name=name + "_conv_1")
  x = nn.relu(bn(x, name=name + "batch_norm_1"))  # sic: no underscore
  x = conv_fixed_padding(x, filters, 3, strides, name=name + "_conv_2")
  x = nn.relu(bn(x, name=name + "_batch_norm_2"))
  x = conv_fixed_padding(x, filters * 4, 1, 1, name=name + "_conv_3")
  x = bn(x, name=name + "_batch_norm_3")
  # SE(filters, se_ratio): reduce to int(filters * 4 * se_ratio) channels.
  se = jnp.mean(x, axis=(1, 2), keepdims=True)
  se = nn.relu(L.conv(se, max(1, int(filters * 4 * SE_RATIO)), 1,
                      padding="SAME", name=name + "_se_se_reduce"))
  se = nn.sigmoid(L.conv(se, filters * 4, 1, padding="SAME",
                         name=name + "_se_se_expand"))
  x = x * se
  if survival:
    # tf-keras: Dropout(survival_probability, noise_shape=(None, 1, 1, 1)),
    # i.e. the survival probability is used as the drop rate.
    x = nn.Dropout(survival, broadcast_dims=(1, 2, 3),
                   deterministic=not train, name=name + "_drop")(x)
  return L.block_output(nn.relu(x + shortcut))


def keras_resnet_rs(depth: int, **kwargs: Any) -> Any:
  """Builds tf-keras' ResNetRS<depth> with session-independent names and
  every option ``models.create`` takes.

  tf-keras names the stem ``stem_<N>`` from a per-session counter
  (``backend.get_uid("stem_")``), so a second ResNet-RS in one process would
  be ``stem_2``; the counter is reset first so it is always ``stem_1``.

  The public ``ResNetRS50`` … fix ``dropout_rate`` and ``drop_connect_rate``;
  this calls the ``ResNetRS`` builder they forward to, with their rates and
  ``model_name`` (which names the ImageNet weights file), so that those two
  options reach tf-keras too.
  """
  from tf_keras.src import backend  # pylint: disable=g-import-not-at-top
  from tf_keras.src.applications import resnet_rs  # pylint: disable=g-import-not-at-top
  uids = backend.PER_GRAPH_OBJECT_NAME_UIDS.get(backend.get_graph(), {})
  uids.pop("stem_", None)
  _, drop_connect_rate, dropout_rate, _ = VARIANTS[depth]
  kwargs = {"drop_connect_rate": drop_connect_rate,
            "dropout_rate": dropout_rate, "weights": "imagenet", **kwargs}
  return resnet_rs.ResNetRS(depth=depth, model_name=f"resnet-rs-{depth}",
                            **kwargs)


for _depth, (_blocks, _dc, _dropout, _size) in VARIANTS.items():
  register(ModelSpec(
      name=f"resnetrs{_depth}",
      keras_name=f"ResNetRS{_depth}",
      family="resnet_rs",
      flax_cls=functools.partial(ResNetRS, blocks=_blocks),
      keras_fn=f"models.resnet_rs.keras_resnet_rs_{_depth}",
      keras_preprocess="tf_keras.applications.resnet_rs",
      input_shape=(_size, _size, 3),
      preprocess="none",  # the model rescales and normalizes itself
      bn_epsilon=EPSILON,
      min_size=32,
      # tf-keras' own option names (off at 0, as its `if dropout_rate > 0`).
      options={"dropout_rate": _dropout, "drop_connect_rate": _dc},
      slow=_depth != 50,  # the README tier runs ResNetRS50; CI the rest
  ))
  globals()[f"keras_resnet_rs_{_depth}"] = functools.partial(keras_resnet_rs,
                                                            _depth)
