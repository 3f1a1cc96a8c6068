"""MobileNetV2 at every alpha and input size Keras accepts."""

import json
import os

import pytest

import models
import translate
from models import mobilenet_v2
from flax_spy import batchnorm_settings

# Every alpha at 224, every size at alpha 1.0 and at one other alpha each,
# and an odd size (correct_pad then pads 1 on both sides).
CASES = ([(a, 224) for a in mobilenet_v2.ALPHAS]
         + [(1.0, s) for s in mobilenet_v2.SIZES if s != 224]
         + [(0.35, 96), (0.5, 128), (1.4, 160), (0.75, 192), (0.5, 161)])


# Two cases in the README tier (the smallest width at the smallest size, and
# an odd size); every other alpha and size in the slow tier.
README_CASES = ((0.35, 96), (0.5, 161))


@pytest.mark.parametrize("alpha,size", [
    pytest.param(a, s, marks=[] if (a, s) in README_CASES
                 else [pytest.mark.slow]) for a, s in CASES])
def test_parity_for_alpha_and_size(alpha, size):
  shape = (size, size, 3)
  conv = translate.convert("mobilenetv2", weights="random", seed=7,
                           alpha=alpha, input_shape=shape)
  assert conv.keras_model.input_shape[1:] == shape
  # Every Keras layer found under its own name (no fuzzy pairing).
  assert set(conv.report.match_counts) == {"exact"}
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "mobilenetv2", seed=8)
  if os.environ.get("PARITY_LOG"):
    with open(os.environ["PARITY_LOG"], "a") as f:
      f.write(json.dumps({"model": "mobilenetv2", "alpha": alpha,
                          "size": size, "max_rel": report.max_rel}) + "\n")
  assert report.logits and report.passed, report.summary()
  # Keras' parameter count for this width.
  assert conv.report.params + conv.report.stats == (
      conv.keras_model.count_params())


def test_no_top_feature_map_parity():
  conv = translate.convert("mobilenetv2", weights="random", seed=3,
                           alpha=0.35, include_top=False,
                           input_shape=(97, 130, 3))
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "mobilenetv2", seed=4)
  assert report.passed, report.summary()
  assert conv.keras_model.output_shape[1:] == (4, 5, 1280)


def _shapes(alpha):
  module = models.create("mobilenetv2", alpha=alpha)
  return translate.variable_shapes(module, (96, 96, 3))["params"]


def test_alpha_changes_the_widths():
  assert _shapes(0.35)["Conv1"]["kernel"].shape == (3, 3, 3, 16)
  assert _shapes(1.4)["Conv1"]["kernel"].shape == (3, 3, 3, 48)


@pytest.mark.parametrize("alpha,last", [
    (0.35, 1280), (1.0, 1280),  # no alpha on Conv_1 for alpha <= 1
    (1.3, 1664), (1.4, 1792)])  # 1280 * alpha above 1
def test_last_conv_width(alpha, last):
  assert _shapes(alpha)["Conv_1"]["kernel"].shape[-1] == last


def test_batchnorm_settings_are_keras():
  seen = batchnorm_settings(models.create("mobilenetv2", alpha=0.5),
                            (96, 96, 3))
  keras_model = models.get_spec("mobilenetv2").keras_constructor()(
      weights=None, alpha=0.5, input_shape=(96, 96, 3))
  keras_bn = {l.name: l for l in keras_model.layers
              if type(l).__name__ == "BatchNormalization"}
  assert set(seen) == set(keras_bn)
  for name, (eps, momentum, frozen) in seen.items():
    assert eps == keras_bn[name].epsilon == 1e-3, name
    assert momentum == pytest.approx(keras_bn[name].momentum), name
    assert frozen, name


def test_create_and_convert_accept_alpha():
  module = models.create("mobilenetv2", alpha=0.5, input_shape=(128, 128, 3))
  assert module.alpha == 0.5
  assert models.get_spec("mobilenetv2").options == {"alpha": 1.0}
  assert models.create("mobilenetv2").alpha == 1.0


def test_unknown_option_is_refused():
  with pytest.raises(ValueError, match="alpha"):
    models.create("resnet50", alpha=0.5)
