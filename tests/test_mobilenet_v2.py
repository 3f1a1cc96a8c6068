"""MobileNetV2 at every alpha and input size Keras accepts."""

import pytest

import models
import translate
from models import mobilenet_v2

CASES = ([(a, 224) for a in mobilenet_v2.ALPHAS]
         + [(1.0, s) for s in mobilenet_v2.SIZES if s != 224]
         + [(0.35, 96), (1.4, 160), (0.5, 161)])  # 161: odd correct_pad


@pytest.mark.parametrize("alpha,size", CASES)
def test_parity_for_alpha_and_size(alpha, size):
  shape = (size, size, 3)
  conv = translate.convert("mobilenetv2", weights="random", seed=7,
                           alpha=alpha, input_shape=shape)
  assert conv.keras_model.input_shape[1:] == shape
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "mobilenetv2", seed=8)
  assert report.logits and report.passed, report.summary()
  # Keras' parameter count for this width.
  assert conv.report.params + conv.report.stats == (
      conv.keras_model.count_params())


def test_alpha_changes_the_widths():
  narrow = models.create("mobilenetv2", alpha=0.35)
  wide = models.create("mobilenetv2", alpha=1.4)
  shapes = lambda m: translate.variable_shapes(m, (96, 96, 3))["params"]
  assert shapes(narrow)["Conv1"]["kernel"].shape == (3, 3, 3, 16)
  assert shapes(wide)["Conv1"]["kernel"].shape == (3, 3, 3, 48)
  assert shapes(wide)["Conv_1"]["kernel"].shape[-1] == 1792  # 1280 * 1.4


def test_unknown_option_is_refused():
  with pytest.raises(ValueError, match="alpha"):
    models.create("resnet50", alpha=0.5)
