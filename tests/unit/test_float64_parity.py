"""The float64 recheck of a failed float32 parity check.

Fine-tuned weights can make a network amplify float32 rounding (a randomly
initialised MobileNetV2 trained 20 steps: Keras and Flax 3.5e-4 apart in
float32, 9e-13 in float64). ``check_parity(..., float64=True)`` runs both
sides in float64 on the same inputs, and ``main._parity_or_fail`` uses it
to tell that from a translation error.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import translate  # noqa: E402
from translate import parity  # noqa: E402
from translate.random_weights import randomize  # noqa: E402


def _conv_model():
  """A small conv net with BatchNorm, randomized (statistics included)."""
  inp = keras.Input((12, 12, 3))
  x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inp)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.Conv2D(8, 3, strides=2, name="conv2")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  out = keras.layers.Dense(5, name="head")(x)
  model = keras.Model(inp, out)
  randomize(model, seed=3)
  return model


@pytest.fixture(scope="module")
def translated():
  model = _conv_model()
  module, variables, _ = translate.from_keras(model)
  return model, module, variables


def test_float64_twin_holds_the_same_weights_in_float64(translated):
  model, _, _ = translated
  twin = parity.float64_twin(model)
  for a, b in zip(model.get_weights(), twin.get_weights()):
    assert b.dtype == np.float64
    np.testing.assert_array_equal(a.astype(np.float64), b)
  x = np.random.default_rng(0).normal(size=(2, 12, 12, 3))
  out = np.asarray(twin(x, training=False))
  assert out.dtype == np.float64
  np.testing.assert_allclose(out, np.asarray(model(x.astype(np.float32))),
                             rtol=1e-4, atol=1e-4)


def test_float64_parity_is_exact_where_float32_only_rounds(translated):
  """An exact translation: float32 differs by rounding, float64 by ~1e-15.
  Either side left in float32 would put the float64 figure near 1e-7."""
  model, module, variables = translated
  f32 = translate.check_parity(module, variables, model, "resnet50",
                               input_shape=(12, 12, 3))
  f64 = translate.check_parity(module, variables, parity.float64_twin(model),
                               "resnet50", input_shape=(12, 12, 3),
                               float64=True)
  assert f32.passed and not f32.float64 and f32.tolerance == 1e-4
  assert f64.passed and f64.float64 and f64.tolerance == 1e-8
  assert f64.max_rel < 1e-12, f64.summary()
  assert "in float64" in f64.summary()
  assert not jax.config.jax_enable_x64  # switched off again


def test_float64_parity_catches_what_float32_rounding_hides(translated):
  """A kernel 1e-6 off (a wrong constant's size) passes the float32 bound
  and fails the float64 one: the recheck cannot excuse a real error."""
  model, module, variables = translated
  bad = jax.tree.map(np.array, variables)
  bad["params"]["conv"]["kernel"] *= 1 + 1e-6
  f32 = translate.check_parity(module, bad, model, "resnet50",
                               input_shape=(12, 12, 3))
  f64 = translate.check_parity(module, bad, parity.float64_twin(model),
                               "resnet50", input_shape=(12, 12, 3),
                               float64=True)
  assert f32.passed
  assert not f64.passed and f64.max_rel > 1e-7, f64.summary()


def _report(max_rel, tolerance=1e-4, float64=False):
  return parity.ParityReport(max_abs=max_rel, max_rel=max_rel, max_ref=1.0,
                             top1_agreement=1.0, tolerance=tolerance,
                             logits=True, batch=2, float64=float64)


def test_cli_goes_on_only_when_float64_agrees(capsys):
  from absl import flags  # pylint: disable=g-import-not-at-top
  import main  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["main.py"])  # defaults: no --keep_failed
  calls = []

  def recheck(max_rel):
    def run():
      calls.append(max_rel)
      return _report(max_rel, 1e-8, True)
    return run

  # float32 passed: no recheck
  assert main._parity_or_fail(_report(1e-6), "m", recheck(0.0)) is None
  assert calls == []
  # float32 failed, float64 exact: goes on, says why
  again = main._parity_or_fail(_report(3e-4), "m", recheck(1e-13))
  assert again.passed and calls == [1e-13]
  assert "float32 rounding, not the translation" in capsys.readouterr().out
  # both failed: the error names both figures
  with pytest.raises(main.UserError, match=r"0\.003 > 0\.0001, 2e-05 in "
                     "float64"):
    main._parity_or_fail(_report(3e-3), "m", recheck(2e-5))
  # no recheck given (any-model graphs): float32 decides
  with pytest.raises(main.UserError, match="parity check failed for m"):
    main._parity_or_fail(_report(3e-3), "m")
