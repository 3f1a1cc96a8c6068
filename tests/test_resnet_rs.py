"""ResNet-RS (tf-keras) specifics: stochastic depth, sessions, variants."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

import models
import translate
from models import layers as L
from models import resnet_rs


def test_second_model_in_one_session_still_translates():
  """tf-keras names the stem from a session counter (stem_1, stem_2, …)."""
  first = translate.build_keras("resnetrs50", None, include_top=False)
  conv = translate.convert("resnetrs50", weights="random", seed=2)
  assert any(l.name.startswith("stem_1_") for l in first.layers)
  assert any(l.name == "stem_1_stem_conv_1" for l in conv.keras_model.layers)
  assert conv.report.match_counts == {"exact": len(
      translate.keras_io.read_weights(conv.keras_model))}
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "resnetrs50", seed=3)
  assert report.passed, report.summary()


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_no_top_parity(pooling):
  conv = translate.convert("resnetrs50", weights="random", seed=4,
                           include_top=False, pooling=pooling)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "resnetrs50", seed=5)
  assert report.passed, report.summary()


class Block(nn.Module):
  survival: float

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(L.batch_norm, epsilon=resnet_rs.EPSILON,
                           momentum=resnet_rs.MOMENTUM, train=train)
    return resnet_rs._bottleneck(  # pylint: disable=protected-access
        x, bn, train, 4, strides=1, use_projection=False,
        survival=self.survival, name="BlockGroup3__block_1_")


def test_stochastic_depth_drops_whole_samples_in_train_mode():
  x = np.random.default_rng(0).normal(size=(32, 6, 6, 16)).astype(np.float32)
  block = Block(survival=0.5)
  variables = block.init(jax.random.key(0), x)
  np.testing.assert_array_equal(  # eval mode is deterministic
      block.apply(variables, x),
      block.apply(variables, x, rngs={"dropout": jax.random.key(1)}))
  kept = Block(survival=0.0).apply(variables, x, train=True,
                                   mutable=["batch_stats"])[0]
  shortcut_only = np.maximum(x, 0.0)
  out = np.asarray(block.apply(variables, x, train=True,
                               rngs={"dropout": jax.random.key(2)},
                               mutable=["batch_stats"])[0])
  n_dropped = 0
  for i in range(len(x)):  # one draw per sample: the whole residual or none
    if np.allclose(out[i], shortcut_only[i]):
      n_dropped += 1
    else:
      # kept and rescaled by 1 / (1 - rate): differs from the plain output
      assert not np.allclose(out[i], kept[i])
  assert 0 < n_dropped < len(x)


def test_variants_are_registered_at_their_weights_size():
  """Native size = the largest size tf-keras has ImageNet weights for."""
  from tf_keras.src.applications import resnet_rs as tfk_rs  # pylint: disable=g-import-not-at-top
  for depth, sizes in tfk_rs.DEPTH_TO_WEIGHT_VARIANTS.items():
    spec = models.get_spec(f"resnetrs{depth}")
    assert spec.input_shape == (max(sizes), max(sizes), 3)
