"""EfficientNet specifics: drop-connect per sample, train/eval modes, the
ImageNet-only second Rescaling."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

import models
import translate
from models import efficientnet, layers as L


class Block(nn.Module):
  drop_rate: float

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(L.batch_norm, epsilon=efficientnet.EPSILON,
                           train=train)
    return efficientnet._block(  # pylint: disable=protected-access
        x, bn, train, self.drop_rate, name="block2b_", filters_in=8,
        filters_out=8, kernel_size=3, strides=1, expand_ratio=6)


def test_drop_connect_drops_whole_samples_and_rescales():
  x = np.random.default_rng(0).normal(size=(64, 6, 6, 8)).astype(np.float32)
  block = Block(drop_rate=0.5)
  variables = block.init(jax.random.key(0), x)
  no_drop, _ = Block(drop_rate=0.0).apply(variables, x, train=True,
                                          mutable=["batch_stats"])
  residual = np.asarray(no_drop) - x
  out, _ = block.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(1)})
  delta = np.asarray(out) - x
  kept = []
  for i in range(len(x)):  # one draw per sample over H, W, C (noise_shape)
    if np.allclose(delta[i], 0.0, atol=1e-6):
      kept.append(False)
    else:
      np.testing.assert_allclose(delta[i], residual[i] / 0.5, rtol=1e-4,
                                 atol=1e-5)
      kept.append(True)
  assert 0 < sum(kept) < len(kept)  # both outcomes happen at rate 0.5


@pytest.mark.slow  # 10 s
def test_eval_mode_is_deterministic_and_train_mode_is_not():
  conv = translate.convert("efficientnetb0", weights=None)
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  a = conv.module.apply(conv.variables, x)
  b = conv.module.apply(conv.variables, x, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(a, b)
  t1, _ = conv.module.apply(conv.variables, x, train=True,
                            rngs={"dropout": jax.random.key(1)},
                            mutable=["batch_stats"])
  t2, _ = conv.module.apply(conv.variables, x, train=True,
                            rngs={"dropout": jax.random.key(2)},
                            mutable=["batch_stats"])
  assert not np.allclose(t1, t2)


@pytest.mark.slow
def test_imagenet_rescaling_matches_keras_imagenet_graph(tmp_path,
                                                         monkeypatch):
  """``weights="imagenet"``: Keras adds Rescaling(1/sqrt(stddev)) after the
  Normalization; ``convert`` sets ``imagenet_rescaling`` from the spec.

  No download: Keras' ``get_file`` is pointed at random weights saved from
  the ``weights=None`` graph, so Keras builds its real ImageNet graph.
  """
  from keras.src.applications import efficientnet as keras_efficientnet
  source = translate.build_keras("efficientnetb0", "random", seed=7)
  path = str(tmp_path / "efficientnetb0.weights.h5")
  source.save_weights(path)
  monkeypatch.setattr(keras_efficientnet.file_utils, "get_file",
                      lambda *args, **kwargs: path)

  conv = translate.convert("efficientnetb0", weights="imagenet")
  rescalings = [l for l in conv.keras_model.layers
                if type(l).__name__ == "Rescaling"]
  assert len(rescalings) == 2  # 1/255, then the ImageNet-only one
  for a, b in zip(source.weights, conv.keras_model.weights, strict=True):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert conv.module.imagenet_rescaling
  assert not models.create("efficientnetb0").imagenet_rescaling

  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "efficientnetb0", seed=3)
  assert report.passed, report.summary()
  # Without the field the same weights are far off: the check can fail.
  off = translate.check_parity(conv.module.clone(imagenet_rescaling=False),
                               conv.variables, conv.keras_model,
                               "efficientnetb0", seed=3)
  assert off.max_rel > 100 * report.tolerance, off.summary()


@pytest.mark.parametrize("pooling", [
    pytest.param(None, marks=pytest.mark.slow), "avg",
    pytest.param("max", marks=pytest.mark.slow)])
def test_no_top_parity(pooling):
  conv = translate.convert("efficientnetb0", weights="random", seed=4,
                           include_top=False, pooling=pooling)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "efficientnetb0", seed=5)
  assert report.passed, report.summary()
