"""The registry and models.create's argument checks."""

import functools

import numpy as np
import pytest

import models
from models import resnet


def test_names_are_lower_case_and_keras_spelling_is_accepted():
  assert models.get_spec("ResNet50") is models.get_spec("resnet50")
  assert models.get_spec("EFFICIENTNETB0").keras_name == "EfficientNetB0"
  assert all(n == n.lower() for n in models.list_models())


def test_registering_a_name_twice_raises():
  spec = models.get_spec("resnet50")
  with pytest.raises(ValueError, match="already registered"):
    models.register(spec)
  with pytest.raises(ValueError, match="already registered"):
    models.register(models.ModelSpec(
        name="resnet_fifty", keras_name="ResNet50", family="resnet",
        flax_cls=functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3)),
        keras_fn="keras.applications.ResNet50",
        keras_preprocess="keras.applications.resnet",
        input_shape=(224, 224, 3), preprocess="caffe", bn_epsilon=1.001e-5))
  assert "resnet_fifty" not in models.list_models()


def _constructors(module):
  return {n for n in dir(module) if n[:1].isupper() and callable(
      getattr(module, n))}


def test_every_keras_and_tf_keras_application_is_registered():
  """Every constructor ``keras.applications`` exports, plus the tf-keras-only
  ResNet-RS and RegNet ones, resolves to a spec of the same Keras name."""
  import keras  # pylint: disable=g-import-not-at-top
  import tf_keras  # pylint: disable=g-import-not-at-top
  wanted = _constructors(keras.applications) | {
      n for n in _constructors(tf_keras.applications)
      if n.startswith(("ResNetRS", "RegNet"))}
  assert len(wanted) == 40 + 7 + 24
  for name in sorted(wanted):
    spec = models.get_spec(name)
    assert spec.keras_name == name
  assert len(models.list_models()) == len(wanted)


def test_every_family_has_a_model_in_the_readme_tier():
  """Each family's default variant runs its parity in ``python -m pytest``
  (the others in CI's slow tier), so a broken family shows at once."""
  fast = {}
  for n in models.list_models():
    spec = models.get_spec(n)
    fast.setdefault(spec.family, []).append(n) if not spec.slow else (
        fast.setdefault(spec.family, []))
  assert all(fast.values()), {f: v for f, v in fast.items() if not v}
  assert len(fast) == 15


def test_unknown_name_suggests_close_ones():
  with pytest.raises(models.UnknownModelError, match="densenet121"):
    models.get_spec("densenet12")


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_shape=(16, 16, 3)), "too small"),
    (dict(input_shape=(224, 224, 4)), "channels"),
    (dict(input_shape=(224, 224)), "height, width, channels"),
    (dict(pooling="mean"), "pooling"),
    (dict(classes=0), "classes"),
    (dict(alpha=0.5), "alpha"),
])
def test_create_refuses_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.create("resnet50", **kwargs)


def test_inception_minimum_size_is_keras_75():
  models.create("inceptionv3", include_top=False, input_shape=(75, 75, 3))
  with pytest.raises(ValueError, match="at least 75"):
    models.create("inceptionv3", include_top=False, input_shape=(74, 74, 3))


def test_decode_predictions_is_keras_own(monkeypatch):
  from keras.src.applications import imagenet_utils  # pylint: disable=g-import-not-at-top
  fake = {str(i): (f"n{i:08d}", f"class_{i}") for i in range(1000)}
  monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", fake)  # no download
  preds = np.zeros((1, 1000), np.float32)
  preds[0, [7, 3]] = [0.9, 0.05]
  top = models.decode_predictions(preds, top=2)
  assert [t[1] for t in top[0]] == ["class_7", "class_3"]
