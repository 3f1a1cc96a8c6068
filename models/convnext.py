"""ConvNeXt Tiny … XLarge, mirroring ``keras/src/applications/convnext.py``.

Quirks copied from Keras on purpose:

- ``include_preprocessing=True`` adds ``Normalization(mean=..., variance=...)``
  (``<name>_prestem_normalization``) for 3-channel inputs. Its mean/variance
  are constructor arguments, i.e. constants of the architecture (the layer
  has no weights), so they are copied here, as in ``models/resnet_rs.py``.
- The stem and the three downsampling layers are Keras ``Sequential``
  sub-models; the translator sees their inner layers
  (``convnext_tiny_stem_conv``, ``convnext_tiny_downsampling_layernorm_0``,
  …), which are the Flax names here (the ``Sequential`` adds no level).
- The depthwise conv is a grouped ``Conv2D`` (7x7, ``same``, with bias), the
  pointwise convs are ``Dense`` layers on the channel axis, GELU is exact
  (erf) and every LayerNormalization has epsilon 1e-6.
- Without the top, Keras still ends with an auto-named
  ``LayerNormalization(epsilon=1e-6)`` (``layer_normalization``) after the
  optional pooling, on the feature map itself when ``pooling=None``.
- ``StochasticDepth`` drops whole samples (one draw per sample) in training
  only; its rates grow linearly from 0 over all the blocks.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers as L
from models.registry import ModelSpec, register

LN_EPSILON = 1e-6  # every LayerNormalization(epsilon=1e-6) in convnext.py
KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), Normalization's floor
# PreStem: Normalization(mean=[0.485 * 255, …], variance=[(0.229 * 255) ** 2,
# …]) -- ImageNet statistics on the [0, 255] scale.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
VARIANCE_RGB = ((0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2)

# Keras' MODEL_CONFIGS: (depths, projection_dims); default_size 224 for all.
VARIANTS = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
DEFAULT_SIZE = 224


def prestem(x: jax.Array) -> jax.Array:
  """Keras ``PreStem``'s ``Normalization`` with its constant mean/variance,
  op for op: ``(x - mean) / max(sqrt(variance), 1e-7)`` in float32."""
  mean = jnp.asarray(MEAN_RGB, x.dtype)
  std = jnp.maximum(jnp.sqrt(jnp.asarray(VARIANCE_RGB, x.dtype)),
                    KERAS_EPSILON)
  return (x - mean) / std


class StochasticDepth(nn.Module):
  """Keras ConvNeXt's ``StochasticDepth``: in training, each sample's
  residual branch is kept with probability ``1 - rate`` and rescaled.

  Keras computes ``x / keep * floor(keep + uniform[0, 1))`` with one uniform
  draw per sample; the draw comes from the ``dropout`` RNG stream here.

  Attributes:
    rate: drop probability (Keras ``drop_path_rate``).
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if not train:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    u = jax.random.uniform(self.make_rng("dropout"), shape, x.dtype)
    return (x / keep) * jnp.floor(keep + u)


def convnext_block(inputs: jax.Array, projection_dim: int, *, name: str,
                   drop_path_rate: float = 0.0,
                   layer_scale_init_value: float | None = 1e-6,
                   train: bool = False) -> jax.Array:
  """Keras ``ConvNeXtBlock``.

  Args:
    inputs: NHWC input with ``projection_dim`` channels.
    projection_dim: the block's width.
    name: Keras name prefix, e.g. ``"convnext_tiny_stage_0_block_0"``.
    drop_path_rate: stochastic-depth rate of this block (0: Keras uses a
      linear ``Activation`` instead, a no-op).
    layer_scale_init_value: ``LayerScale`` initial value; ``None`` leaves
      the layer out, as in Keras (0.0 keeps it, initialized to zero).
    train: training mode (stochastic depth on).

  Returns:
    ``inputs`` plus the scaled (and possibly dropped) residual branch.
  """
  x = L.conv(inputs, projection_dim, 7, padding="SAME", groups=projection_dim,
             name=f"{name}_depthwise_conv")
  x = L.layer_norm(x, epsilon=LN_EPSILON, name=f"{name}_layernorm")
  x = L.dense(x, 4 * projection_dim, name=f"{name}_pointwise_conv_1")
  x = L.ACTIVATIONS["gelu"](x)  # Activation("gelu"): exact, not tanh
  x = L.dense(x, projection_dim, name=f"{name}_pointwise_conv_2")
  if layer_scale_init_value is not None:
    x = L.LayerScale(layer_scale_init_value, name=f"{name}_layer_scale")(x)
  if drop_path_rate:
    x = StochasticDepth(drop_path_rate, name=f"{name}_stochastic_depth")(
        x, train)
  return inputs + x


class ConvNeXt(nn.Module):
  """Keras ``ConvNeXt``.

  Takes pixels in [0, 255] when ``include_preprocessing`` (the default): the
  model normalizes them itself.

  Attributes:
    depths: blocks per stage.
    projection_dims: width of each stage.
    prefix: Keras' model ``name`` that prefixes every layer name
      (``"convnext_tiny"``).
    include_preprocessing: add Keras' ``PreStem`` normalization (3-channel
      inputs only, as in Keras).
    drop_path_rate: largest stochastic-depth rate (``np.linspace(0, rate,
      sum(depths))`` over the blocks, as in Keras).
    layer_scale_init_value: ``LayerScale`` initial value (``None``: no
      ``LayerScale`` layers).
    include_top: add the ``<prefix>_head_*`` layers.
    classes: size of ``<prefix>_head_dense``.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None`` for
      logits.
  """

  depths: Sequence[int]
  projection_dims: Sequence[int]
  prefix: str
  include_preprocessing: bool = True
  drop_path_rate: float = 0.0
  layer_scale_init_value: float | None = 1e-6
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    p = self.prefix
    ln = functools.partial(L.layer_norm, epsilon=LN_EPSILON)
    if self.include_preprocessing and x.shape[-1] == 3:
      x = prestem(x)
    # Sequential "<p>_stem".
    x = L.conv(x, self.projection_dims[0], 4, strides=4, name=f"{p}_stem_conv")
    x = ln(x, name=f"{p}_stem_layernorm")
    rates = [float(r) for r in
             np.linspace(0.0, self.drop_path_rate, sum(self.depths))]
    cur = 0
    for i, (depth, dim) in enumerate(zip(self.depths, self.projection_dims)):
      if i:  # Sequential "<p>_downsampling_block_{i - 1}"
        x = ln(x, name=f"{p}_downsampling_layernorm_{i - 1}")
        x = L.conv(x, dim, 2, strides=2, name=f"{p}_downsampling_conv_{i - 1}")
      for j in range(depth):
        x = convnext_block(
            x, dim, name=f"{p}_stage_{i}_block_{j}",
            drop_path_rate=rates[cur + j],
            layer_scale_init_value=self.layer_scale_init_value, train=train)
      cur += depth
    if self.include_top:  # Head
      x = L.global_pool(x, "avg")
      x = ln(x, name=f"{p}_head_layernorm")
      x = L.dense(x, self.classes, name=f"{p}_head_dense")
      return L.activation(self.classifier_activation)(x)
    if self.pooling is not None:
      x = L.global_pool(x, self.pooling)
    return ln(x, name="layer_normalization")  # Keras' unnamed LayerNorm


def keras_convnext(variant: str, **kwargs: Any) -> Any:
  """Keras' ConvNeXt ``variant`` with every option ``models.create`` takes.

  The public ``keras.applications.ConvNeXtTiny`` … fix ``drop_path_rate=0.0``
  and ``layer_scale_init_value=1e-6``; this calls the ``ConvNeXt`` builder
  they forward to, with their configuration, name and weights name, so that
  those two options reach Keras too (ImageNet weights load the same way).
  """
  from keras.src.applications import convnext  # pylint: disable=g-import-not-at-top
  config = convnext.MODEL_CONFIGS[variant]
  kwargs = {"drop_path_rate": 0.0, "layer_scale_init_value": 1e-6,
            "weights": "imagenet", **kwargs}
  return convnext.ConvNeXt(
      depths=config["depths"], projection_dims=config["projection_dims"],
      default_size=config["default_size"], name=f"convnext_{variant}",
      weights_name=f"convnext_{variant}", **kwargs)


for _variant, (_depths, _dims) in VARIANTS.items():
  _keras_name = "ConvNeXt" + ("XLarge" if _variant == "xlarge"
                              else _variant.title())
  register(ModelSpec(
      name=_keras_name.lower(),
      keras_name=_keras_name,
      family="convnext",
      flax_cls=functools.partial(ConvNeXt, depths=_depths,
                                 projection_dims=_dims,
                                 prefix=f"convnext_{_variant}"),
      keras_fn=f"models.convnext.keras_convnext_{_variant}",
      keras_preprocess="keras.applications.convnext",  # a no-op
      input_shape=(DEFAULT_SIZE, DEFAULT_SIZE, 3),
      preprocess="none",  # the model normalizes itself
      bn_epsilon=LN_EPSILON,  # no BatchNorm: the LayerNormalization epsilon
      min_size=32,
      options={"include_preprocessing": True, "drop_path_rate": 0.0,
               "layer_scale_init_value": 1e-6},
      option_choices={"include_preprocessing": (True, False)},
      slow=_variant != "tiny",
  ))
  globals()[f"keras_convnext_{_variant}"] = functools.partial(keras_convnext,
                                                              _variant)
