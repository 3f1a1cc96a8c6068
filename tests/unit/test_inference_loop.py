"""``models.inference.Inference`` on CPU: a batch runs its trunk as a loop
over images, and its head (from the first layer that takes flat
``(batch, features)`` inputs) once on the whole batch, on a tiny model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import inference
from models import layers


class _Tiny(nn.Module):
  head: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.relu(layers.Conv(8, (3, 3), name="conv1")(x))
    x = layers.Conv(16, (3, 3), strides=(2, 2), name="conv2")(x)
    if not self.head:
      return x
    x = jnp.mean(x, axis=(1, 2))
    # The first flat layer is not the dense one (EfficientNet's top_dropout).
    x = nn.Dropout(0.5, deterministic=True, name="top_dropout")(x)
    x = nn.relu(nn.Dense(12, name="fc1")(x))
    return nn.Dense(5, name="predictions")(x)


def _compiled(module, variables, x):
  return jax.jit(module.apply).lower(variables, x).compile().as_text()


def _products(hlo: str) -> int:
  return hlo.count(" dot(") + hlo.count(" convolution(")


@pytest.mark.parametrize("batch", [  # 5: an odd image left
    pytest.param(4, marks=pytest.mark.slow), 5])
def test_head_runs_once_on_the_whole_batch(batch):
  """Same logits as the plain module on the whole batch; the loop is there,
  the head's matrix products take the whole batch, and the trunk is computed
  once: the second trace's trunk is dropped (no more products than with the
  head inside the loop)."""
  tiny = _Tiny()
  x = np.random.default_rng(0).normal(size=(batch, 10, 10, 3)).astype(
      np.float32)
  variables = tiny.init(jax.random.key(0), x[:1])
  fast = inference.Inference(tiny)
  compiled = jax.jit(fast.apply).lower(variables, x).compile()  # once
  np.testing.assert_allclose(compiled(variables, x), tiny.apply(variables, x),
                             rtol=1e-5, atol=1e-6)
  hlo = compiled.as_text()
  assert " while(" in hlo
  assert f"f32[{batch},12]{{1,0}} dot(" in hlo      # fc1, whole batch
  assert f"f32[{batch},5]{{1,0}} dot(" in hlo       # predictions
  assert "f32[2,12]" not in hlo and "f32[1,12]" not in hlo  # not per step
  keep = inference._flat  # pylint: disable=protected-access
  try:
    inference._flat = lambda args: False  # pylint: disable=protected-access
    looped = _compiled(fast, variables, x)  # the head inside the loop
  finally:
    inference._flat = keep  # pylint: disable=protected-access
  assert f"f32[{batch},5]{{1,0}} dot(" not in looped
  # The looped program's odd image also runs fc1 and predictions on its own.
  assert _products(hlo) == _products(looped) - 2 * (batch % 2)


def test_model_without_a_head_loops_whole():
  """No flat layer (include_top=False, MobileNet's 1x1 head): the whole
  model runs in the loop, same values as the plain module."""
  tiny = _Tiny(head=False)
  x = np.random.default_rng(1).normal(size=(5, 10, 10, 3)).astype(np.float32)
  variables = tiny.init(jax.random.key(0), x[:1])
  fast = inference.Inference(tiny)
  out = jax.jit(fast.apply)(variables, x)
  assert out.shape == (5, 5, 5, 16)
  np.testing.assert_allclose(out, tiny.apply(variables, x), rtol=1e-5,
                             atol=1e-6)
  assert " while(" in _compiled(fast, variables, x)
