"""``translate.to_nnx`` / ``from_nnx``: a translation as an NNX module.

Against the linen module it wraps (inference, training mode and its
moving statistics, one optimizer step of ``nnx.Optimizer`` against the same
step in linen with optax), inside a user's own NNX model, through orbax on
``nnx.state``, and back to Keras from a model trained in NNX.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax import traverse_util

import models
import translate
from translate import random_weights

from graph_check import assert_close, random_inputs  # pylint: disable=g-bad-import-order


def random_variables(module, shape, seed=0):
  """Random variables of ``module`` at input ``shape`` (no compiled init):
  kernels by fan-in, positive variances, distinct per channel."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  rng = np.random.default_rng(seed)
  flat = {}
  for k, s in traverse_util.flatten_dict(shapes).items():
    if k[-1] == "var":
      v = rng.uniform(0.5, 2.0, s.shape)
    elif len(s.shape) > 1:
      v = rng.normal(0, np.sqrt(1 / np.prod(s.shape[:-1])), s.shape)
    else:
      v = rng.normal(0, 0.3, s.shape)
    flat[k] = v.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _mobilenet():
  module = models.create("mobilenetv2", alpha=0.35, input_shape=(32, 32, 3),
                         classes=4, classifier_activation=None)
  return module, random_variables(module, (32, 32, 3))


def _images(n=4, seed=1, size=32):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(
      np.float32)


def _small():
  """A small CNN with BatchNorm (translated by from_keras): fast to compile,
  every kind of variable."""
  x = inputs = keras.Input((8, 8, 3))
  for filters in (6, 8):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  model = keras.Model(inputs, keras.layers.Dense(4)(x))
  random_weights.randomize(model, 2)
  module, variables, _ = translate.from_keras(model)
  return module, variables


def _leaves_equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]),
                                  err_msg=str(k))


def test_holds_the_given_variables_and_computes_what_linen_computes():
  module, variables = _mobilenet()
  m = translate.to_nnx(module, variables)
  assert isinstance(m, nnx.Module)
  # The very arrays given, no second initialization.
  _leaves_equal(translate.from_nnx(m), variables)
  x = _images()
  assert_close(nnx.jit(lambda m, x: m(x))(m, x),
               jax.jit(module.apply)(variables, x), 1e-6)
  kinds = {type(v).__name__ for _, v in nnx.iter_graph(m)
           if isinstance(v, nnx.Variable)}
  assert {"Param", "BatchStat"} <= kinds
  n_params = sum(np.size(v) for v in jax.tree.leaves(variables["params"]))
  assert sum(np.size(v) for v in jax.tree.leaves(
      nnx.state(m, nnx.Param))) == n_params


def test_training_mode_updates_the_statistics_in_place_as_linen():
  module, variables = _small()
  m = translate.to_nnx(module, variables)
  x = _images(size=8)
  want, updates = module.apply(variables, x, train=True,
                               mutable=["batch_stats"])
  assert_close(nnx.jit(lambda m, x: m(x, train=True))(m, x), want, 1e-6)
  now = traverse_util.flatten_dict(translate.from_nnx(m)["batch_stats"])
  moved = traverse_util.flatten_dict(updates["batch_stats"])
  assert now.keys() == moved.keys()
  for k in now:  # jitted against linen's eager apply: rounding only
    assert_close(now[k], moved[k], 1e-6, str(k))
    assert not np.allclose(now[k], traverse_util.flatten_dict(
        variables["batch_stats"])[k])
  _leaves_equal(translate.from_nnx(m)["params"], variables["params"])
  # Inference after it uses the moved statistics.
  after = {"params": variables["params"],
           "batch_stats": updates["batch_stats"]}
  assert_close(m(x), module.apply(after, x), 1e-6)


def _loss_linen(module, params, stats, x, y):
  logits, updates = module.apply({"params": params, "batch_stats": stats},
                                 x, train=True, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates["batch_stats"]


@pytest.mark.parametrize("small", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_one_optimizer_step_equals_the_linen_optax_step(small):
  module, variables = _small() if small else _mobilenet()
  x, y = _images(size=8 if small else 32), np.array([0, 1, 2, 3])
  # SGD with momentum: Adam's first step, g / sqrt(g^2) ~ sign(g), turns
  # float32 rounding in near-zero gradients into whole steps of lr.
  tx = optax.sgd(0.1, momentum=0.9)
  # linen + optax
  (loss, stats), grads = jax.jit(jax.value_and_grad(
      lambda p: _loss_linen(module, p, variables["batch_stats"], x, y),
      has_aux=True))(variables["params"])
  updates, _ = tx.update(grads, tx.init(variables["params"]),
                         variables["params"])
  params = optax.apply_updates(variables["params"], updates)
  # NNX
  m = translate.to_nnx(module, variables)
  opt = nnx.Optimizer(m, tx, wrt=nnx.Param)

  @nnx.jit
  def step(m, opt, x, y):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(
          m(x, train=True), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    opt.update(m, grads)
    return loss

  assert_close(step(m, opt, x, y), loss)
  got = translate.from_nnx(m)
  flat_got = traverse_util.flatten_dict(got)
  want = traverse_util.flatten_dict({"params": params,
                                     "batch_stats": stats})
  assert flat_got.keys() == want.keys()
  moved = 0
  for k in want:
    assert_close(flat_got[k], want[k], 1e-5, "/".join(k))
    moved += not np.array_equal(flat_got[k],
                                traverse_util.flatten_dict(variables)[k])
  assert moved == len(want)  # every parameter and statistic stepped


def _dropout_cnn():
  x = inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(6, 3)(x)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dropout(0.5)(x)
  model = keras.Model(inputs, keras.layers.Dense(3)(x))
  random_weights.randomize(model, 3)
  return model


def test_dropout_draws_from_the_module_rngs():
  model = _dropout_cnn()
  module, variables, _ = translate.from_keras(model)
  x = random_inputs(model, 4)[0]
  a = translate.to_nnx(module, variables, rngs=nnx.Rngs(dropout=7))
  b = translate.to_nnx(module, variables, rngs=nnx.Rngs(dropout=7))
  assert_close(translate.to_nnx(module, variables)(x),
               model(x, training=False))
  first, again = a(x, train=True), a(x, train=True)
  assert not np.allclose(first, again)  # the stream advances
  np.testing.assert_array_equal(b(x, train=True), first)  # same seed


class Classifier(nnx.Module):
  """A user's own NNX model: a translated backbone and a new head."""

  def __init__(self, backbone, features, classes, rngs):
    self.backbone = backbone
    self.head = nnx.Linear(features, classes, rngs=rngs)

  def __call__(self, x, train=False):
    return self.head(self.backbone(x, train=train))


@pytest.mark.parametrize("registered", [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_inside_a_users_nnx_model_trains_and_gives_the_backbone_back(
    registered):
  if registered:
    backbone = models.create("mobilenetv2", alpha=0.35, include_top=False,
                             input_shape=(32, 32, 3), pooling="avg")
    variables, features, size = random_variables(backbone, (32, 32, 3)), 1280, 32
  else:
    (backbone, variables), features, size = _small(), 4, 8
  first = "Conv1" if registered else "conv2d"
  model = Classifier(translate.to_nnx(backbone, variables), features, 5,
                     nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  x, y = _images(size=size), np.array([0, 1, 2, 4])

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(
          model(x, train=True), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(3)]
  assert losses[-1] < losses[0]
  assert isinstance(model.head, nnx.Linear)
  trained = translate.from_nnx(model)  # the one backbone inside
  flat, before = (traverse_util.flatten_dict(trained),
                  traverse_util.flatten_dict(variables))
  assert flat.keys() == before.keys()
  assert not np.array_equal(flat[("params", first, "kernel")],
                            before[("params", first, "kernel")])
  assert_close(backbone.apply(trained, x), model.backbone(x), 1e-6)


def test_from_nnx_says_which_module_it_needs():
  module, variables = _small()
  with pytest.raises(ValueError, match="holds no module made by "
                     "translate.to_nnx"):
    translate.from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))

  class Two(nnx.Module):

    def __init__(self):
      self.a = translate.to_nnx(module, variables)
      self.b = translate.to_nnx(module, variables)

  with pytest.raises(ValueError, match=r"holds 2 modules .*\(a, b\); pass "
                     "the one you mean"):
    translate.from_nnx(Two())


def test_other_collections_are_refused():
  with pytest.raises(ValueError, match=r"\['cache'\] are not params or "
                     "batch_stats"):
    translate.to_nnx(nnx, {"params": {}, "cache": {"k": np.zeros(2)}})


def test_nnx_state_saves_and_restores_with_orbax(tmp_path):
  module, variables = _small()
  m = translate.to_nnx(module, variables)
  x = _images(size=8)
  m(x, train=True)  # statistics move: the checkpoint holds the new ones
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", nnx.state(m))
  checkpointer.wait_until_finished()
  fresh = translate.to_nnx(module, variables)
  graphdef, abstract = nnx.split(fresh)
  restored = checkpointer.restore(tmp_path / "state", abstract)
  again = nnx.merge(graphdef, restored)
  _leaves_equal(translate.from_nnx(again), translate.from_nnx(m))
  assert_close(again(x), m(x), 0.0)


def test_trained_in_nnx_then_saved_and_back_to_keras(tmp_path):
  """The downstream path on NNX-trained variables: save_variables and
  load_variables, then to_keras into the user's own Keras model, whose
  output is the NNX model's."""
  model = _dropout_cnn()
  module, variables, _ = translate.from_keras(model)
  m = translate.to_nnx(module, variables)
  opt = nnx.Optimizer(m, optax.sgd(0.05), wrt=nnx.Param)
  x = random_inputs(model, 5, batch=4)[0]

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean(m(x, train=True) ** 2))(m)
    opt.update(m, grads)
    return loss

  step(m, opt)
  path = str(tmp_path / "trained.msgpack")
  translate.save_variables(path, translate.from_nnx(m))
  translate.to_keras(model, translate.load_variables(path))
  assert_close(model(x, training=False), m(x))


def _first_of_each_family():
  seen = {}
  for name in models.list_models():
    seen.setdefault(models.get_spec(name).family, name)
  return sorted(seen.values())


# Keras' smallest input sizes where 32 is too small.
_SMALLEST = {"inceptionv3": 75, "inceptionresnetv2": 75, "xception": 71}


# Training mode compiled for these too (the holder is the same for every
# family; these add stochastic depth, Dropout and models without BatchNorm
# to the README tier's MobileNetV2 and small CNN).
TRAIN_CHECKED = ("efficientnetb0", "convnexttiny", "resnet50", "vgg16")


@pytest.mark.slow
@pytest.mark.parametrize("name", _first_of_each_family())
def test_one_model_per_family_equals_its_linen_module(name):
  """Inference of to_nnx against the linen module, one model per family at
  a small size; training-mode outputs and moving statistics too for
  ``TRAIN_CHECKED``."""
  size = _SMALLEST.get(name, 32)
  shape = (size, size, 3)
  kwargs = dict(include_top=False, pooling="avg")
  module = models.create(name, input_shape=shape, **kwargs)
  variables = random_variables(module, shape)
  m = translate.to_nnx(module, variables)
  x = np.random.default_rng(3).normal(size=(2, *shape)).astype(np.float32)
  assert_close(nnx.jit(lambda m, x: m(x))(m, x),
               jax.jit(module.apply)(variables, x), 1e-6)
  if name not in TRAIN_CHECKED:
    return
  # The first key the model's default stream draws (stochastic depth and
  # Dropout in EfficientNet, ConvNeXt, ...): the same masks on both sides.
  key = nnx.Rngs(dropout=0).dropout()
  want, updates = jax.jit(lambda v, x: module.apply(
      v, x, train=True, mutable=["batch_stats"],
      rngs={"dropout": key}))(variables, x)
  got = nnx.jit(lambda m, x: m(x, train=True))(m, x)
  assert_close(got, want, 1e-5)
  back = translate.from_nnx(m)
  assert set(back) == set(variables)  # VGG, ConvNeXt: no batch_stats
  if "batch_stats" in variables:
    now = traverse_util.flatten_dict(back["batch_stats"])
    for k, v in traverse_util.flatten_dict(updates["batch_stats"]).items():
      assert_close(now[k], v, 1e-5, str(k))


def test_train_checked_names_are_families_of_the_slow_test():
  """A renamed model would silently drop out of the training-mode check."""
  assert set(TRAIN_CHECKED) <= set(_first_of_each_family())
