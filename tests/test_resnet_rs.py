"""ResNet-RS (tf-keras) specifics: stochastic depth per sample, Dropout
rates and noise shapes, the in-model preprocessing constants, no-top and
off-size parity, session-independent names, native sizes."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import models
import translate
from models import layers as L
from models import resnet_rs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
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


@pytest.mark.parametrize("pooling,size", [
    pytest.param("avg", None, marks=pytest.mark.slow),
    pytest.param("max", 97, marks=pytest.mark.slow),
    pytest.param(None, 64, marks=pytest.mark.slow)])
def test_no_top_parity(pooling, size):
  """Without the top, at the native size and off it. At 97 the feature maps
  are odd (97 -> 49 -> 25 -> 13 -> 7): fixed_padding before each strided
  conv and the SAME average pool of the projection shortcuts both pad
  unevenly; at 64 they are even, where fixed padding differs from SAME."""
  shape = None if size is None else (size, size, 3)
  conv = translate.convert("resnetrs50", weights="random", seed=4,
                           include_top=False, pooling=pooling,
                           input_shape=shape)
  if size is not None and pooling is None:
    assert conv.keras_model.output_shape[1:3] == ((size + 31) // 32,) * 2
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "resnetrs50",
                                  input_shape=shape, seed=5)
  assert report.passed, report.summary()


def test_preprocessing_constants_are_keras_own():
  """Keras' Normalization gets mean/variance as constructor arguments (no
  weights): the module's constants must be those, and Rescaling +
  Normalization must compute what ``preprocessing`` computes."""
  keras_model = translate.build_keras("resnetrs50", None, include_top=False,
                                      input_shape=(32, 32, 3))
  norm = [l for l in keras_model.layers
          if type(l).__name__ == "Normalization"]
  assert len(norm) == 1 and not norm[0].weights
  cfg = norm[0].get_config()
  np.testing.assert_array_equal(np.ravel(cfg["mean"]), resnet_rs.MEAN_RGB)
  np.testing.assert_array_equal(np.ravel(cfg["variance"]),
                                resnet_rs.VARIANCE_RGB)
  import tf_keras  # pylint: disable=g-import-not-at-top
  head = tf_keras.Model(keras_model.inputs, norm[0].output)
  x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(
      np.float32)
  # XLA's CPU division may round 1 ulp away from TF's.
  np.testing.assert_allclose(np.asarray(resnet_rs.preprocessing(x)),
                             np.asarray(head(x)), rtol=1e-6, atol=1e-6)


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
  # Eval mode: deterministic and exactly the block without drop connect.
  np.testing.assert_array_equal(
      block.apply(variables, x),
      block.apply(variables, x, rngs={"dropout": jax.random.key(1)}))
  np.testing.assert_array_equal(block.apply(variables, x),
                                Block(survival=0.0).apply(variables, x))
  # Train mode: the residual entering the Dropout and what leaves it.
  (_, state) = block.apply(variables, x, train=True,
                           rngs={"dropout": jax.random.key(2)},
                           mutable=["batch_stats", "intermediates"],
                           capture_intermediates=True)
  inter = state["intermediates"]
  name = "BlockGroup3__block_1_"
  residual = (np.asarray(inter[name + "_batch_norm_3"]["__call__"][0])
              * jax.nn.sigmoid(np.asarray(
                  inter[name + "_se_se_expand"]["__call__"][0])))
  dropped = np.asarray(inter[name + "_drop"]["__call__"][0])
  kept = []
  for i in range(len(x)):  # one draw per sample over H, W and C
    if np.all(dropped[i] == 0):
      kept.append(False)
    else:  # whole sample kept, rescaled by 1 / (1 - rate)
      np.testing.assert_allclose(dropped[i], residual[i] / 0.5, rtol=1e-5,
                                 atol=1e-6)
      kept.append(True)
  assert 0 < sum(kept) < len(kept)  # both outcomes at rate 0.5
  out = block.apply(variables, x, train=True, mutable=["batch_stats"],
                    rngs={"dropout": jax.random.key(2)})[0]
  np.testing.assert_allclose(out, np.maximum(dropped + x, 0), rtol=1e-5,
                             atol=1e-6)


def test_dropout_layers_match_keras_rates_and_noise_shapes():
  """Every Dropout (drop connect per group and top_dropout) has tf-keras'
  rate and noise shape; a non-zero drop_connect_rate on the small depth 50
  puts a different rate in each group."""
  from tf_keras.src.applications import resnet_rs as tfk_rs  # pylint: disable=g-import-not-at-top
  keras_model = tfk_rs.ResNetRS(depth=50, drop_connect_rate=0.2,
                                dropout_rate=0.3, weights=None,
                                input_shape=(32, 32, 3), classes=10)
  want = {}
  for l in keras_model.layers:
    if type(l).__name__ == "Dropout":
      noise = l.noise_shape
      want[l.name] = (pytest.approx(l.rate, rel=1e-12), None if noise is None
                      else tuple(noise))
  module = resnet_rs.ResNetRS(blocks=(3, 4, 6, 3), drop_connect_rate=0.2,
                              dropout_rate=0.3, classes=10)
  got = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, nn.Dropout) and context.method_name == "__call__":
      got[m.name] = (m.rate, (None,) + tuple(
          1 if d in m.broadcast_dims else None for d in (1, 2, 3))
                     if m.broadcast_dims else None)
    return next_fun(*args, **kwargs)

  x = np.zeros((1, 32, 32, 3), np.float32)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    jax.eval_shape(functools.partial(module.apply, train=True,
                                     mutable=["batch_stats"]),
                   variables, x, rngs={"dropout": jax.random.key(1)})
  assert len(want) == 1 + 16  # top_dropout and one per block
  assert got == want


def test_variants_are_registered_at_their_weights_size():
  """Native size = the largest size tf-keras has ImageNet weights for."""
  from tf_keras.src.applications import resnet_rs as tfk_rs  # pylint: disable=g-import-not-at-top
  for depth, sizes in tfk_rs.DEPTH_TO_WEIGHT_VARIANTS.items():
    spec = models.get_spec(f"resnetrs{depth}")
    assert spec.input_shape == (max(sizes), max(sizes), 3)


@pytest.mark.slow
def test_deepest_model_builds_without_ipython_raising_the_recursion_limit():
  """tf-keras walks the graph recursively; ResNetRS420 needs more than
  Python's default 1000 frames. IPython's jedi, imported by tf-keras where
  it is installed, raises the limit to 3000 and hid this; a fresh
  environment has no IPython, simulated here by hiding it."""
  code = ("import sys\n"
          "sys.modules['IPython'] = None\n"
          "sys.modules['jedi'] = None\n"
          "sys.setrecursionlimit(1000)\n"
          "import translate\n"
          "model = translate.build_keras('resnetrs420', None)\n"
          "print(len(model.layers))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=600, cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert int(proc.stdout.split()[-1]) > 1000
