"""EfficientNetV2 B0–B3, S, M, L: Keras names and shapes, BatchNorm settings,
block tables and drop-connect rates read from the Keras models, the in-model
preprocessing (both kinds, and ``include_preprocessing=False``), no-top
feature-map parity at odd non-square sizes, drop-connect per sample."""

import functools
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import translate
from models import efficientnet_v2 as v2
from models import layers as L
from translate import keras_io
from translate.rules import rule_for
from flax_spy import flax_calls

VARIANTS = ("b0", "b1", "b2", "b3", "s", "m", "l")
# Blocks per stage: Keras' num_repeat rounded up by depth_coefficient
# (B1 1.1, B2 1.2, B3 1.4), written out by hand as an independent check.
BLOCKS_PER_STAGE = {
    "b0": (1, 2, 2, 3, 5, 8),
    "b1": (2, 3, 3, 4, 6, 9),
    "b2": (2, 3, 3, 4, 6, 10),
    "b3": (2, 3, 3, 5, 7, 12),
    "s": (2, 4, 4, 6, 9, 15),
    "m": (3, 5, 5, 7, 14, 18, 5),
    "l": (4, 7, 7, 10, 19, 25, 7),
}


def _variant(v):
  marks = [] if v == "b0" else [pytest.mark.slow]
  return pytest.param(v, marks=marks, id=v)


def _log(name, kwargs, max_rel):
  if os.environ.get("PARITY_LOG"):
    with open(os.environ["PARITY_LOG"], "a") as f:
      f.write(json.dumps({"model": name, **{k: str(v) for k, v in
                                            kwargs.items()},
                          "max_rel": max_rel}) + "\n")


def keras_shapes(keras_model):
  """``{(collection, layer, leaf): shape}`` of the Keras weights as the
  translation rules place them (canonical layer names)."""
  layers = keras_io.read_weights(keras_model)
  canonical = keras_io.canonical_names(layers)
  out = {}
  for layer in layers:
    rules = rule_for(layer.cls, layer.name)
    for wname, array in layer.weights.items():
      rule = rules[wname]
      if rule is not None:
        out[(rule.collection, canonical[layer.name], rule.leaf)] = (
            rule.apply(np.zeros(array.shape, np.float32)).shape)
  return out


def flax_shapes(module, shape):
  tree = translate.variable_shapes(module, shape)
  return {(coll, layer, leaf): tuple(v.shape)
          for coll, layers in tree.items()
          for layer, leaves in layers.items()
          for leaf, v in leaves.items()}


class _Stop(Exception):
  pass


def stem_input(module, x):
  """What the module feeds ``stem_conv``: runs only the preprocessing (the
  call stops at ``stem_conv``, before any variable is needed)."""
  seen = []

  def stop(next_fun, args, kwargs, context):
    if context.module.name == "stem_conv":
      seen.append(np.asarray(args[0]))
      raise _Stop
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(stop), pytest.raises(_Stop):
    module.apply({}, jnp.asarray(x))
  return seen[0]


@pytest.fixture(scope="module")
def keras_b0():
  return models.get_spec("efficientnetv2b0").keras_constructor()(
      weights=None)


def test_flax_names_and_shapes_are_exactly_keras(keras_b0):
  want = keras_shapes(keras_b0)
  got = flax_shapes(models.create("efficientnetv2b0"), (224, 224, 3))
  assert set(got) == set(want)
  for key, shape in want.items():
    assert got[key] == shape, key
  # Params are exactly Keras' trainable weights, batch_stats the rest.
  assert sum(int(np.prod(s)) for k, s in got.items() if k[0] == "params") \
      == sum(int(np.prod(w.shape)) for w in keras_b0.trainable_weights)


def test_batchnorm_settings_are_keras(keras_b0):
  seen = flax_calls(models.create("efficientnetv2b0"), (224, 224, 3),
                    nn.BatchNorm)
  keras_bn = {l.name: l for l in keras_b0.layers
              if type(l).__name__ == "BatchNormalization"}
  assert set(seen) == set(keras_bn)
  for name, m in seen.items():
    assert m.epsilon == keras_bn[name].epsilon == 1e-3, name
    assert m.momentum == pytest.approx(keras_bn[name].momentum) == 0.9, name
    assert m.use_running_average, f"{name} must use moving statistics"
  assert models.get_spec("efficientnetv2b0").bn_epsilon == v2.EPSILON


@pytest.mark.parametrize("variant", [_variant(v) for v in VARIANTS])
def test_variant_matches_keras_structure(variant):
  """At 32x32 (cheap): every weighted layer name and shape, the blocks per
  stage, every Dropout's rate and noise shape, and the preprocessing
  layers' output, all read from the Keras model of this variant."""
  spec = models.get_spec(f"efficientnetv2{variant}")
  shape = (32, 32, 3)
  keras_model = spec.keras_constructor()(weights=None, input_shape=shape)
  module = models.create(spec.name, input_shape=shape)

  # Weighted layers: names and shapes (widths, fused vs depthwise, SE).
  assert flax_shapes(module, shape) == keras_shapes(keras_model)

  # Blocks per stage, from the Keras layer names.
  blocks = {m.group(1, 2) for l in keras_model.layers
            if (m := re.match(r"block(\d+)([a-z])_", l.name))}
  per_stage = tuple(sum(1 for s, _ in blocks if int(s) == i + 1)
                    for i in range(len(BLOCKS_PER_STAGE[variant])))
  assert per_stage == BLOCKS_PER_STAGE[variant]
  assert len(blocks) == sum(per_stage)  # no stage beyond the table
  assert [p["name"] for p in v2.block_plan(
      module.blocks_args, module.width_coefficient,
      module.depth_coefficient)] == sorted(
          (f"block{s}{c}_" for s, c in blocks),
          key=lambda n: (int(n[5:-2]), n[-2]))

  # Drop-connect and top dropout: rates and noise shapes.
  want = {}
  for l in keras_model.layers:
    if type(l).__name__ == "Dropout":
      noise = None if l.noise_shape is None else tuple(l.noise_shape)
      want[l.name] = (pytest.approx(l.rate, rel=1e-12), noise)
  got = {}
  for name, m in flax_calls(module, shape, nn.Dropout).items():
    noise = ((None,) + tuple(1 if d in m.broadcast_dims else None
                             for d in (1, 2, 3))
             if m.broadcast_dims else None)
    got[name] = (m.rate, noise)
  assert got == want
  assert want["top_dropout"][1] is None
  if variant in ("b1", "b2", "b3"):  # unrounded block count: rates > 0.2
    assert max(r.expected for r, _ in want.values()) > v2.DROP_CONNECT_RATE

  # The in-model preprocessing (B: Rescaling + Normalization; S/M/L:
  # Rescaling to [-1, 1]) on pixels in [0, 255].
  stem = keras_model.get_layer("stem_conv")
  pre = type(keras_model)(keras_model.input, stem.input)
  x = translate.random_images(shape, batch=2, seed=0)
  kinds = [type(l).__name__ for l in keras_model.layers[1:3]]
  if variant.startswith("b"):
    assert kinds == ["Rescaling", "Normalization"]
  else:
    assert kinds[0] == "Rescaling" and kinds[1] != "Normalization"
  np.testing.assert_allclose(stem_input(module, x), np.asarray(pre(x)),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [
    # Odd, non-square: TF SAME on the stride-2 convs pads (0, 1) or (1, 1).
    pytest.param({"pooling": None, "input_shape": (97, 75, 3)},
                 id="features-97x75"),
    # Keras: 1 channel takes Rescaling(1/128, -1) even for B variants.
    pytest.param({"pooling": "avg", "input_shape": (41, 35, 1)},
                 id="avg-41x35x1", marks=pytest.mark.slow),
])
def test_efficientnetv2b0_no_top_parity(kwargs):
  conv = translate.convert("efficientnetv2b0", weights="random", seed=11,
                           include_top=False, **kwargs)
  assert set(conv.report.match_counts) == {"exact"}
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "efficientnetv2b0",
                                  seed=12, input_shape=kwargs["input_shape"])
  _log("efficientnetv2b0", kwargs, report.max_rel)
  assert not report.logits  # the feature map (or its pooling) as is
  assert report.passed, report.summary()


@pytest.mark.slow
def test_include_preprocessing_false_parity():
  """Without the in-model preprocessing Keras takes inputs in [-1, 1] as
  they are (no Rescaling, no Normalization layer)."""
  kwargs = {"include_preprocessing": False, "pooling": "max",
            "input_shape": (67, 54, 3)}
  conv = translate.convert("efficientnetv2b0", weights="random", seed=13,
                           include_top=False, **kwargs)
  assert not [l for l in conv.keras_model.layers
              if type(l).__name__ in ("Rescaling", "Normalization")]
  images = translate.random_images(kwargs["input_shape"], 2, 14) / 127.5 - 1
  # The stem sees the inputs as they are.
  np.testing.assert_array_equal(stem_input(conv.module, images), images)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "efficientnetv2b0",
                                  images=images)
  _log("efficientnetv2b0", kwargs, report.max_rel)
  assert report.passed, report.summary()


class FusedBlock(nn.Module):
  drop_rate: float
  expand_ratio: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(L.batch_norm, epsilon=v2.EPSILON,
                           momentum=v2.MOMENTUM, train=train)
    return v2.fused_mbconv_block(
        x, bn, train, name="block2b_", input_filters=8, output_filters=8,
        expand_ratio=self.expand_ratio, kernel_size=3, strides=1,
        se_ratio=0.0, drop_rate=self.drop_rate)


def test_drop_connect_drops_whole_samples_and_rescales():
  x = np.random.default_rng(0).normal(size=(32, 4, 4, 8)).astype(np.float32)
  block = FusedBlock(drop_rate=0.5)
  variables = block.init(jax.random.key(0), x)
  no_drop, _ = FusedBlock(drop_rate=0.0).apply(
      variables, x, train=True, mutable=["batch_stats"])
  residual = np.asarray(no_drop) - x
  out, _ = block.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(1)})
  delta = np.asarray(out) - x
  kept = []
  for i in range(len(x)):  # one draw per sample (noise_shape (None,1,1,1))
    if np.allclose(delta[i], 0.0, atol=1e-6):
      kept.append(False)
    else:
      np.testing.assert_allclose(delta[i], residual[i] / 0.5, rtol=1e-4,
                                 atol=1e-5)
      kept.append(True)
  assert 0 < sum(kept) < len(kept)
  # Inference ignores the rate.
  np.testing.assert_array_equal(
      block.apply(variables, x), FusedBlock(drop_rate=0.0).apply(variables, x))


def test_fused_block_without_expansion_is_one_strided_kxk_conv():
  """Keras' FusedMBConv with expand_ratio 1: ``project_conv`` is the KxK
  strided conv (no ``expand_conv``), followed by an activation."""
  block = FusedBlock(drop_rate=0.0, expand_ratio=1)
  variables = block.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)))
  assert set(variables["params"]) == {"block2b_project_conv",
                                      "block2b_project_bn"}
  assert variables["params"]["block2b_project_conv"]["kernel"].shape == (
      3, 3, 8, 8)
  x = np.random.default_rng(1).normal(size=(1, 8, 8, 8)).astype(np.float32)
  out = np.asarray(block.apply(variables, x)) - x  # residual branch
  assert out.min() >= -0.2785  # swish(x) >= -0.2785: the activation is there
