"""Conv1D, Conv3D, DepthwiseConv1D/2D, SeparableConv1D/2D,
Conv1DTranspose/Conv2DTranspose (and Conv2D's options) against Keras:
non-square kernels and distinct channel counts, so a swapped or transposed
layout fails; strides with 'same' on odd sizes."""

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
    dict(padding="same", dilation_rate=2, depth_multiplier=2),
    dict(padding="valid", dilation_rate=(2, 1), activation="relu",
         data_format="channels_first"),
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


@pytest.mark.parametrize("kwargs", [
    dict(padding="same", strides=2, depth_multiplier=2),
    dict(padding="valid", dilation_rate=2, use_bias=False,
         activation="relu", data_format="channels_first"),
])
def test_depthwise_conv1d(kwargs):
  first = kwargs.get("data_format") == "channels_first"
  check(_model((3, 11) if first else (11, 3), L.DepthwiseConv1D(3, **kwargs)))


@pytest.mark.parametrize("kwargs", [
    dict(padding="same", strides=2, depth_multiplier=2),
    dict(padding="valid", dilation_rate=2, use_bias=False,
         activation="tanh"),
    dict(padding="same", data_format="channels_first"),
])
def test_separable_conv1d(kwargs):
  first = kwargs.get("data_format") == "channels_first"
  check(_model((3, 11) if first else (11, 3),
               L.SeparableConv1D(5, 3, **kwargs)))


@pytest.mark.parametrize("kwargs", [
    dict(padding="same", strides=2),
    dict(padding="valid", strides=3, output_padding=2, use_bias=False,
         activation="relu"),
    dict(padding="same", dilation_rate=2),
])
def test_conv1d_transpose(kwargs):
  check(_model((7, 3), L.Conv1DTranspose(5, 4, **kwargs)))


@pytest.mark.parametrize("kwargs", [
    dict(padding="same", strides=2),
    dict(padding="same", strides=(2, 3), output_padding=(1, 2)),
    dict(padding="valid", strides=(3, 2), output_padding=(0, 1),
         use_bias=False),
    dict(padding="valid", dilation_rate=(2, 1), activation="relu"),
    dict(padding="same", strides=2, data_format="channels_first"),
])
def test_conv2d_transpose(kwargs):
  check(_model((5, 7, 3), L.Conv2DTranspose(4, (3, 2), **kwargs)))


def test_unet_trains_like_keras(tmp_path):
  """Down, up by a stride-2 Conv2DTranspose, concatenated with the skip."""
  inputs = keras.Input((8, 6, 3))
  skip = L.Conv2D(4, 3, padding="same", activation="relu")(inputs)
  x = L.MaxPooling2D()(skip)
  x = L.Conv2D(6, (3, 2), padding="same")(x)
  x = L.BatchNormalization()(x)
  x = L.Activation("relu")(x)
  x = L.Conv2DTranspose(5, (3, 2), strides=2, padding="same")(x)
  x = L.Concatenate()([x, skip])
  x = L.Conv2D(2, 1)(x)
  check(keras.Model(inputs, x), train=True, tmp_path=tmp_path)


@pytest.mark.parametrize("layer", [
    # keras.io's U-Net upsampling: 3x3, stride 2, "same" (the converter
    # once gave 34x34 for 32x32 and XNNPack refused the file)
    L.Conv2DTranspose(4, 3, strides=2, padding="same"),
    # output_padding past the window: the rows after take no input
    L.Conv2DTranspose(4, (3, 2), strides=3, padding="valid",
                      output_padding=(2, 1)),
    L.Conv1DTranspose(4, 5, strides=2, padding="same"),
], ids=["3x3_stride2_same", "output_padding_past_the_window", "1d"])
def test_conv_transpose_exports_to_tflite(layer):
  """TFLite's TRANSPOSE_CONV has only SAME and VALID padding: each layer
  exports with builtin ops, loads in the default interpreter (XNNPack)
  and gives Keras' output."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from graph_check import assert_close  # pylint: disable=g-import-not-at-top
  from translate import random_weights  # pylint: disable=g-import-not-at-top
  shape = (16, 16, 3) if "2D" in type(layer).__name__ else (16, 3)
  model = _model(shape, layer)
  random_weights.randomize(model, 4)
  module, variables, _ = translate.from_keras(model)
  flatbuffer = translate.export_tflite(module.apply, variables,
                                       [((1, *shape), np.float32)])
  ops = translate.tflite_ops(flatbuffer)
  assert "TRANSPOSE_CONV" in ops and not [
      o for o in ops if o.startswith("CUSTOM") or o == "FLEX"], ops
  x = np.random.default_rng(5).normal(size=(1, *shape)).astype(np.float32)
  (out,) = translate.run_tflite(flatbuffer, x)
  assert_close(out, model(x, training=False), 1e-5)
