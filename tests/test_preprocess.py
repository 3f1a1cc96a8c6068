"""``models.preprocess`` (jax.numpy) against Keras' own preprocess_input."""

import numpy as np
import pytest

import models


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_preprocess_matches_keras(name, dtype):
  spec = models.get_spec(name)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 8, 6, 3)).astype(dtype)
  want = np.asarray(spec.keras_preprocess_input()(images.copy()))
  got = np.asarray(models.preprocess(name, images))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="unknown preprocess mode"):
    models.preprocess_mode(np.zeros((1, 2, 2, 3)), "inception")
