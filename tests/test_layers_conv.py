"""Conv1D, Conv3D, DepthwiseConv2D, SeparableConv2D (and Conv2D's options)
against Keras: non-square kernels and distinct channel counts, so a swapped
or transposed layout fails; strides with 'same' on odd sizes."""

import keras
import pytest

from graph_check import check  # pylint: disable=g-bad-import-order

L = keras.layers


def _model(shape, *layers):
  x = inputs = keras.Input(shape)
  for layer in layers:
    x = layer(x)
  return keras.Model(inputs, x)


@pytest.mark.parametrize("kwargs", [
    dict(padding="valid"), dict(padding="same", strides=2),
    dict(padding="causal", dilation_rate=2), dict(padding="same", groups=2),
    dict(padding="valid", use_bias=False, activation="relu"),
])
def test_conv1d(kwargs):
  check(_model((11, 4), L.Conv1D(6, 3, **kwargs)))


@pytest.mark.parametrize("kwargs", [
    dict(padding="same", strides=(2, 1, 2)), dict(padding="valid"),
])
def test_conv3d(kwargs):
  check(_model((5, 7, 6, 3), L.Conv3D(4, (3, 2, 2), **kwargs)))


@pytest.mark.parametrize("kwargs", [
    dict(padding="same", strides=2, depth_multiplier=2),
    dict(padding="valid", kernel_size=(3, 2)),
    dict(padding="same", use_bias=False, activation="relu6"),
    dict(padding="same", dilation_rate=2),
])
def test_depthwise_conv2d(kwargs):
  kwargs = {"kernel_size": 3, **kwargs}
  check(_model((9, 8, 3), L.DepthwiseConv2D(**kwargs)))


@pytest.mark.parametrize("kwargs", [
    dict(padding="same", strides=2, depth_multiplier=2),
    dict(padding="valid", use_bias=False),
])
def test_separable_conv2d(kwargs):
  check(_model((9, 8, 3), L.SeparableConv2D(5, (3, 2), **kwargs)))


@pytest.mark.parametrize("kwargs", [
    dict(padding="same", strides=(2, 3)), dict(dilation_rate=2),
    dict(groups=3, filters=6), dict(data_format="channels_first"),
])
def test_conv2d_options(kwargs):
  kwargs = {"filters": 4, "kernel_size": (3, 2), **kwargs}
  check(_model((9, 10, 3), L.Conv2D(**kwargs)))


def test_conv_then_batchnorm_trains_like_keras():
  check(_model((9, 8, 3), L.DepthwiseConv2D(3, padding="same"),
               L.BatchNormalization(), L.Conv2D(4, 1)), train=True)
