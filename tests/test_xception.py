"""Xception: Keras names (the auto-named residual convolutions included),
BatchNorm settings, no-top parity at an odd, non-square size, and the block
quirks (the unnamed residual convolutions, 'same' max pools, 'valid' block1)."""

import jax
import pytest

import models
import translate
from models import xception
from translate import keras_io
from flax_spy import batchnorm_settings


def _keras(**kwargs):
  return models.get_spec("xception").keras_constructor()(weights=None,
                                                         **kwargs)


@pytest.fixture(scope="module")
def keras_xception():
  # Another model first: Keras' session counter then names the residual
  # convolutions conv2d_1 … conv2d_4, and canonical names must undo it.
  import keras
  keras.layers.Conv2D(1, 1)(keras.Input((8, 8, 1)))
  keras.layers.BatchNormalization()(keras.Input((8, 8, 1)))
  return _keras()


def test_flax_names_and_shapes_are_keras(keras_xception):
  layers = keras_io.read_weights(keras_xception)
  canonical = keras_io.canonical_names(layers)
  assert canonical["conv2d_4"] == "conv2d_3"  # the fixture shifted them
  shapes = translate.variable_shapes(models.create("xception"),
                                     (299, 299, 3))
  flax_names = set(shapes["params"])
  assert flax_names == {canonical[l.name] for l in layers}
  for layer in layers:
    for wname, array in layer.weights.items():
      rule = translate.RULES[layer.cls][wname]
      leaf = shapes[rule.collection][canonical[layer.name]][rule.leaf]
      assert leaf.shape == rule.apply(array).shape, (layer.name, wname)
  assert sum(x.size for x in jax.tree_util.tree_leaves(
      shapes["params"])) == 22_855_952  # Keras' trainable count


def test_residual_convs_are_named_in_keras_construction_order():
  """The four strided 1x1 shortcuts are unnamed in Keras: conv2d (block2,
  64 -> 128), conv2d_1 (128 -> 256), conv2d_2 (256 -> 728), conv2d_3
  (block13, 728 -> 1024), each with its batch_normalization[_i]."""
  shapes = translate.variable_shapes(models.create("xception"),
                                     (71, 71, 3))["params"]
  for i, (cin, cout) in enumerate(((64, 128), (128, 256), (256, 728),
                                   (728, 1024))):
    suffix = f"_{i}" if i else ""
    assert shapes[f"conv2d{suffix}"]["kernel"].shape == (1, 1, cin, cout)
    assert "bias" not in shapes[f"conv2d{suffix}"]
    assert shapes[f"batch_normalization{suffix}"]["scale"].shape == (cout,)
  # Separable convs keep Keras' leaves, without bias.
  assert set(shapes["block4_sepconv1"]) == {"depthwise_kernel",
                                            "pointwise_kernel"}
  assert shapes["block4_sepconv1"]["pointwise_kernel"].shape == (
      1, 1, 256, 728)


def test_batchnorm_settings_are_keras(keras_xception):
  seen = batchnorm_settings(models.create("xception"), (71, 71, 3))
  layers = keras_io.read_weights(keras_xception)
  canonical = keras_io.canonical_names(layers)
  keras_bn = {canonical[l.name]: keras_xception.get_layer(l.name)
              for l in layers if l.cls == "BatchNormalization"}
  assert set(seen) == set(keras_bn) and len(seen) == 40
  for name, (eps, momentum, frozen) in seen.items():
    assert eps == keras_bn[name].epsilon == xception.EPSILON == 1e-3, name
    assert momentum == pytest.approx(keras_bn[name].momentum) == 0.99, name
    assert frozen, f"{name} must use the moving statistics at inference"


def test_no_top_feature_map_parity_odd_non_square():
  shape = (97, 75, 3)
  conv = translate.convert("xception", weights="random", seed=3,
                           include_top=False, input_shape=shape)
  assert set(conv.report.match_counts) == {"exact"}
  # block1's 'valid' convs: 97 -> 48 -> 46, 75 -> 37 -> 35; then four
  # 'same' 3x3/2 pools: 46 -> 23 -> 12 -> 6 -> 3, 35 -> 18 -> 9 -> 5 -> 3.
  assert conv.keras_model.output_shape[1:] == (3, 3, 2048)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "xception", seed=4)
  # Compared as is: the final block14_sepconv2_act ReLU is a feature.
  assert not report.logits and report.passed, report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_no_top_pooling_parity(pooling):
  shape = (80, 71, 3)  # the minimum side, Keras' min_size
  conv = translate.convert("xception", weights="random", seed=5,
                           include_top=False, pooling=pooling,
                           input_shape=shape)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "xception", seed=6)
  assert not report.logits and report.passed, report.summary()
  assert conv.keras_model.output_shape == (None, 2048)


@pytest.mark.slow
def test_top_parity_at_a_small_non_native_size():
  conv = translate.convert("xception", weights="random", seed=7, classes=7,
                           input_shape=(90, 113, 3))
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "xception", seed=8)
  assert report.logits and report.passed, report.summary()


def test_sizes_below_71_are_refused_like_keras():
  assert models.get_spec("xception").min_size == 71
  with pytest.raises(ValueError, match="at least 71"):
    models.create("xception", input_shape=(70, 99, 3))
  with pytest.raises(ValueError):
    _keras(include_top=False, input_shape=(70, 99, 3))
