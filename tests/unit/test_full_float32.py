"""Parity runs both sides in full float32: no TF32 products on a GPU.

On an H200 the inference form's logits at JAX's default GPU precision were
up to 1.1e-3 (relative) off the float32 CPU result, against 1.4e-6 at
"highest" (``benchmarks/gpu_check.py``): a user on a GPU would see parity
fail for reasons unrelated to translation. These machines have no GPU, so
the tests check the switches themselves: what precision the Flax program is
traced and lowered with, and whether TensorFlow's TF32 is off while Keras
runs, and that both are restored afterwards.
"""

import flax.linen as nn
import jax
import keras
import numpy as np
import tensorflow as tf

import translate
from translate import parity


class Head(nn.Module):
  """Global average pool and a Dense named like Keras' ``predictions``."""
  classifier_activation: str | None = "softmax"

  @nn.compact
  def __call__(self, x):
    Head.seen.append(jax.config.jax_default_matmul_precision)
    x = nn.Dense(3, name="predictions")(x.mean((1, 2)))
    return x if self.classifier_activation is None else nn.softmax(x)


def _keras_head(seen):
  def record(x):
    seen.append(tf.config.experimental.tensor_float_32_execution_enabled())
    return x
  inp = keras.Input((8, 8, 3))
  x = keras.layers.Lambda(record)(inp)
  x = keras.layers.GlobalAveragePooling2D()(x)
  out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
  return keras.Model(inp, out)


def test_check_parity_runs_flax_and_keras_in_full_float32():
  keras_seen, Head.seen = [], []
  keras_model = _keras_head(keras_seen)
  keras_seen.clear()  # the Lambda ran once when Keras built the model
  k, b = keras_model.get_layer("predictions").get_weights()
  variables = {"params": {"predictions": {"kernel": k, "bias": b}}}
  assert tf.config.experimental.tensor_float_32_execution_enabled()
  report = translate.check_parity(Head(), variables, keras_model,
                                  "resnet50")
  assert report.passed and report.logits
  assert Head.seen == ["highest"]  # traced once, at full precision
  assert keras_seen and not any(keras_seen)  # TF32 off while Keras ran
  # Both switches are back as they were.
  assert tf.config.experimental.tensor_float_32_execution_enabled()
  assert jax.config.jax_default_matmul_precision is None


def test_full_float32_restores_settings_after_an_error():
  tf.config.experimental.enable_tensor_float_32_execution(True)
  try:
    with parity.full_float32():
      assert not tf.config.experimental.tensor_float_32_execution_enabled()
      raise KeyError("boom")
  except KeyError:
    pass
  assert tf.config.experimental.tensor_float_32_execution_enabled()
  assert jax.config.jax_default_matmul_precision is None
  # The lowered program carries the precision.
  with parity.full_float32():
    text = jax.jit(lambda a: a @ a).lower(np.ones((2, 2), np.float32)
                                          ).as_text()
  assert "HIGHEST" in text
