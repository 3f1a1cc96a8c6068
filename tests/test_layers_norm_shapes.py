"""LayerNormalization, UnitNormalization and the shape layers (1D pooling,
upsampling, cropping, padding, augmentation) against Keras."""

import jax
import keras
import numpy as np
import pytest

import translate

from graph_check import check  # pylint: disable=g-bad-import-order

L = keras.layers


def _model(shape, *layers):
  x = inputs = keras.Input(shape)
  for layer in layers:
    x = layer(x)
  return keras.Model(inputs, x)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(epsilon=1e-5), dict(center=False), dict(scale=False),
    dict(axis=[1, 2]), dict(axis=1), dict(rms_scaling=True),
])
def test_layer_normalization(kwargs):
  c = check(_model((4, 5, 6), L.Dense(6), L.LayerNormalization(**kwargs)))
  ln = [k for k in c.variables["params"] if k.startswith("layer_norm")][0]
  want = set()
  if kwargs.get("scale", True) or kwargs.get("rms_scaling"):
    want.add("scale")
  if kwargs.get("center", True) and not kwargs.get("rms_scaling"):
    want.add("bias")
  assert set(c.variables["params"][ln]) == want


@pytest.mark.parametrize("axis", [-1, [1, 2]])
def test_unit_normalization(axis):
  check(_model((3, 4, 5), L.UnitNormalization(axis=axis)))


@pytest.mark.parametrize("cls", ["MaxPooling1D", "AveragePooling1D"])
@pytest.mark.parametrize("kwargs", [
    dict(pool_size=2), dict(pool_size=3, strides=2, padding="same"),
    dict(pool_size=3, strides=1, padding="valid"),
])
def test_pooling1d(cls, kwargs):
  check(_model((11, 4), getattr(L, cls)(**kwargs)))


@pytest.mark.parametrize("layer", [
    L.UpSampling1D(3), L.ZeroPadding1D((1, 2)), L.Cropping1D((2, 1)),
])
def test_1d_shapes(layer):
  check(_model((7, 3), layer))


@pytest.mark.parametrize("layer", [
    L.UpSampling2D((2, 3)), L.Cropping2D(((1, 0), (2, 1))), L.Cropping2D(1),
    L.ZeroPadding2D(((1, 0), (0, 2))),
])
def test_2d_shapes(layer):
  check(_model((6, 7, 3), layer))


def test_bilinear_upsampling_is_refused():
  with pytest.raises(translate.keras_io.UnsupportedLayerError,
                     match=r"\(UpSampling2D\): interpolation='bilinear'"):
    translate.from_keras(_model((4, 4, 2), L.UpSampling2D(
        interpolation="bilinear")))


@pytest.mark.parametrize("layer", [
    L.RandomFlip(), L.RandomRotation(0.2), L.RandomZoom(0.1),
    L.RandomTranslation(0.1, 0.1), L.RandomContrast(0.2),
    L.RandomBrightness(0.2),
])
def test_augmentation_is_identity_at_inference_and_refused_in_training(
    layer):
  c = check(_model((8, 8, 3), layer, L.Conv2D(2, 3)))
  x = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match=rf"{layer.name!r} \(" +
                     type(layer).__name__ + r"\) runs only at inference"):
    c.module.apply(c.variables, x, train=True,
                   rngs={"dropout": jax.random.PRNGKey(0)})
