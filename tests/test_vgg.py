"""VGG16/VGG19: Keras names and block tables, the Flatten order of the top,
no-top parity at an odd, non-square size, and the softmax top.

VGG's Dense layers hold 120 M of its 138 M parameters, so these tests build
Keras models at small input sizes (``fc1`` then has ``h/32 * w/32 * 512``
inputs instead of 25088) and check the native ``fc1`` shape by tracing only.
The native-size parity is in ``tests/test_parity.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import translate
from models import vgg
from translate import keras_io


def _keras(name, **kwargs):
  return models.get_spec(name).keras_constructor()(weights=None, **kwargs)


@pytest.mark.parametrize("name", [
    "vgg16", pytest.param("vgg19", marks=pytest.mark.slow)])
def test_flax_names_and_shapes_are_keras(name):
  shape = (32, 64, 3)  # fc1: 1 * 2 * 512 inputs, not 25088
  layers = keras_io.read_weights(_keras(name, input_shape=shape))
  shapes = translate.variable_shapes(models.create(name), shape)["params"]
  assert set(shapes) == {l.name for l in layers}
  for layer in layers:
    assert layer.cls in ("Conv2D", "Dense")
    for wname, array in layer.weights.items():
      assert shapes[layer.name][wname].shape == array.shape, (
          layer.name, wname)
  convs = sorted(n for n in shapes if "_conv" in n)
  depth = int(name[3:])
  assert len(convs) == sum(n for _, n in vgg.BLOCKS[depth]) == depth - 3


@pytest.mark.parametrize("name,params", [
    ("vgg16", 138_357_544), ("vgg19", 143_667_240)])  # Keras' counts
def test_native_fc1_width_and_parameter_count(name, params):
  shapes = translate.variable_shapes(models.create(name), (224, 224, 3))
  assert set(shapes) == {"params"}  # no BatchNorm statistics
  assert shapes["params"]["fc1"]["kernel"].shape == (7 * 7 * 512, 4096)
  assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == params


def test_top_parity_flattens_height_width_channels():
  """Keras' channels-last ``Flatten`` is row-major over (h, w, c); on a
  non-square 2x3 final map any other order permutes fc1's 3072 inputs."""
  shape = (64, 96, 3)
  conv = translate.convert("vgg16", weights="random", seed=3, classes=10,
                           input_shape=shape)
  assert conv.variables["params"]["fc1"]["kernel"].shape == (2 * 3 * 512,
                                                              4096)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "vgg16", seed=4)
  assert report.logits and report.passed, report.summary()


def test_no_top_feature_map_parity_odd_non_square():
  shape = (97, 75, 3)
  conv = translate.convert("vgg16", weights="random", seed=5,
                           include_top=False, input_shape=shape)
  # Five 'valid' 2x2/2 pools floor: 97 -> 48 -> 24 -> 12 -> 6 -> 3,
  # 75 -> 37 -> 18 -> 9 -> 4 -> 2.
  assert conv.keras_model.output_shape[1:] == (3, 2, 512)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "vgg16", seed=6)
  assert not report.logits and report.passed, report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_no_top_pooling_parity(pooling):
  conv = translate.convert("vgg19", weights="random", seed=7,
                           include_top=False, pooling=pooling,
                           input_shape=(65, 33, 3))
  assert conv.keras_model.output_shape == (None, 512)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "vgg19", seed=8)
  assert report.passed, report.summary()


def test_default_top_is_softmax_like_keras():
  """Compared as Keras returns it (``check_parity`` compares logits)."""
  shape = (32, 32, 3)
  conv = translate.convert("vgg16", weights="random", seed=9, classes=5,
                           input_shape=shape)
  x = np.asarray(models.preprocess("vgg16", translate.random_images(
      shape, 2, seed=10)))
  ref = np.asarray(conv.keras_model(x, training=False))
  out = np.asarray(jax.jit(conv.module.apply)(conv.variables, x))
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_preprocessing_is_caffe():
  spec = models.get_spec("vgg16")
  assert spec.preprocess == models.get_spec("vgg19").preprocess == "caffe"
  images = translate.random_images((8, 8, 3), 1, seed=11)
  np.testing.assert_allclose(
      models.preprocess("vgg16", jnp.asarray(images)),
      spec.keras_preprocess_input()(images.copy()), atol=1e-4)
