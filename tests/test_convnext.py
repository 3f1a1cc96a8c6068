"""ConvNeXt specifics: Keras names (inside the Sequential stem/downsampling
sub-models), LayerNorm epsilons, exact GELU, translated LayerScale values,
stochastic depth, the constant PreStem normalization and every option's
parity with Keras."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
from keras.src.applications import convnext as keras_convnext
import numpy as np
import pytest

import models
import translate
from models import convnext
from translate import keras_io, random_weights


def _log(name, kwargs, report):
  if os.environ.get("PARITY_LOG"):
    with open(os.environ["PARITY_LOG"], "a") as f:
      f.write(json.dumps({"model": name, **{k: str(v) for k, v in
                                            kwargs.items()},
                          "max_rel": report.max_rel}) + "\n")


def _parity(name, seed, **kwargs):
  conv = translate.convert(name, weights="random", seed=seed, **kwargs)
  # Every Flax leaf found its Keras layer by exact (canonical) name.
  assert set(conv.report.match_counts) == {"exact"}
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, name, seed=seed + 1,
                                  input_shape=kwargs.get("input_shape"))
  _log(name, kwargs, report)
  assert report.passed, report.summary()
  return conv, report


@pytest.fixture(scope="module")
def keras_tiny():
  """Keras' own public ConvNeXtTiny (not the registry's wrapper)."""
  return keras.applications.ConvNeXtTiny(weights=None,
                                         input_shape=(32, 32, 3))


def test_flax_names_are_exactly_the_keras_layer_names(keras_tiny):
  """The translator's view of Keras (leaf layers inside the Sequential stem
  and downsampling blocks, canonical names) is exactly the Flax tree, with
  the same shapes after each class's rule."""
  layers = keras_io.read_weights(keras_tiny)
  canonical = keras_io.canonical_names(layers)
  assert "convnext_tiny_stem" in {l.name for l in keras_tiny.layers}
  shapes = translate.variable_shapes(models.create("convnexttiny"),
                                     (32, 32, 3))
  flax_names = set(shapes["params"])
  assert flax_names == {canonical[l.name] for l in layers}
  assert {"convnext_tiny_stem_conv", "convnext_tiny_stem_layernorm",
          "convnext_tiny_downsampling_layernorm_2",
          "convnext_tiny_downsampling_conv_2",
          "convnext_tiny_stage_2_block_8_layer_scale",
          "convnext_tiny_head_layernorm",
          "convnext_tiny_head_dense"} <= flax_names
  assert set(shapes) == {"params"}  # PreStem's mean/variance are constants
  for layer in layers:
    for wname, array in layer.weights.items():
      rule = translate.RULES[layer.cls][wname]
      got = shapes[rule.collection][canonical[layer.name]][rule.leaf].shape
      assert got == rule.apply(np.zeros(array.shape)).shape, (layer.name,
                                                              wname)


def test_registry_wrapper_builds_keras_own_model(keras_tiny):
  """``keras_convnext`` (which also passes drop_path_rate and
  layer_scale_init_value) builds the same layers as the public
  constructor, and our tables are Keras' MODEL_CONFIGS."""
  ours = convnext.keras_convnext_tiny(weights=None, input_shape=(32, 32, 3))
  # The input layer's name is Keras' session counter (input_layer_5 when
  # other models were built first in this worker); every other name is the
  # constructor's.
  describe = lambda m: [(  # noqa: E731
      None if type(l).__name__ == "InputLayer" else l.name, type(l).__name__,
      [tuple(w.shape) for w in l.weights]) for l in keras_io.iter_layers(m)]
  assert describe(ours) == describe(keras_tiny)
  for variant, (depths, dims) in convnext.VARIANTS.items():
    config = keras_convnext.MODEL_CONFIGS[variant]
    assert (list(depths), list(dims), convnext.DEFAULT_SIZE) == (
        config["depths"], config["projection_dims"], config["default_size"])
    spec = models.get_spec(f"convnext{variant}")
    assert spec.input_shape == (224, 224, 3)
    assert spec.slow == (variant != "tiny")


def test_layernorm_epsilons_are_keras(keras_tiny):
  seen = {}

  def spy(next_fun, args, kwargs, context):
    m = context.module
    if (isinstance(m, (nn.LayerNorm, convnext.L.LayerNorm))
        and context.method_name == "__call__"):
      seen[m.name] = (m.epsilon, getattr(m, "use_fast_variance", False))
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  for include_top in (True, False):
    with nn.intercept_methods(spy):
      jax.eval_shape(models.create("convnexttiny", include_top=include_top
                                   ).init, jax.random.PRNGKey(0), x)
  keras_ln = {l.name: l for l in keras_io.iter_layers(keras_tiny)
              if type(l).__name__ == "LayerNormalization"}
  # The no-top model's extra unnamed LayerNormalization (also 1e-6).
  assert set(seen) == set(keras_ln) | {"layer_normalization"}
  for name, (eps, fast) in seen.items():
    assert eps == 1e-6, name
    if name in keras_ln:
      assert keras_ln[name].epsilon == eps, name
    assert not fast, f"{name}: Keras computes the variance two-pass"


class Block(nn.Module):
  """One Flax ConvNeXt block, named like a Keras ``ConvNeXtBlock``."""
  dim: int
  layer_scale_init_value: float | None = 1e-6
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    return convnext.convnext_block(
        x, self.dim, name="blk", drop_path_rate=self.drop_path_rate,
        layer_scale_init_value=self.layer_scale_init_value, train=train)


@pytest.fixture(scope="module")
def keras_block():
  """Keras' own ``ConvNeXtBlock`` (dim 16) with random weights."""
  inputs = keras.Input((9, 11, 16))
  model = keras.Model(inputs, keras_convnext.ConvNeXtBlock(16, name="blk")(
      inputs))
  random_weights.randomize(model, seed=5)
  x = np.random.default_rng(6).normal(0, 2, (3, 9, 11, 16)).astype(
      np.float32)
  return model, x


def test_block_gelu_is_exact(keras_block, monkeypatch):
  """Keras' Activation("gelu") is the erf form; the tanh approximation
  (Flax's nn.gelu default) is 1e-3 away and must fail this comparison."""
  model, x = keras_block
  want = np.asarray(model(x, training=False))
  module = Block(16)
  variables, _ = translate.translate(module, model, x.shape[1:])
  got = np.asarray(module.apply(variables, x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  monkeypatch.setitem(convnext.L.ACTIVATIONS, "gelu",
                      lambda v: nn.gelu(v, approximate=True))
  tanh = np.asarray(module.apply(variables, x))
  assert np.max(np.abs(tanh - want)) > 1e-4  # the check above can tell


def test_block_layer_scale_is_translated_not_init(keras_block):
  model, x = keras_block
  keras_gamma = np.asarray(model.get_layer("blk_layer_scale").weights[0])
  assert not np.allclose(keras_gamma, 1e-6)  # randomized
  variables, _ = translate.translate(Block(16), model, x.shape[1:])
  np.testing.assert_array_equal(
      variables["params"]["blk_layer_scale"]["gamma"], keras_gamma)


def test_layer_scale_init_value():
  """The option reaches every LayerScale's initial value, 0.0 included;
  ``None`` leaves LayerScale out (Keras tests ``is not None``)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  for value in (0.5, 0.0, None):
    seen = {}

    def spy(next_fun, args, kwargs, context):
      if isinstance(context.module, convnext.L.LayerScale):
        seen[context.module.name] = context.module.init_value
      return next_fun(*args, **kwargs)

    module = models.create("convnexttiny", layer_scale_init_value=value)
    with nn.intercept_methods(spy):
      params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    layer_scales = {k for k in params if k.endswith("_layer_scale")}
    assert set(seen) == layer_scales
    assert len(seen) == (0 if value is None else 18)
    assert all(v == value for v in seen.values())
  gamma = convnext.L.LayerScale(0.5).init(
      jax.random.key(0), np.ones((1, 2, 2, 3), np.float32))["params"]["gamma"]
  np.testing.assert_array_equal(gamma, np.full((3,), 0.5, np.float32))


def _stochastic_depth_outcomes(out, x, keep):
  """Per sample: kept (``x / keep``) or dropped (zeros); anything else
  fails."""
  kept = []
  for o, v in zip(out, x):
    if np.all(o == 0):
      kept.append(False)
    else:
      np.testing.assert_allclose(o, v / keep, rtol=1e-6)
      kept.append(True)
  return np.array(kept)


def test_stochastic_depth_matches_keras_formula():
  """Train mode drops whole samples with probability ``rate`` and rescales
  the kept ones by ``1 / (1 - rate)``, like Keras' StochasticDepth (whose
  RNG differs, so both are checked against the same law); inference is
  the identity."""
  rate, n = 0.25, 2000
  x = np.random.default_rng(0).uniform(1, 2, (n, 2, 2, 3)).astype(np.float32)
  sd = convnext.StochasticDepth(rate)
  out = np.asarray(sd.apply({}, x, train=True,
                            rngs={"dropout": jax.random.key(1)}))
  ours = _stochastic_depth_outcomes(out, x, 1 - rate)
  keras_out = np.asarray(keras_convnext.StochasticDepth(rate)(
      x, training=True))
  theirs = _stochastic_depth_outcomes(keras_out, x, 1 - rate)
  for kept in (ours, theirs):  # 4.5 standard deviations
    assert abs(kept.mean() - (1 - rate)) < 4.5 * np.sqrt(
        rate * (1 - rate) / n)
  np.testing.assert_array_equal(sd.apply({}, x, train=False), x)


@pytest.fixture(scope="module")
def keras_tiny_drop_path():
  """The registry's Keras ConvNeXtTiny, no top, drop_path_rate=0.3."""
  return convnext.keras_convnext_tiny(
      weights=None, include_top=False, input_shape=(32, 32, 3),
      drop_path_rate=0.3)


def test_drop_path_schedule_is_keras(keras_tiny_drop_path):
  """Per-block rates are ``linspace(0, rate, sum(depths))`` as in Keras;
  block 0 (rate 0) has no StochasticDepth layer, in both."""
  keras_model = keras_tiny_drop_path
  want = {l.name: l.drop_path_rate for l in keras_model.layers
          if type(l).__name__ == "StochasticDepth"}
  seen = {}

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, convnext.StochasticDepth):
      seen[context.module.name] = context.module.rate
    return next_fun(*args, **kwargs)

  module = models.create("convnexttiny", include_top=False,
                         drop_path_rate=0.3)
  with nn.intercept_methods(spy):
    jax.eval_shape(module.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert len(want) == 17 and seen == pytest.approx(want)
  assert "convnext_tiny_stage_0_block_0_stochastic_depth" not in seen
  assert seen["convnext_tiny_stage_3_block_2_stochastic_depth"] == (
      pytest.approx(0.3))


def test_prestem_constants_are_keras_own(keras_tiny_drop_path):
  """Keras' PreStem Normalization gets mean/variance as constructor
  arguments (no weights): ``prestem`` must use those and compute what the
  layer computes."""
  norm = keras_tiny_drop_path.get_layer(
      "convnext_tiny_prestem_normalization")
  assert type(norm).__name__ == "Normalization" and not norm.weights
  cfg = norm.get_config()
  np.testing.assert_array_equal(np.ravel(cfg["mean"]), convnext.MEAN_RGB)
  np.testing.assert_array_equal(np.ravel(cfg["variance"]),
                                convnext.VARIANCE_RGB)
  x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(
      np.float32)
  np.testing.assert_allclose(np.asarray(convnext.prestem(x)),
                             np.asarray(norm(x)), rtol=1e-6, atol=1e-6)


def test_no_top_odd_size_without_preprocessing_parity():
  """97x75 (odd, non-square: the 4x4/4 stem and the 2x2/2 downsampling
  convs floor, 97 -> 24 -> 12 -> 6 -> 3, 75 -> 18 -> 9 -> 4 -> 2), no top
  (Keras' unnamed LayerNormalization on the feature map) and no PreStem:
  the model takes already-normalized inputs."""
  shape = (97, 75, 3)
  conv, _ = _parity("convnexttiny", 21, include_top=False,
                    include_preprocessing=False, input_shape=shape)
  assert conv.keras_model.output_shape == (None, 3, 2, 768)
  assert not any(type(l).__name__ == "Normalization"
                 for l in conv.keras_model.layers)
  # The translated LayerScale values are Keras' (randomized), not 1e-6.
  keras_gamma = {l.name: np.asarray(l.weights[0])
                 for l in conv.keras_model.layers
                 if type(l).__name__ == "LayerScale"}
  assert len(keras_gamma) == 18
  for name, gamma in keras_gamma.items():
    np.testing.assert_array_equal(
        conv.variables["params"][name]["gamma"], gamma)
    assert not np.allclose(gamma, 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    {"include_top": False, "pooling": "max", "input_shape": (75, 97, 3)},
    {"include_top": False, "pooling": "avg", "input_shape": (64, 64, 3),
     "include_preprocessing": False},
    {"input_shape": (64, 64, 3), "include_preprocessing": False},
    {"input_shape": (64, 64, 3), "drop_path_rate": 0.3},
    {"input_shape": (64, 64, 3), "layer_scale_init_value": None},
], ids=["max-75x97", "avg-64-nopre", "top-64-nopre", "drop-path-0.3",
        "no-layer-scale"])
def test_option_parity(kwargs):
  conv, _ = _parity("convnexttiny", 31, **kwargs)
  keras_classes = {type(l).__name__
                   for l in keras_io.iter_layers(conv.keras_model)}
  if kwargs.get("layer_scale_init_value", 1e-6) is None:
    assert "LayerScale" not in keras_classes
    assert not any(k.endswith("_layer_scale")
                   for k in conv.variables["params"])
  if kwargs.get("drop_path_rate"):
    assert "StochasticDepth" in keras_classes
