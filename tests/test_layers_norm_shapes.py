"""LayerNormalization, UnitNormalization, GroupNormalization,
Normalization, PReLU and the shape layers (1D/3D pooling, upsampling,
cropping, padding, resizing, center crop, augmentation) against Keras."""

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


@pytest.mark.parametrize("kwargs", [
    dict(groups=2), dict(groups=-1, epsilon=1e-5), dict(groups=3,
                                                        center=False),
    dict(groups=2, scale=False), dict(groups=2, axis=1),
])
def test_group_normalization(kwargs):
  # 6 channels in 2 or 3 groups (or 6): a wrong grouping order (strided
  # instead of consecutive channels) or a per-group scale fails.
  c = check(_model((5, 4, 6), L.Conv2D(6, 2),
                   L.GroupNormalization(**kwargs)), train=True)
  gn = [k for k in c.variables["params"] if k.startswith("group_norm")][0]
  want = {"scale"} if kwargs.get("scale", True) else set()
  want |= {"bias"} if kwargs.get("center", True) else set()
  assert set(c.variables["params"][gn]) == want


@pytest.mark.parametrize("axis", [-1, (1, 3), None])
def test_adapted_normalization(axis):
  layer = L.Normalization(axis=axis)
  layer.adapt(np.random.default_rng(0).normal(2.0, 3.0, (16, 4, 3, 5)))
  # check() randomizes the statistics again; the distinct positive
  # variances make a swapped mean/variance or a wrong axis fail.
  c = check(_model((4, 3, 5), layer, L.Dense(2)), train=True)
  stats = c.variables["batch_stats"]["normalization"]
  assert set(stats) == {"mean", "var"}


@pytest.mark.parametrize("kwargs", [
    dict(mean=[1.0, -2.0, 0.5], variance=[4.0, 0.25, 1.0]),
    dict(mean=0.5, variance=2.0, invert=True),
])
def test_normalization_with_given_statistics(kwargs):
  c = check(_model((4, 3), L.Normalization(**kwargs)), randomize=False)
  assert "batch_stats" not in c.variables


def test_inverted_adapted_normalization():
  layer = L.Normalization(invert=True)
  layer.adapt(np.random.default_rng(1).normal(-1.0, 2.0, (16, 3)))
  check(_model((3,), layer))


@pytest.mark.parametrize("shared_axes", [None, [1, 2]])
def test_prelu(shared_axes):
  c = check(_model((4, 5, 3), L.Conv2D(3, 2), L.PReLU(shared_axes=shared_axes)))
  alpha = c.variables["params"]["p_re_lu"]["alpha"]
  assert alpha.shape == ((3, 4, 3) if shared_axes is None else (1, 1, 3))


@pytest.mark.parametrize("cls", ["MaxPooling3D", "AveragePooling3D"])
@pytest.mark.parametrize("kwargs", [
    dict(pool_size=2), dict(pool_size=(3, 2, 2), strides=2, padding="same"),
])
def test_pooling3d(cls, kwargs):
  check(_model((5, 7, 6, 2), getattr(L, cls)(**kwargs)))


@pytest.mark.parametrize("kwargs", [
    dict(height=5, width=9), dict(height=12, width=7),
    dict(height=5, width=9, interpolation="nearest"),
    dict(height=4, width=3, antialias=True),
    dict(height=5, width=9, data_format="channels_first"),
])
def test_resizing(kwargs):
  check(_model((8, 6, 3), L.Resizing(**kwargs)))


@pytest.mark.parametrize("kwargs", [
    dict(height=5, width=3), dict(height=4, width=6),
    dict(height=3, width=2, data_format="channels_first"),
])
def test_center_crop(kwargs):
  check(_model((8, 6, 3) if "data_format" not in kwargs else (3, 8, 6),
               L.CenterCrop(**kwargs)))


def test_center_crop_larger_than_input_is_refused():
  with pytest.raises(translate.keras_io.UnsupportedLayerError,
                     match=r"\(CenterCrop\): an input of 4x6 for a 5x5 crop"):
    translate.from_keras(_model((4, 6, 3), L.CenterCrop(5, 5)))


@pytest.mark.parametrize("kwargs,what", [
    (dict(crop_to_aspect_ratio=True), "crop_to_aspect_ratio=True"),
    (dict(interpolation="bicubic"), "interpolation='bicubic'"),
])
def test_resizing_options_it_does_not_reproduce_are_refused(kwargs, what):
  with pytest.raises(translate.keras_io.UnsupportedLayerError,
                     match=r"\(Resizing\): " + what):
    translate.from_keras(_model((4, 6, 3), L.Resizing(3, 3, **kwargs)))


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
