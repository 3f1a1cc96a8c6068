"""RegNetX and RegNetY 002 … 320, mirroring tf-keras'
``tf_keras/src/applications/regnet.py`` (Keras 3 has no RegNet).

Quirks copied on purpose so the layer names and numbers match tf-keras:

- every layer name carries the model name (``regnetx002_stem_conv``,
  ``regnety002_Stage_1_YBlock_0_conv_3x3``), with a capital ``S`` in
  ``Stage`` and the block type in the block name;
- the classifier is ``Head(num_classes)`` named from a session counter:
  ``1_head_gap`` and ``1head_dense`` (no underscore) in a fresh session
  (``keras_regnet`` below resets that counter);
- tf-keras' ``Head`` ignores ``classifier_activation`` (always logits); the
  Keras reference built by ``keras_regnet`` applies it, as documented, and
  so does the Flax module;
- ``PreStem`` is a ``Rescaling(1/255)`` only: despite its docstring there is
  no ImageNet mean/std normalization (and no weights);
- the Y block's squeeze-and-excite squeezes to ``int(filters_in * 0.25)``
  channels, a quarter of the block's *input* width, not of its output width
  (it differs in each stage's first block);
- the 3x3 convs have ``filters_out // group_width`` groups, and 1 where
  that is 0 (tf-keras' ``Conv2D`` takes ``groups or 1``; RegNetX080's first
  stage);
- BatchNorm momentum 0.9 and epsilon 1e-5 everywhere, in the arithmetic of
  tf-keras' fused kernel (its moving variance takes the unbiased batch
  variance; Keras 3 takes the biased one).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-5  # BatchNormalization(momentum=0.9, epsilon=1e-5) everywhere
MOMENTUM = 0.9
# tf-keras runs BatchNormalization on these 4D float32 inputs through TF's
# fused kernel: centered arithmetic, and a moving variance that takes the
# unbiased (1/(N-1)) batch variance (Keras 3: biased); see
# layers.BatchNorm.
BN_ARITHMETIC = "tf_fused"
SE_RATIO = 0.25  # YBlock(squeeze_excite_ratio=0.25)
STEM_FILTERS = 32  # Stem(): Conv2D(32, 3x3, strides=2, padding="same")
RESCALE = 1.0 / 255.0  # PreStem(): Rescaling(scale=1.0 / 255.0)
# Head(): name = str(backend.get_uid("head")); "1" in a fresh session.
HEAD_GAP = "1_head_gap"
HEAD_DENSE = "1head_dense"  # sic: name + "head_dense", no underscore

# tf-keras MODEL_CONFIGS, copied (default_size is 224 for all of them).
MODEL_CONFIGS = {
    "x002": {"depths": [1, 1, 4, 7], "widths": [24, 56, 152, 368],
             "group_width": 8, "block_type": "X"},
    "x004": {"depths": [1, 2, 7, 12], "widths": [32, 64, 160, 384],
             "group_width": 16, "block_type": "X"},
    "x006": {"depths": [1, 3, 5, 7], "widths": [48, 96, 240, 528],
             "group_width": 24, "block_type": "X"},
    "x008": {"depths": [1, 3, 7, 5], "widths": [64, 128, 288, 672],
             "group_width": 16, "block_type": "X"},
    "x016": {"depths": [2, 4, 10, 2], "widths": [72, 168, 408, 912],
             "group_width": 24, "block_type": "X"},
    "x032": {"depths": [2, 6, 15, 2], "widths": [96, 192, 432, 1008],
             "group_width": 48, "block_type": "X"},
    "x040": {"depths": [2, 5, 14, 2], "widths": [80, 240, 560, 1360],
             "group_width": 40, "block_type": "X"},
    "x064": {"depths": [2, 4, 10, 1], "widths": [168, 392, 784, 1624],
             "group_width": 56, "block_type": "X"},
    "x080": {"depths": [2, 5, 15, 1], "widths": [80, 240, 720, 1920],
             "group_width": 120, "block_type": "X"},
    "x120": {"depths": [2, 5, 11, 1], "widths": [224, 448, 896, 2240],
             "group_width": 112, "block_type": "X"},
    "x160": {"depths": [2, 6, 13, 1], "widths": [256, 512, 896, 2048],
             "group_width": 128, "block_type": "X"},
    "x320": {"depths": [2, 7, 13, 1], "widths": [336, 672, 1344, 2520],
             "group_width": 168, "block_type": "X"},
    "y002": {"depths": [1, 1, 4, 7], "widths": [24, 56, 152, 368],
             "group_width": 8, "block_type": "Y"},
    "y004": {"depths": [1, 3, 6, 6], "widths": [48, 104, 208, 440],
             "group_width": 8, "block_type": "Y"},
    "y006": {"depths": [1, 3, 7, 4], "widths": [48, 112, 256, 608],
             "group_width": 16, "block_type": "Y"},
    "y008": {"depths": [1, 3, 8, 2], "widths": [64, 128, 320, 768],
             "group_width": 16, "block_type": "Y"},
    "y016": {"depths": [2, 6, 17, 2], "widths": [48, 120, 336, 888],
             "group_width": 24, "block_type": "Y"},
    "y032": {"depths": [2, 5, 13, 1], "widths": [72, 216, 576, 1512],
             "group_width": 24, "block_type": "Y"},
    "y040": {"depths": [2, 6, 12, 2], "widths": [128, 192, 512, 1088],
             "group_width": 64, "block_type": "Y"},
    "y064": {"depths": [2, 7, 14, 2], "widths": [144, 288, 576, 1296],
             "group_width": 72, "block_type": "Y"},
    "y080": {"depths": [2, 4, 10, 1], "widths": [168, 448, 896, 2016],
             "group_width": 56, "block_type": "Y"},
    "y120": {"depths": [2, 5, 11, 1], "widths": [224, 448, 896, 2240],
             "group_width": 112, "block_type": "Y"},
    "y160": {"depths": [2, 4, 11, 1], "widths": [224, 448, 1232, 3024],
             "group_width": 112, "block_type": "Y"},
    "y320": {"depths": [2, 5, 12, 1], "widths": [232, 696, 1392, 3712],
             "group_width": 232, "block_type": "Y"},
}
DEFAULT_SIZE = 224


def squeeze_and_excite(inputs: jax.Array, se_filters: int, name: str
                       ) -> jax.Array:
  """tf-keras ``SqueezeAndExciteBlock``: GAP, 1x1 relu, 1x1 sigmoid, scale.

  Args:
    inputs: NHWC input.
    se_filters: channels of the squeeze conv.
    name: the block's Keras name prefix.

  Returns:
    ``inputs`` scaled per channel.
  """
  x = jnp.mean(inputs, axis=(1, 2), keepdims=True)
  x = nn.relu(L.conv(x, se_filters, 1,
                     name=name + "_squeeze_and_excite_squeeze"))
  x = nn.sigmoid(L.conv(x, inputs.shape[-1], 1,
                        name=name + "_squeeze_and_excite_excite"))
  return x * inputs


def block(inputs: jax.Array, bn: Callable[..., jax.Array], filters_out: int,
          group_width: int, stride: int, squeeze_excite: bool, name: str
          ) -> jax.Array:
  """tf-keras ``XBlock`` (``squeeze_excite=False``) or ``YBlock``.

  Args:
    inputs: NHWC input with ``filters_in`` channels.
    bn: ``L.batch_norm`` bound to the family's epsilon, momentum and mode.
    filters_out: the block's width.
    group_width: channels per group of the 3x3 conv
      (``groups = filters_out // group_width``, or 1 where that is 0).
    stride: 2 in a stage's first block (which also projects the skip), else
      1.
    squeeze_excite: the Y block's squeeze-and-excite after the 3x3 conv.
    name: the block's Keras name prefix, e.g.
      ``"regnetx002_Stage_0_XBlock_0"``.

  Returns:
    ``relu(residual + skip)``.
  """
  filters_in = inputs.shape[-1]
  if filters_in != filters_out and stride == 1:
    raise ValueError(f"{name}: input filters ({filters_in}) and output "
                     f"filters ({filters_out}) differ for stride 1")
  if stride != 1:
    skip = L.conv(inputs, filters_out, 1, strides=stride, use_bias=False,
                  name=name + "_skip_1x1")
    skip = bn(skip, name=name + "_skip_bn")
  else:
    skip = inputs
  x = L.conv(inputs, filters_out, 1, use_bias=False,
             name=name + "_conv_1x1_1")
  x = nn.relu(bn(x, name=name + "_conv_1x1_1_bn"))
  # tf-keras Conv2D takes ``groups or 1``: RegNetX080's first stage (width
  # 80, group width 120) asks for 0 groups and gets one.
  groups = filters_out // group_width or 1
  x = L.conv(x, filters_out, 3, strides=stride, padding="SAME",
             use_bias=False, groups=groups, name=name + "_conv_3x3")
  x = nn.relu(bn(x, name=name + "_conv_3x3_bn"))
  if squeeze_excite:
    # se_filters = int(filters_in * squeeze_excite_ratio): the *input* width.
    x = squeeze_and_excite(x, int(filters_in * SE_RATIO), name)
  x = L.conv(x, filters_out, 1, use_bias=False, name=name + "_conv_1x1_2")
  x = bn(x, name=name + "_conv_1x1_2_bn")
  return L.block_output(nn.relu(x + skip))


class RegNet(nn.Module):
  """tf-keras ``RegNet`` with X or Y blocks.

  Takes pixels in [0, 255] when ``include_preprocessing`` (the default): the
  model rescales them itself (``preprocess_input`` is the identity).

  Attributes:
    depths: blocks in each of the four stages (``MODEL_CONFIGS``).
    widths: output channels of each stage.
    group_width: channels per group of every 3x3 grouped conv.
    block_type: ``"X"`` or ``"Y"`` (X plus squeeze-and-excite).
    model_name: tf-keras' ``model_name``, the prefix of every layer name
      (``"regnetx002"``).
    include_preprocessing: ``Rescaling(1/255)`` at the start.
    include_top: add global average pooling and ``1head_dense``.
    classes: size of the classifier.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None`` for
      logits.
  """

  depths: Sequence[int]
  widths: Sequence[int]
  group_width: int
  block_type: str
  model_name: str
  include_preprocessing: bool = True
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.block_type not in ("X", "Y"):
      raise ValueError(f"block_type must be 'X' or 'Y', got "
                       f"{self.block_type!r}")
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, momentum=MOMENTUM,
                           arithmetic=BN_ARITHMETIC, train=train)
    name = self.model_name
    if self.include_preprocessing:
      # Rescaling: inputs * float32(scale) + 0.
      x = x * jnp.asarray(RESCALE, x.dtype)
    x = L.conv(x, STEM_FILTERS, 3, strides=2, padding="SAME", use_bias=False,
               name=name + "_stem_conv")
    x = nn.relu(bn(x, name=name + "_stem_bn"))
    for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
      for i in range(depth):
        x = block(x, bn, width, self.group_width, stride=2 if i == 0 else 1,
                  squeeze_excite=self.block_type == "Y",
                  name=f"{name}_Stage_{stage}_{self.block_type}Block_{i}")
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation,
                  name=HEAD_DENSE)


def keras_regnet(variant: str, **kwargs: Any) -> Any:
  """Builds tf-keras' ``RegNet<variant>``: session-independent names, and
  the documented ``classifier_activation``.

  tf-keras names the classifier from a per-session counter
  (``backend.get_uid("head")``): ``1head_dense``, then ``2head_dense`` for a
  second RegNet in the same process; the counter is reset first so it is
  always ``1head_dense``.

  tf-keras' RegNet also ignores ``classifier_activation``: its ``Head`` is a
  linear ``Dense`` whatever the argument (the bug tf-keras fixed in ConvNeXt's
  identical ``Head``, keras-team/tf-keras#319), so the model returns logits
  although the docstring promises softmax. The Dense gets the requested
  activation here, as that fix does; the weights are unchanged, and
  ``classifier_activation=None`` still gives tf-keras' own graph.

  Args:
    variant: ``"X002"`` … ``"Y320"``.
    **kwargs: arguments of the tf-keras constructor.
  """
  import tf_keras  # pylint: disable=g-import-not-at-top
  from tf_keras.src import backend  # pylint: disable=g-import-not-at-top
  uids = backend.PER_GRAPH_OBJECT_NAME_UIDS.get(backend.get_graph(), {})
  uids.pop("head", None)
  model = getattr(tf_keras.applications, f"RegNet{variant}")(**kwargs)
  if kwargs.get("include_top", True):
    dense = model.get_layer(HEAD_DENSE)
    dense.activation = tf_keras.activations.get(
        kwargs.get("classifier_activation", "softmax"))
  return model

for _key, _cfg in MODEL_CONFIGS.items():
  _variant = _key.upper()  # "X002"
  register(ModelSpec(
      name=f"regnet{_key}",
      keras_name=f"RegNet{_variant}",
      family="regnet",
      flax_cls=functools.partial(
          RegNet, depths=tuple(_cfg["depths"]), widths=tuple(_cfg["widths"]),
          group_width=_cfg["group_width"], block_type=_cfg["block_type"],
          model_name=f"regnet{_key}"),
      keras_fn=f"models.regnet.keras_regnet{_key}",
      keras_preprocess="tf_keras.applications.regnet",
      input_shape=(DEFAULT_SIZE, DEFAULT_SIZE, 3),
      preprocess="none",  # the model rescales itself (include_preprocessing)
      bn_epsilon=EPSILON,
      min_size=32,
      options={"include_preprocessing": True},
      option_choices={"include_preprocessing": (True, False)},
      slow=_key not in ("x002", "y002"),
      # tf-keras numbers the head from a session counter ("2head_dense" in a
      # session that built a RegNet before); files saved there still load.
      name_aliases=((r"^\d+head_dense$", "1head_dense"),),
  ))
  globals()[f"keras_regnet{_key}"] = functools.partial(keras_regnet,
                                                       _variant)
