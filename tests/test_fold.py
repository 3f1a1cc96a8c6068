"""BatchNorm folding: same logits as Keras, fewer ops, generic pairing."""

import jax
import numpy as np
import pytest
from flax import traverse_util

import models
from models import conv_forms
import translate

FOLD_MODELS = [n for n in ("resnet50", "resnet50v2", "mobilenetv2",
                           "efficientnetb0", "densenet121", "inceptionv3")
               if n in models.list_models()]
# README tier: ResNet50 and MobileNetV2; the others (8-15 s each) slow.
SLOW_FOLD = ("resnet50v2", "efficientnetb0", "densenet121", "inceptionv3")


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_FOLD else [])
    for n in FOLD_MODELS])
def test_folded_model_keeps_parity_with_keras(name):
  spec = models.get_spec(name)
  conv = translate.convert(name, weights="random", seed=4)
  folded = translate.fold_batchnorm(conv.variables, conv.module,
                                    spec.input_shape)
  n_before = len(traverse_util.flatten_dict(conv.variables))
  n_after = len(traverse_util.flatten_dict(folded))
  pairs = translate.conv_bn_pairs(conv.module, conv.variables,
                                  spec.input_shape)
  assert pairs and n_after < n_before
  module = models.create(name, inference=True)
  report = translate.check_parity(module, folded, conv.keras_model, name,
                                  seed=5)
  assert report.passed, report.summary()
  # The jitted graph is smaller (with native convolutions: the CPU fast form
  # spells each depthwise convolution as many ops, tests/test_fast_inference).
  x = np.zeros((1, *spec.input_shape), np.float32)
  ops = lambda m, v: jax.jit(m.apply).lower(v, x).as_text().count(" = ")
  with conv_forms.native_convolutions():
    assert ops(module, folded) < ops(conv.module, conv.variables)


def test_pairs_are_read_from_the_graph_not_the_names():
  conv = translate.convert("resnet50v2", weights=None)
  pairs = translate.conv_bn_pairs(conv.module, conv.variables, (224, 224, 3))
  by_bn = {p["bn"][-1]: p["conv"][-1] for p in pairs}
  assert by_bn["conv2_block1_1_bn"] == "conv2_block1_1_conv"
  # Pre-activation BatchNorms follow an addition, not a convolution.
  assert "conv2_block2_preact_bn" not in by_bn and "post_bn" not in by_bn
  assert all(p["epsilon"] == pytest.approx(1.001e-5) for p in pairs)


def test_inference_form_refuses_training():
  module = models.create("resnet50", inference=True)
  conv = translate.convert("resnet50", weights=None)
  folded = translate.fold_batchnorm(conv.variables, conv.module, (224, 224, 3))
  with pytest.raises(ValueError, match="cannot train"):
    module.apply(folded, np.zeros((1, 64, 64, 3), np.float32), train=True)
