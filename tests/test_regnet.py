"""RegNetX/RegNetY (tf-keras): Keras names and shapes, grouped-conv group
counts, squeeze-and-excite only in Y models (on the block's input width),
BatchNorm settings, include_preprocessing, classifier_activation, no-top
parity at an odd non-square size, legacy ``.h5`` files by layer name."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import models
import translate
from models import regnet
from translate import keras_io
from translate import weights_files
from flax_spy import flax_calls

LEAF = {"kernel": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias",
        "moving_mean": "mean", "moving_variance": "var"}
SMALL = (64, 64, 3)


def keras_model(name, **kwargs):
  """tf-keras' model through the registry (weights=None, no download)."""
  return models.get_spec(name).keras_constructor()(weights=None, **kwargs)


@pytest.fixture(scope="module")
def keras_002():
  return {name: keras_model(name) for name in ("regnetx002", "regnety002")}


@pytest.mark.parametrize("name", ["regnetx002", "regnety002"])
def test_flax_names_and_shapes_are_keras(name, keras_002):
  layers = keras_io.read_weights(keras_002[name])
  canonical = keras_io.canonical_names(layers)
  # tf-keras' own names, the model name as prefix, the counter-named head.
  assert {l.name for l in layers} == set(canonical.values())
  assert f"{name}_stem_conv" in canonical
  assert f"{name}_Stage_3_{name[6].upper()}Block_0_conv_3x3" in canonical
  assert regnet.HEAD_DENSE == "1head_dense" in canonical
  shapes = translate.variable_shapes(models.create(name), (224, 224, 3))
  assert set(shapes["params"]) == {canonical[l.name] for l in layers}
  assert set(shapes["batch_stats"]) == {
      l.name for l in layers if l.cls == "BatchNormalization"}
  for layer in layers:
    for wname, array in layer.weights.items():
      leaf = LEAF[wname]
      coll = "batch_stats" if leaf in ("mean", "var") else "params"
      assert shapes[coll][layer.name][leaf].shape == array.shape, (
          layer.name, wname)


@pytest.mark.parametrize("name", ["regnetx002", "regnety002"])
def test_group_counts_are_keras(name, keras_002):
  """Every Flax conv's feature_group_count is its Keras Conv2D's groups:
  ``filters_out // group_width`` for the 3x3 convs (3 … 46 here), 1 for the
  stem, the 1x1s and the squeeze-and-excite convs."""
  convs = flax_calls(models.create(name), SMALL, nn.Conv)
  keras_convs = {l.name: l.groups for l in keras_002[name].layers
                 if type(l).__name__ == "Conv2D"}
  assert set(convs) == set(keras_convs)
  for conv_name, groups in keras_convs.items():
    assert convs[conv_name].feature_group_count == groups, conv_name
  grouped = {n for n, g in keras_convs.items() if g > 1}
  assert grouped == {n for n in keras_convs if n.endswith("_conv_3x3")}
  # regnet*002: group width 8, widths 24, 56, 152, 368.
  assert sorted(set(keras_convs[n] for n in grouped)) == [3, 7, 19, 46]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["regnetx080", "regnetx160", "regnety320"])
def test_group_counts_of_wide_groups(name):
  """Group widths 120 / 128 / 232: RegNetX080's first stage (width 80)
  asks for 80 // 120 = 0 groups and tf-keras makes it 1; RegNetY320's first
  stage (width 232) has a single group, its last 16."""
  convs = flax_calls(models.create(name, include_top=False), SMALL, nn.Conv)
  keras_convs = {l.name: l.groups for l in keras_model(
      name, include_top=False, input_shape=SMALL).layers
                 if type(l).__name__ == "Conv2D"}
  assert set(convs) == set(keras_convs)
  for conv_name, groups in keras_convs.items():
    assert convs[conv_name].feature_group_count == groups, conv_name
  cfg = regnet.MODEL_CONFIGS[name[-4:]]
  first = f"{name}_Stage_0_{cfg['block_type']}Block_0_conv_3x3"
  assert keras_convs[first] == max(1, cfg["widths"][0] // cfg["group_width"])


def _se_modules(name):
  shapes = translate.variable_shapes(models.create(name, include_top=False),
                                     SMALL)["params"]
  return {k: v for k, v in shapes.items() if "squeeze_and_excite" in k}


@pytest.mark.parametrize("x_name", [
    "regnetx002", pytest.param("regnetx004", marks=pytest.mark.slow)])
def test_squeeze_excite_only_in_y_models(x_name):
  assert not _se_modules(x_name)
  y_name = x_name.replace("x", "y")
  cfg = regnet.MODEL_CONFIGS[y_name[-4:]]
  se = _se_modules(y_name)
  assert len(se) == 2 * sum(cfg["depths"])  # squeeze + excite per block
  # Squeeze to a quarter of the block's *input* width (tf-keras YBlock):
  # 32 from the stem into stage 0, the previous stage's width into a
  # stage's first block.
  widths_in = [regnet.STEM_FILTERS] + cfg["widths"][:-1]
  for stage, (depth, width) in enumerate(zip(cfg["depths"], cfg["widths"])):
    for i in range(depth):
      prefix = f"{y_name}_Stage_{stage}_YBlock_{i}_squeeze_and_excite_"
      squeeze = (widths_in[stage] if i == 0 else width) // 4
      assert se[prefix + "squeeze"]["kernel"].shape == (1, 1, width, squeeze)
      assert se[prefix + "excite"]["kernel"].shape == (1, 1, squeeze, width)
      assert se[prefix + "excite"]["bias"].shape == (width,)


def test_batchnorm_settings_are_keras(keras_002):
  keras_bn = {l.name: l for l in keras_002["regnety002"].layers
              if type(l).__name__ == "BatchNormalization"}
  seen = flax_calls(models.create("regnety002"), SMALL, nn.BatchNorm)
  assert set(seen) == set(keras_bn)
  for name, bn in seen.items():
    assert bn.epsilon == keras_bn[name].epsilon == 1e-5, name
    assert bn.momentum == pytest.approx(keras_bn[name].momentum), name
    assert bn.momentum == pytest.approx(0.9), name
    assert bn.use_running_average, name
  assert models.get_spec("regnety002").bn_epsilon == 1e-5


def test_prestem_is_rescaling_only(keras_002):
  """No ImageNet mean/std despite PreStem's docstring: one Rescaling layer
  of scale 1/255, no Normalization, and preprocess_input is the identity."""
  layers = keras_002["regnetx002"].layers
  assert not any(type(l).__name__ == "Normalization" for l in layers)
  (rescaling,) = [l for l in layers if type(l).__name__ == "Rescaling"]
  assert rescaling.name == "regnetx002_prestem_rescaling"
  assert rescaling.scale == regnet.RESCALE and rescaling.offset == 0.0
  x = np.full((1, 2, 2, 3), 255.0, np.float32)
  np.testing.assert_array_equal(
      models.get_spec("regnetx002").keras_preprocess_input()(x), x)
  np.testing.assert_array_equal(models.preprocess("regnetx002", x), x)
  assert models.get_spec("regnetx002").options == {
      "include_preprocessing": True}


@pytest.mark.parametrize("name,kwargs", [
    # Odd, non-square: every SAME 3x3/2 conv pads (1, 1), the 1x1/2 skips
    # stay aligned (97x75 -> 49x38 -> 25x19 -> 13x10 -> 7x5 -> 4x3).
    ("regnetx002", {"include_top": False, "input_shape": (97, 75, 3)}),
    # Y blocks without the Rescaling: Keras gets raw pixels, so must Flax.
    ("regnety002", {"include_top": False, "pooling": "max",
                    "include_preprocessing": False,
                    "input_shape": (41, 35, 3)}),
], ids=["x002-features-97x75", "y002-no-preprocessing-max-41x35"])
def test_parity(name, kwargs):
  conv = translate.convert(name, weights="random", seed=21, **kwargs)
  assert conv.report.match_counts == {"exact": len(
      keras_io.read_weights(conv.keras_model))}
  if kwargs.get("include_preprocessing") is False:
    assert not any(type(l).__name__ == "Rescaling"
                   for l in conv.keras_model.layers)
  if kwargs.get("pooling") is None:
    assert conv.keras_model.output_shape == (None, 4, 3, 368)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, name, seed=22,
                                  input_shape=kwargs["input_shape"])
  assert report.passed, report.summary()
  assert report.max_rel < 1e-5, report.summary()


def test_head_activation_is_applied(keras_002):
  """tf-keras' Head ignores classifier_activation (its Dense stays linear);
  the registry's Keras builder applies it as documented."""
  dense = keras_002["regnetx002"].get_layer(regnet.HEAD_DENSE)
  assert dense.activation.__name__ == "softmax"
  assert keras_002["regnetx002"].layers[-1] is dense


@pytest.mark.slow
def test_softmax_by_default_and_logits_with_none():
  """tf-keras' Head ignores classifier_activation; the registry's Keras
  builder applies it (keras_regnet), and Flax returns the same softmax."""
  conv = translate.convert("regnetx002", weights="random", seed=31,
                           input_shape=SMALL, classes=10)
  x = np.random.default_rng(1).uniform(0, 255, (2, *SMALL)).astype(
      np.float32)
  ref = np.asarray(conv.keras_model(x, training=False))
  out = np.asarray(conv.module.apply(conv.variables, x))
  np.testing.assert_allclose(ref.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
  logits = np.asarray(conv.module.clone(classifier_activation=None).apply(
      conv.variables, x))
  np.testing.assert_allclose(jax.nn.softmax(logits), out, rtol=1e-5,
                             atol=1e-7)
  raw = keras_model("regnetx002", input_shape=SMALL, classes=10,
                    classifier_activation=None)
  assert raw.get_layer(regnet.HEAD_DENSE).activation.__name__ == "linear"


@pytest.mark.slow
def test_legacy_h5_from_tf_keras_translates_by_name(tmp_path):
  """tf-keras ``save_weights("x.h5")`` of a randomized RegNetX002, built
  after another RegNet in the same session (the head counter moved on),
  translates by layer name and reproduces the randomized model."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  tf_keras.applications.RegNetY002(weights=None, include_top=False,
                                   input_shape=(32, 32, 3))
  source = translate.build_keras("regnetx002", "random", seed=41)
  assert source.layers[-1].name == "1head_dense"
  path = str(tmp_path / "x.h5")
  source.save_weights(path)
  stored = weights_files.read_weights_file(path)
  assert "1head_dense" in stored and "regnetx002_stem_bn" in stored
  conv = translate.convert("regnetx002", weights=path)
  assert conv.report.match_counts == {"exact": len(stored)}
  np.testing.assert_array_equal(
      conv.variables["params"]["regnetx002_Stage_3_XBlock_6_conv_3x3"][
          "kernel"],
      source.get_layer("regnetx002_Stage_3_XBlock_6_conv_3x3").kernel)
  report = translate.check_parity(conv.module, conv.variables, source,
                                  "regnetx002", seed=42)
  assert report.logits and report.passed, report.summary()
