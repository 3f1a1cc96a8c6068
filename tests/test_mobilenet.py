"""MobileNet (v1): Keras names, BatchNorm settings, the alpha /
depth_multiplier / dropout options, the conv_pad and conv_preds quirks, and
the legacy HDF5 layout of its published ImageNet files."""

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import translate
from models import mobilenet
from translate import keras_io
from flax_spy import batchnorm_settings


def _keras(**kwargs):
  return models.get_spec("mobilenet").keras_constructor()(weights=None,
                                                          **kwargs)


def _parity(seed, **kwargs):
  conv = translate.convert("mobilenet", weights="random", seed=seed, **kwargs)
  assert set(conv.report.match_counts) == {"exact"}
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "mobilenet",
                                  seed=seed + 1)
  assert report.passed, report.summary()
  return conv, report


def test_flax_names_and_shapes_are_keras():
  keras_model = _keras()
  layers = keras_io.read_weights(keras_model)
  canonical = keras_io.canonical_names(layers)
  shapes = translate.variable_shapes(models.create("mobilenet"),
                                     (224, 224, 3))
  flax_names = set(shapes["params"]) | set(shapes["batch_stats"])
  assert flax_names == {canonical[l.name] for l in layers}
  assert "conv_preds" in flax_names and "predictions" not in flax_names
  for layer in layers:
    for wname, array in layer.weights.items():
      rule = translate.RULES[layer.cls][wname]
      leaf = shapes[rule.collection][canonical[layer.name]][rule.leaf]
      assert leaf.shape == rule.apply(array).shape, (layer.name, wname)
  # Keras' trainable count of MobileNet 1.0 at 224 (its documented size).
  assert sum(x.size for x in jax.tree_util.tree_leaves(
      shapes["params"])) == 4_231_976


def test_batchnorm_settings_are_keras():
  seen = batchnorm_settings(models.create("mobilenet", alpha=0.25), (64, 64, 3))
  keras_bn = {l.name: l for l in _keras(alpha=0.25,
                                        input_shape=(64, 64, 3)).layers
              if type(l).__name__ == "BatchNormalization"}
  assert set(seen) == set(keras_bn) and len(seen) == 27
  for name, (eps, momentum, frozen) in seen.items():
    assert eps == keras_bn[name].epsilon == mobilenet.EPSILON == 1e-3, name
    assert momentum == pytest.approx(keras_bn[name].momentum) == 0.99, name
    assert frozen, f"{name} must use the moving statistics at inference"


def test_no_top_feature_map_parity_odd_non_square():
  # Odd sides: conv_pad_<i> pads bottom/right only, whatever the parity
  # (MobileNetV2's correct_pad would pad top/left too).
  conv, _ = _parity(3, include_top=False, input_shape=(97, 75, 3))
  assert conv.keras_model.output_shape[1:] == (3, 2, 1024)


@pytest.mark.parametrize("alpha,shape", [
    pytest.param(0.25, (96, 128, 3), marks=pytest.mark.slow),
    pytest.param(0.5, (64, 64, 3), marks=pytest.mark.slow),
    (0.75, (65, 97, 3))])
def test_alpha_parity(alpha, shape):
  conv, _ = _parity(5, alpha=alpha, input_shape=shape)
  assert conv.module.alpha == alpha
  # int(filters * alpha), no rounding to multiples of 8: 0.75 -> 24, 768.
  params = conv.variables["params"]
  assert params["conv1"]["kernel"].shape[-1] == int(32 * alpha)
  assert params["conv_pw_13"]["kernel"].shape[-1] == int(1024 * alpha)


def test_alpha_half_depth_multiplier_two_parity_at_small_odd_size():
  conv, _ = _parity(7, alpha=0.5, depth_multiplier=2,
                    input_shape=(65, 47, 3))
  assert conv.keras_model.input_shape[1:] == (65, 47, 3)
  # The depthwise kernel holds c * m filters: conv_dw_1 sees 16 channels.
  params = conv.variables["params"]
  assert params["conv_dw_1"]["kernel"].shape == (3, 3, 1, 32)
  assert params["conv_pw_1"]["kernel"].shape == (1, 1, 32, 32)


@pytest.mark.parametrize("shape", [(32, 32, 3), (33, 47, 3)])
def test_any_size_from_32_builds_without_imagenet_weights(shape):
  """Keras pins the sizes (128 … 224, square) only for ImageNet weights.
  (Parity at these sizes is not a fair test with random weights: the last
  blocks see 1x1 maps, so the calibrated BatchNorm variances of 4 images
  fall to their 1e-3 floor and amplify float32 rounding ~30x per layer.)"""
  keras_model = _keras(alpha=0.5, depth_multiplier=2, input_shape=shape)
  module = models.create("mobilenet", alpha=0.5, depth_multiplier=2,
                         include_top=False, input_shape=shape)
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  out = jax.eval_shape(module.init_with_output, jax.random.PRNGKey(0), x)[0]
  assert out.shape == (1, *_keras(
      alpha=0.5, depth_multiplier=2, include_top=False,
      input_shape=shape).output_shape[1:])
  assert keras_model.output_shape == (None, 1000)


@pytest.mark.slow
def test_depth_multiplier_keeps_keras_channel_order():
  """With ``depth_multiplier`` m, Keras' depthwise output channel c * m + j
  is input channel c's j-th filter; the Flax grouped kernel must hold it
  there (a swap of the last two axes would pass the shapes)."""
  conv = translate.convert("mobilenet", weights="random", seed=9,
                           depth_multiplier=2, alpha=0.25,
                           include_top=False, input_shape=(32, 32, 3))
  keras_dw = conv.keras_model.get_layer("conv_dw_1").kernel.numpy()
  flax_dw = conv.variables["params"]["conv_dw_1"]["kernel"]
  np.testing.assert_array_equal(flax_dw[:, :, 0, 2 * 3 + 1],
                                keras_dw[:, :, 3, 1])
  np.testing.assert_array_equal(flax_dw[:, :, 0, 2 * 5], keras_dw[:, :, 5, 0])


def test_dropout_option_reaches_both_models():
  def rates(train):
    seen = {}

    def spy(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.Dropout):
        seen[context.module.name] = (context.module.rate,
                                     context.module.deterministic)
      return next_fun(*args, **kwargs)

    module = models.create("mobilenet", alpha=0.25, dropout=0.3)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = translate.variable_shapes(module, (32, 32, 3))
    with nn.intercept_methods(spy):
      jax.eval_shape(lambda v, x: module.apply(
          v, x, train=train, mutable=["batch_stats"],
          rngs={"dropout": jax.random.PRNGKey(0)}), variables, x)
    return seen

  assert rates(train=False) == {"dropout": (0.3, True)}
  assert rates(train=True) == {"dropout": (0.3, False)}
  keras_model = _keras(alpha=0.25, dropout=0.3, input_shape=(32, 32, 3))
  assert keras_model.get_layer("dropout").rate == 0.3
  assert models.get_spec("mobilenet").options == {
      "alpha": 1.0, "depth_multiplier": 1, "dropout": 1e-3}


def _random_variables(module, shape, seed=0):
  """Random variables from the traced shapes (no compiled init)."""
  rng = np.random.default_rng(seed)
  shapes = translate.variable_shapes(module, shape)
  return jax.tree_util.tree_map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)


@pytest.mark.slow
def test_dropout_is_active_in_training_only():
  module = models.create("mobilenet", alpha=0.25, dropout=0.5,
                         classifier_activation=None)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = _random_variables(module, x.shape[1:])
  apply = jax.jit(module.apply, static_argnames=("train", "mutable"))
  eval_out = apply(variables, x)
  np.testing.assert_array_equal(eval_out, apply(variables, x))
  train_out, _ = apply(variables, x, train=True, mutable=("batch_stats",),
                       rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(train_out, eval_out)


@pytest.mark.slow
def test_top_is_a_1x1_conv_then_softmax():
  """classes != 1000 and the default softmax, compared as Keras returns it
  (not through check_parity, which compares logits)."""
  conv = translate.convert("mobilenet", weights="random", seed=13,
                           alpha=0.25, classes=10, input_shape=(64, 48, 3))
  assert conv.variables["params"]["conv_preds"]["kernel"].shape == (
      1, 1, 256, 10)
  assert conv.variables["params"]["conv_preds"]["bias"].shape == (10,)
  x = np.asarray(models.preprocess("mobilenet", translate.random_images(
      (64, 48, 3), 2, seed=14)))
  ref = np.asarray(conv.keras_model(x, training=False))
  out = np.asarray(jax.jit(conv.module.apply)(conv.variables, x))
  assert out.shape == ref.shape == (2, 10)
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_sizes_below_32_are_refused_like_keras():
  with pytest.raises(ValueError, match="at least 32"):
    models.create("mobilenet", input_shape=(31, 64, 3))
  with pytest.raises(ValueError):
    _keras(input_shape=(31, 64, 3))


def test_legacy_h5_weights_file(tmp_path):
  """The published MobileNet files (2017) are legacy HDF5: a top-level
  ``layer_names`` attribute and one group per layer. Write one from a
  randomized Keras model with Keras' own legacy writer and translate it."""
  from keras.src.legacy.saving import legacy_h5_format
  shape = (64, 80, 3)
  source = translate.build_keras("mobilenet", "random", seed=21, alpha=0.25,
                                 input_shape=shape)
  path = str(tmp_path / "mobilenet_2_5_64_tf.h5")
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, source)
  with h5py.File(path, "r") as f:
    names = [n.decode() if isinstance(n, bytes) else n
             for n in f.attrs["layer_names"]]
    assert "conv_dw_13" in names and "layers" not in f
  x = np.asarray(models.preprocess("mobilenet", translate.random_images(
      shape, 2, seed=22)))
  expected = np.asarray(source(x, training=False))
  bn = source.get_layer("conv_pw_13_bn")
  stats = {"mean": bn.moving_mean.numpy(), "var": bn.moving_variance.numpy()}
  del source, bn

  conv = translate.convert("mobilenet", weights=path, alpha=0.25,
                           input_shape=shape)
  assert set(conv.report.match_counts) == {"exact"}
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "mobilenet", seed=23)
  assert report.passed, report.summary()
  # The file's weights, not Keras' initializers, reached Keras and so Flax.
  np.testing.assert_allclose(conv.keras_model(x, training=False), expected,
                             atol=1e-6)
  for leaf, value in stats.items():
    np.testing.assert_array_equal(
        conv.variables["batch_stats"]["conv_pw_13_bn"][leaf], value)
