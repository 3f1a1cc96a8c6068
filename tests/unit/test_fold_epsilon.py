"""BatchNorm folding with near-zero-variance channels, for every epsilon the
families use: dropping or hard-coding epsilon makes these channels explode."""

import flax.linen as nn
import numpy as np
import pytest

import models
import translate
from models.inference import Inference


def _tiny(eps):
  class ConvBn(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
      return nn.BatchNorm(use_running_average=not train, epsilon=eps,
                          name="bn")(x)
  return ConvBn()


# Every family's epsilon (0.0: a family without BatchNorm), and the usual ones.
EPSILONS = sorted({models.get_spec(n).bn_epsilon
                   for n in models.list_models()} - {0.0}
                  | {1.001e-5, 1e-3, 1e-5})


@pytest.mark.parametrize("eps", EPSILONS)
def test_fold_keeps_near_zero_variance_channels(eps):
  module = _tiny(eps)
  rng = np.random.default_rng(0)
  variables = {
      "params": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(
          np.float32)},
                 "bn": {"scale": np.array([1.5, .5, 1., 2.], np.float32),
                        "bias": np.array([.1, -.2, .3, 0.], np.float32)}},
      "batch_stats": {"bn": {"mean": np.array([.2, -.1, 0., .3], np.float32),
                             "var": np.array([0., 1e-9, 1e-6, 2.],
                                             np.float32)}}}
  x = rng.normal(size=(2, 6, 7, 2)).astype(np.float32) * 1e-3
  folded = translate.fold_batchnorm(variables, module, (6, 7, 2))
  assert "bn" not in folded.get("batch_stats", {})
  want = np.asarray(module.apply(variables, x), np.float64)
  got = np.asarray(Inference(inner=module).apply(folded, x), np.float64)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The zero-variance channel is scaled by 1/sqrt(eps), not 1/sqrt(0).
  s = folded["params"]["conv"]["kernel"][..., 0] / variables["params"][
      "conv"]["kernel"][..., 0]
  np.testing.assert_allclose(s, 1.5 / np.sqrt(eps), rtol=1e-5)


def test_fold_into_a_separable_convolution():
  """SeparableConv (Xception, NASNet) folds into its pointwise kernel and
  gains a bias it did not have; the inference form adds it."""
  from models import layers as L  # pylint: disable=g-import-not-at-top

  class SepBn(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = L.separable_conv(x, 4, 3, padding="same", use_bias=False,
                           name="sep")
      return nn.BatchNorm(use_running_average=not train, epsilon=1e-3,
                          name="bn")(x)

  module = SepBn()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
  variables = {
      "params": {"sep": {
          "depthwise_kernel": rng.normal(size=(3, 3, 1, 3)).astype(np.float32),
          "pointwise_kernel": rng.normal(size=(1, 1, 3, 4)).astype(np.float32)},
                 "bn": {"scale": rng.uniform(.5, 1.5, 4).astype(np.float32),
                        "bias": rng.normal(size=4).astype(np.float32)}},
      "batch_stats": {"bn": {"mean": rng.normal(size=4).astype(np.float32),
                             "var": rng.uniform(.5, 2, 4).astype(np.float32)}}}
  pairs = translate.conv_bn_pairs(module, variables, (6, 7, 3))
  assert [(p["conv"], p["kernel"], p["bn"]) for p in pairs] == [
      (("sep",), "pointwise_kernel", ("bn",))]
  folded = translate.fold_batchnorm(variables, module, (6, 7, 3))
  assert set(folded["params"]) == {"sep"} and "bias" in folded["params"]["sep"]
  np.testing.assert_array_equal(folded["params"]["sep"]["depthwise_kernel"],
                                variables["params"]["sep"]["depthwise_kernel"])
  np.testing.assert_allclose(Inference(inner=module).apply(folded, x),
                             module.apply(variables, x), rtol=1e-5, atol=1e-5)
