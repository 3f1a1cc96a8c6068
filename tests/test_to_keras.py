"""Flax -> Keras: ``translate.to_keras``, its strictness, and ``--to_keras``.

Round trips run Keras -> Flax -> change every variable -> Keras: the new
Keras model must hold the changed variables bit for bit (read back by the
forward translation, and one kernel compared by hand) and give the Flax
model's logits on them. MobileNetV2 runs in the default tier; one model per
other family runs in the slow tier, at small sizes.
"""

import os

import keras
import numpy as np
import pytest
from flax import traverse_util

import models
import translate
from translate import keras_io, random_weights
from translate.core import MergeError
from translate.match import MatchError
from translate.to_keras import (FoldedVariablesError, assign_variables,
                                atomic_weights_path)

from test_rules import CASES  # one Keras layer per rule class

SMALL = dict(alpha=0.35, input_shape=(32, 32, 3), classes=10)


def changed(variables, seed=0):
  """Every leaf moved (a few percent, so deep random models such as NASNet
  stay O(10) and comparable): params scaled and jittered in proportion to
  their spread, statistics scaled (the variances stay positive)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  out = {}
  for k, v in flat.items():
    if k[0] == "params":
      noise = rng.normal(0, 0.02 * (float(np.std(v)) or 1.0), v.shape)
      v = v * np.float32(1.02) + noise.astype(v.dtype)
    else:
      v = v * np.float32(1.05)
    out[k] = np.asarray(v, flat[k].dtype)
  return traverse_util.unflatten_dict(out)


def assert_same_variables(got, want):
  got, want = (traverse_util.flatten_dict(t) for t in (got, want))
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    assert np.array_equal(got[k], want[k]), k  # bit for bit


def keras_kernel_by_hand(keras_model, flat):
  """One kernel compared without the rules table: a depthwise kernel
  (Flax (h, w, 1, c*m) is Keras (h, w, c, m) reshaped, channel c*m + j =
  filter j of channel c) if the model has one, else a plain kernel (same
  layout). Returns the layer name compared."""
  layers = [l for l in keras_io.iter_layers(keras_model)
            if ("params", l.name, "kernel") in flat]
  depthwise = [l for l in layers if type(l).__name__ == "DepthwiseConv2D"]
  layer = (depthwise or layers)[0]
  keras_kernel = [v for v in layer.weights
                  if keras_io.weight_name(v) in ("kernel",
                                                  "depthwise_kernel")][0]
  keras_kernel = np.asarray(keras_kernel.numpy())
  flax_kernel = flat[("params", layer.name, "kernel")]
  assert np.array_equal(flax_kernel.reshape(keras_kernel.shape), keras_kernel)
  if depthwise:
    h, w, c, m = keras_kernel.shape
    assert flax_kernel.shape == (h, w, 1, c * m)
  else:
    assert flax_kernel.shape == keras_kernel.shape
  return layer.name


def keras_logits(keras_model, name, shape):
  x = np.asarray(models.preprocess(name, translate.random_images(shape, 2,
                                                                 seed=9)))
  last = keras_model.layers[-1]
  act, last.activation = last.activation, keras.activations.linear
  try:
    return np.asarray(keras_model(x, training=False))
  finally:
    last.activation = act


def check_round_trip(name, kwargs, module, variables, source, new, target):
  """``target`` (from ``to_keras(name, new)``) holds ``new`` exactly and
  computes Flax's logits on them; ``source`` held ``variables``."""
  shape = models.resolve_input_shape(name, kwargs.get("input_shape"))
  back, _ = translate.translate(module, target, shape)
  assert_same_variables(back, new)
  keras_kernel_by_hand(target, traverse_util.flatten_dict(new))
  parity = translate.check_parity(module, new, target, name,
                                  input_shape=shape, seed=5)
  assert parity.passed, parity.summary()
  # The change is well above the tolerance: the old Keras logits differ.
  old, now = keras_logits(source, name, shape), keras_logits(target, name,
                                                              shape)
  assert np.abs(old - now).max() > 100 * 1e-4 * max(1, np.abs(now).max())


def round_trip(name, **kwargs):
  module, variables, _, source = translate.convert(name, "random", seed=2,
                                                   **kwargs)
  new = changed(variables)
  target = translate.to_keras(name, new, **kwargs)
  check_round_trip(name, kwargs, module, variables, source, new, target)


# One model per family at a small size (min sizes: InceptionV3 and
# InceptionResNetV2 75, Xception 71; MobileNet v1 needs 64 at alpha 0.5 to
# pass the forward parity at all).
FAMILIES = {
    "resnet": ("resnet50", dict(input_shape=(32, 32, 3), classes=10)),
    "densenet": ("densenet121", dict(input_shape=(32, 32, 3), classes=10)),
    "efficientnet": ("efficientnetb0", dict(input_shape=(32, 32, 3),
                                            classes=10)),
    "efficientnet_v2": ("efficientnetv2b0", dict(input_shape=(32, 32, 3),
                                                 classes=10)),
    "inception_v3": ("inceptionv3", dict(input_shape=(75, 75, 3),
                                         classes=10)),
    "resnet_rs": ("resnetrs50", dict(input_shape=(32, 32, 3), classes=10)),
    "regnet": ("regnetx002", dict(input_shape=(32, 32, 3), classes=10)),
    "vgg": ("vgg16", dict(input_shape=(32, 32, 3), classes=10)),
    "xception": ("xception", dict(input_shape=(71, 71, 3), classes=10)),
    "mobilenet": ("mobilenet", dict(alpha=0.5, input_shape=(64, 64, 3),
                                    classes=10)),
    "mobilenet_v3": ("mobilenetv3small", dict(alpha=0.75,
                                              input_shape=(32, 32, 3),
                                              classes=10)),
    "convnext": ("convnexttiny", dict(input_shape=(32, 32, 3), classes=10)),
    "inception_resnet_v2": ("inceptionresnetv2",
                            dict(input_shape=(75, 75, 3), classes=10)),
    "nasnet": ("nasnetmobile", dict(input_shape=(32, 32, 3), classes=10)),
}


def test_every_family_has_a_round_trip():
  families = {models.get_spec(n).family for n in models.list_models()}
  assert families == set(FAMILIES) | {"mobilenet_v2"}


def test_round_trip_mobilenetv2(small):
  module, new, target = small
  check_round_trip("mobilenetv2", SMALL, module, small.variables,
                   small.source, new, target)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_family(family):
  name, kwargs = FAMILIES[family]
  assert models.get_spec(name).family == family
  round_trip(name, **kwargs)


# The rules read backwards, per rule and per Keras layer class -------------


@pytest.mark.parametrize("cls,wname", [
    (cls, w) for cls, rules in sorted(translate.RULES.items())
    for w, rule in rules.items() if rule is not None and rule.pattern])
def test_invert_undoes_apply_with_a_multiplier(cls, wname):
  rule = translate.RULES[cls][wname]
  spatial = len(rule.pattern.split("->")[0].split()) - 2  # (*k, c, m)
  shape = (3, 2)[-spatial:] + (4, 3)  # c = 4, m = 3
  keras_array = np.random.default_rng(0).normal(size=shape)
  flax_array = rule.apply(keras_array)
  back = rule.invert(flax_array, keras_array.shape)
  assert back.shape == keras_array.shape
  assert np.array_equal(back, keras_array)
  # Keras channel c's filter j is Flax output channel c*m + j.
  at = (1, 0)[:spatial]
  assert back[(*at, 2, 1)] == flax_array[(*at, 0, 2 * 3 + 1)]
  with pytest.raises(ValueError, match="does not fit the pattern"):
    rule.invert(flax_array, keras_array.shape[:-1])


def test_invert_without_pattern_is_identity():
  a = np.arange(6.0).reshape(2, 3)
  assert translate.Rule("params", "kernel").invert(a, (2, 3)) is a


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_layer_class_round_trips(case):
  make_keras, _ = CASES[case]

  def build():
    layer = make_keras.from_config(make_keras.get_config())
    inputs = keras.Input((9, 8, 4))
    model = keras.Model(inputs, layer(inputs))
    if case == "normalization":
      layer.adapt(np.zeros((2, 9, 8, 4), np.float32))
    return model

  source = build()
  random_weights.randomize(source, seed=3)
  flax_side = {}
  for layer in keras_io.read_weights(source):
    rules = translate.rules.rule_for(layer.cls, layer.name)
    for wname, array in layer.weights.items():
      if rules[wname] is not None:
        r = rules[wname]
        flax_side[(r.collection, layer.name, r.leaf)] = r.apply(array) + 0.25
  target = build()
  x = np.random.default_rng(1).normal(size=(2, 9, 8, 4)).astype(np.float32)
  assign_variables(target, traverse_util.unflatten_dict(flax_side))
  for layer in keras_io.read_weights(target):
    rules = translate.rules.rule_for(layer.cls, layer.name)
    for wname, array in layer.weights.items():
      rule = rules[wname]
      if rule is None:  # DROP (Normalization's count): Keras' own value
        continue
      want = flax_side[(rule.collection, layer.name, rule.leaf)]
      assert np.array_equal(rule.apply(array), want), wname
  if case.startswith("batchnorm") or case == "normalization":
    # Normalization derives its tensors from the weights (finalize_state).
    assert not np.allclose(np.asarray(target(x, training=False)),
                           np.asarray(source(x, training=False)))


# Strictness ----------------------------------------------------------------


class Small(tuple):
  """``(module, changed variables, Keras model holding them)``, plus the
  original ``variables`` and their Keras model ``source``."""


@pytest.fixture(scope="module")
def small():
  """MobileNetV2 (alpha 0.35, 32x32, 10 classes)."""
  module, variables, _, source = translate.convert("mobilenetv2", "random",
                                                   seed=1, **SMALL)
  new = changed(variables)
  out = Small((module, new, translate.to_keras("mobilenetv2", new, **SMALL)))
  out.variables, out.source = variables, source
  return out


def edited(variables, drop=(), add=None, replace=None):
  flat = dict(traverse_util.flatten_dict(variables))
  for k in drop:
    del flat[k]
  flat.update(add or {})
  flat.update(replace or {})
  return traverse_util.unflatten_dict(flat)


def keras_values(model):
  return [np.array(v.numpy()) for v in model.weights]


def assert_unchanged(model, before):
  for a, b in zip(keras_values(model), before):
    assert np.array_equal(a, b)


def test_missing_leaf_names_the_keras_weight(small):
  _, new, keras_model = small
  before = keras_values(keras_model)
  bad = edited(new, drop=[("batch_stats", "bn_Conv1", "mean")])
  with pytest.raises(MergeError) as e:
    assign_variables(keras_model, bad)
  msg = str(e.value)
  assert "1 Keras-side and 0 Flax-side" in msg
  assert "bn_Conv1/moving_mean needs Flax batch_stats/bn_Conv1/mean" in msg
  assert_unchanged(keras_model, before)


def test_extra_leaf_is_not_dropped_silently(small):
  _, new, keras_model = small
  before = keras_values(keras_model)
  bad = edited(new, add={("params", "Conv1", "bias"): np.zeros(16,
                                                              np.float32)})
  with pytest.raises(MergeError, match=r"0 Keras-side and 1 Flax-side.*"
                     r"Flax params/Conv1/bias \(16,\) fills no Keras weight"):
    assign_variables(keras_model, bad)
  assert_unchanged(keras_model, before)


def test_wrong_shape_is_refused(small):
  _, new, keras_model = small
  before = keras_values(keras_model)
  kernel = traverse_util.flatten_dict(new)[("params", "predictions",
                                            "kernel")]
  bad = edited(new, replace={("params", "predictions", "kernel"): kernel.T})
  with pytest.raises(MergeError, match=r"params/predictions/kernel \(10, "
                     r"1280\) -> Keras predictions/kernel \(1280, 10\)"):
    assign_variables(keras_model, bad)
  assert_unchanged(keras_model, before)


def test_integer_leaf_is_refused(small):
  _, new, keras_model = small
  key = ("params", "predictions", "bias")
  bad = edited(new, replace={key: np.zeros(10, np.int32)})
  with pytest.raises(MergeError, match="predictions/bias is int32"):
    assign_variables(keras_model, bad)


def test_variables_of_another_layout_do_not_match(small):
  _, new, keras_model = small
  flat = traverse_util.flatten_dict(new)
  bad = traverse_util.unflatten_dict(
      {(k[0], "backbone", *k[1:]): v for k, v in flat.items()})
  with pytest.raises(MatchError, match="with no Keras layer"):
    assign_variables(keras_model, bad)


def test_no_top_variables_into_a_top_model(small):
  _, new, _ = small
  bad = edited(new, drop=[("params", "predictions", "kernel"),
                          ("params", "predictions", "bias")])
  with pytest.raises(MatchError, match="Keras layer.*predictions"):
    translate.to_keras("mobilenetv2", bad, **SMALL)


def test_folded_variables_are_refused(small):
  module, new, _ = small
  folded = translate.fold_batchnorm(new, module, SMALL["input_shape"])
  with pytest.raises(FoldedVariablesError,
                     match=r"fold_batchnorm.*first bn_Conv1 into Conv1"):
    translate.to_keras("mobilenetv2", folded, **SMALL)


def test_one_missing_statistic_is_not_called_folded(small):
  """The folded check looks for whole BatchNorms gone, not any gap."""
  _, new, _ = small
  bad = edited(new, drop=[("batch_stats", "bn_Conv1", "var")])
  with pytest.raises(MergeError, match="bn_Conv1/moving_variance"):
    translate.to_keras("mobilenetv2", bad, **SMALL)


def test_imagenet_only_options_are_refused():
  with pytest.raises(ValueError, match="imagenet_rescaling.*weights=None"):
    translate.to_keras("efficientnetb0", {}, imagenet_rescaling=True)


def test_atomic_weights_path_leaves_nothing_on_failure(tmp_path):
  out = tmp_path / "m.weights.h5"
  with pytest.raises(RuntimeError):
    with atomic_weights_path(out) as tmp:
      assert tmp.endswith(".weights.h5")
      with open(tmp, "wb") as f:
        f.write(b"partial")
      raise RuntimeError("disk full")
  assert not list(tmp_path.iterdir())
  with atomic_weights_path(out) as tmp:
    with open(tmp, "wb") as f:
      f.write(b"whole")
  assert [p.name for p in tmp_path.iterdir()] == ["m.weights.h5"]
  assert out.read_bytes() == b"whole"


# The command line ----------------------------------------------------------

FLAGS = ("--model", "mobilenetv2", "--alpha", "0.35", "--input_shape",
         "32,32,3", "--classes", "10")


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
  """``run(*flags)`` runs ``main.main`` in-process; returns ``(exit code,
  stdout, the error lines)``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  import main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)

  def run(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main.py", *map(str, args)])
    capsys.readouterr()
    code = main.main(["main.py"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, [l for l in err.splitlines() if l.startswith("error:")]

  yield run
  flags.FLAGS.unparse_flags()


def files(directory):
  return sorted(os.listdir(directory))


def test_cli_writes_weights_that_keras_loads(tmp_path, cli, small):
  _, new, target = small
  translate.save_variables(tmp_path / "tuned.msgpack", new)
  code, out, errors = cli(*FLAGS, "--to_keras", "tuned.msgpack", "--output",
                          "tuned.weights.h5")
  assert code == 0 and not errors, errors
  assert "PASS" in out
  assert files(tmp_path) == ["tuned.json", "tuned.msgpack", "tuned.weights.h5"]
  reloaded = keras.applications.MobileNetV2(
      weights=None, alpha=0.35, input_shape=(32, 32, 3), classes=10,
      classifier_activation=None)
  reloaded.load_weights(tmp_path / "tuned.weights.h5")
  # The file holds exactly what to_keras built (which test_round_trip_*
  # shows equal to Flax), so it computes the same logits.
  for a, b in zip(keras_values(reloaded), keras_values(target)):
    assert np.array_equal(a, b)
  flat = traverse_util.flatten_dict(new)
  assert np.array_equal(reloaded.get_layer("expanded_conv_depthwise").kernel
                        .numpy().reshape(-1),
                        flat[("params", "expanded_conv_depthwise", "kernel")]
                        .reshape(-1))
  np.testing.assert_array_equal(
      keras_logits(reloaded, "mobilenetv2", (32, 32, 3)),
      keras_logits(target, "mobilenetv2", (32, 32, 3)))
  # An existing output is refused without --overwrite, and left alone.
  data = (tmp_path / "tuned.weights.h5").read_bytes()
  code, _, errors = cli(*FLAGS, "--to_keras", "tuned.msgpack", "--output",
                        "tuned.weights.h5")
  assert code == 1 and len(errors) == 1 and "--overwrite" in errors[0]
  assert (tmp_path / "tuned.weights.h5").read_bytes() == data


def test_cli_failed_parity_writes_nothing_unless_keep_failed(
    tmp_path, cli, small, monkeypatch):
  """A real disagreement: ``translate.to_keras`` is wrapped to flip the
  rows of Keras' stem kernel after the strict assignment (a layout bug),
  so the reloaded Keras model and Flax really differ."""
  _, new, _ = small
  translate.save_variables(tmp_path / "tuned.msgpack", new)
  real = translate.to_keras

  def flipped(*args, **kwargs):
    model = real(*args, **kwargs)
    kernel = model.get_layer("Conv1").kernel
    kernel.assign(np.ascontiguousarray(kernel.numpy()[::-1]))
    return model

  monkeypatch.setattr(translate, "to_keras", flipped)
  code, _, errors = cli(*FLAGS, "--to_keras", "tuned.msgpack", "--output",
                        "out.weights.h5")
  assert code == 1 and len(errors) == 1, errors
  assert "parity check failed" in errors[0] and "nothing written" in errors[0]
  assert files(tmp_path) == ["tuned.json", "tuned.msgpack"]  # no temp file
  code, _, errors = cli(*FLAGS, "--to_keras", "tuned.msgpack", "--output",
                        "out.weights.h5", "--keep_failed")
  assert code == 0, errors
  assert "out.weights.h5" in files(tmp_path)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, small):
  d = tmp_path_factory.mktemp("msgpack")
  _, new, _ = small
  path = d / "good.msgpack"
  translate.save_variables(path, new)
  data = path.read_bytes()
  (d / "truncated.msgpack").write_bytes(data[: len(data) // 2])
  (d / "noise.msgpack").write_bytes(np.random.default_rng(0).bytes(4096))
  module, _, _ = small
  translate.save_variables(d / "folded.msgpack", translate.fold_batchnorm(
      new, module, SMALL["input_shape"]))
  return d


@pytest.mark.parametrize("extra,needles", [
    (("--to_keras", "{d}/truncated.msgpack"), ("not a Flax msgpack", "truncated")),
    (("--to_keras", "{d}/noise.msgpack"), ("msgpack",)),
    (("--to_keras", "{d}/absent.msgpack"), ("not an existing file",)),
    (("--to_keras", "{d}/folded.msgpack"), ("folded", "fold_batchnorm")),
    (("--to_keras", "{d}/good.msgpack", "--model", "mobilenet_v2x"),
     ("unknown model",)),
    (("--to_keras", "{d}/good.msgpack", "--model", "mobilenet", "--alpha",
      "0.5"), ("does not fit mobilenet", "--model")),
    (("--to_keras", "{d}/good.msgpack", "--noinclude_top"),
     ("does not fit mobilenetv2", "predictions")),
    (("--to_keras", "{d}/good.msgpack", "--input_shape", "16,16,3"),
     ("too small",)),
    (("--to_keras", "{d}/good.msgpack", "--output", "out.msgpack"),
     ("must end with .weights.h5",)),
    (("--to_keras", "{d}/good.msgpack", "--output", "nodir/o.weights.h5"),
     ("does not exist",)),
    (("--to_keras", "{d}/good.msgpack", "--weights", "random"),
     ("--weights",)),
])
def test_cli_errors_write_nothing(tmp_path, cli, bad_files, extra, needles):
  before = files(bad_files)
  args = [a.format(d=bad_files) for a in extra]
  code, _, errors = cli(*FLAGS, *args)
  assert code == 1 and len(errors) == 1, errors
  for needle in needles:
    assert needle in errors[0], errors[0]
  assert files(tmp_path) == [] and files(bad_files) == before


@pytest.mark.slow
def test_cli_subprocess_default_output(tmp_path, small):
  """As a user runs it: the default output goes beside the msgpack."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _, new, _ = small
  translate.save_variables(tmp_path / "tuned.msgpack", new)
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "main.py"), *FLAGS, "--to_keras",
       "tuned.msgpack"], capture_output=True, text=True, cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=root), timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert files(tmp_path) == ["tuned.json", "tuned.msgpack", "tuned.weights.h5"]
