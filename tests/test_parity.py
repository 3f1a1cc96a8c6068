"""Parity of every registered model against Keras, with randomized weights.

Every weight and every BatchNorm moving statistic is randomized, so a swapped
mean/variance, scale/bias or a transposed kernel cannot pass; logits are
compared at the model's native input size on inputs passed through the
model's own Keras ``preprocess_input``.
"""

import json
import os

import numpy as np
import pytest

import models
import translate


# Families whose native-size parity (12-33 s each on 2 cores) runs in the
# slow tier; their structural tests and small-size parity stay in the
# README tier.
SLOW_HERE = ("nasnetmobile", "inceptionresnetv2", "densenet121", "vgg16")


def _param(name):
  slow = models.get_spec(name).slow or name in SLOW_HERE
  marks = [pytest.mark.slow] if slow else []
  return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_param(n) for n in models.list_models()])
def test_parity_native_size(name):
  spec = models.get_spec(name)
  conv = translate.convert(name, weights="random", seed=1)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, name, batch=2, seed=2)
  assert report.logits, "a classifier must be compared on its logits"
  assert report.batch == 2
  assert conv.keras_model.input_shape[1:] == spec.input_shape
  if os.environ.get("PARITY_LOG"):  # for benchmarks/model_table.py
    with open(os.environ["PARITY_LOG"], "a") as f:
      f.write(json.dumps({
          "model": name, "keras_name": spec.keras_name,
          "input_shape": spec.input_shape, "params": conv.report.params,
          "max_abs": report.max_abs, "max_rel": report.max_rel,
          "max_logit": report.max_ref, "passed": report.passed}) + "\n")
  assert report.passed, report.summary()
  # The registry's count (what --list prints) is this model's.
  assert spec.params == conv.report.params
  # Flax "params" are exactly Keras' trainable weights.
  assert conv.report.params == sum(
      int(np.prod(w.shape)) for w in conv.keras_model.trainable_weights)
