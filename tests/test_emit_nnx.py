"""``translate.emit_source(..., api="nnx")``: native Flax NNX source for a
user's Keras model, against Keras and against the linen translation."""

from __future__ import annotations

import ast
import os

import jax
import keras
import numpy as np
import optax
import pytest
from flax import nnx
from flax import traverse_util

import translate
from translate import random_weights
from translate.from_keras import emit_source
from graph_check import as_list, assert_close, load_emitted  # pylint: disable=g-bad-import-order

ALLOWED_IMPORTS = {"numpy", "jax", "flax", "models"}


def _imported_roots(source: str) -> set[str]:
  roots = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      roots |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      roots.add(node.module.split(".")[0])
  return roots


def _generate(model, tmp_path, name="generated_nnx"):
  """The NNX file of ``model`` (written, imported from the file) and the
  linen translation's variables, through a msgpack."""
  path = os.path.join(str(tmp_path), f"{name}.py")
  source = emit_source(model, path, api="nnx")
  assert _imported_roots(source) <= ALLOWED_IMPORTS, _imported_roots(source)
  module, variables, _ = translate.from_keras(model)
  saved = os.path.join(str(tmp_path), f"{name}.msgpack")
  translate.save_variables(saved, variables)
  return load_emitted(path), source, module, translate.load_variables(saved)


def _keras(model, inputs, training=False):
  return as_list(model(list(inputs) if len(inputs) > 1 else inputs[0],
                       training=training))


def _cnn(rate):
  inp = keras.Input((16, 16, 3))
  x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="c1")(inp)
  x = keras.layers.BatchNormalization(momentum=0.9, epsilon=0.01,
                                      name="bn")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.Conv2D(6, (3, 2), padding="valid", name="c2")(x)
  x = keras.layers.BatchNormalization(name="bn2", center=False)(x)
  x = keras.layers.MaxPooling2D()(x)
  x = keras.layers.Dropout(rate, name="drop")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  out = keras.layers.Dense(3, name="head")(x)
  return keras.Model(inp, out, name="small_cnn")


def test_cnn_inference_training_and_imports(tmp_path):
  model = _cnn(0.0)
  random_weights.randomize(model, 0)
  generated, source, _, variables = _generate(model, tmp_path)
  assert "nnx.Conv(" in source and "nnx.BatchNorm(" in source
  assert "nnx.Linear(" in source and "nnx.Dropout(" in source
  assert "LinenLayer" not in source  # all native
  m = generated.create(variables)
  assert isinstance(m, nnx.Module)
  x = np.random.default_rng(1).normal(0, 1, (4, 16, 16, 3)).astype("float32")
  assert_close(m(x), _keras(model, [x])[0])
  # Training mode: batch statistics, the moving ones updated in place as
  # Keras' training call updates its own.
  got = m(x, train=True)
  assert_close(got, _keras(model, [x], training=True)[0], what="train")
  for name in ("bn", "bn2"):
    layer = model.get_layer(name)
    bn = getattr(m, name)
    assert_close(bn.mean[...], layer.moving_mean.numpy(), what=f"{name} mean")
    assert_close(bn.var[...], layer.moving_variance.numpy(),
                 what=f"{name} var")
  moved = m.to_variables()["batch_stats"]["bn"]["mean"]
  assert not np.allclose(moved, variables["batch_stats"]["bn"]["mean"])
  # and back in inference mode on the new statistics
  assert_close(m(x), _keras(model, [x])[0], what="after training")


def test_dropout_is_active_in_training_only(tmp_path):
  model = _cnn(0.5)
  random_weights.randomize(model, 0)
  generated, _, _, variables = _generate(model, tmp_path)
  m = generated.create(variables, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(0, 1, (4, 16, 16, 3)).astype("float32")
  assert_close(m(x), _keras(model, [x])[0])  # inference: no dropout
  a, b = np.asarray(m(x, train=True)), np.asarray(m(x, train=True))
  assert not np.allclose(a, b)  # two draws from the module's rngs


def _mixed():
  a = keras.Input((8, 8, 4), name="image")
  b = keras.Input((8, 8, 4), name="other")
  shared = keras.layers.Conv2D(4, 3, padding="same", name="shared_conv")
  x, y = shared(a), shared(b)  # one set of weights, two calls
  x = keras.layers.SeparableConv2D(6, 3, padding="same", name="sep")(x)
  y = keras.layers.Conv2DTranspose(6, 3, strides=2, padding="same",
                                   name="deconv")(y)
  y = keras.layers.MaxPooling2D(name="pool")(y)
  s = keras.layers.Add(name="add")([x, y])
  s = keras.layers.LayerNormalization(epsilon=1e-2, name="ln")(s)
  c = keras.layers.Concatenate(name="cat")([s, x])
  c = keras.layers.BatchNormalization(axis=1, name="bn_axis1")(c)
  flat = keras.layers.GlobalAveragePooling2D(name="gap")(c)
  out1 = keras.layers.Dense(5, activation="tanh", name="d1")(flat)
  out2 = keras.layers.Dense(2, use_bias=False, name="d2")(flat)
  return keras.Model([a, b], [out1, out2], name="mixed")


def test_native_and_bridged_shared_two_inputs_two_outputs(tmp_path):
  model = _mixed()
  random_weights.randomize(model, 1)
  generated, source, _, variables = _generate(model, tmp_path, "mixed")
  for native in ("nnx.LayerNorm(", "nnx.Linear(", "nnx.Conv("):
    assert native in source
  assert source.count("nnx_bridge.LinenLayer(") == 3  # sep, deconv, bn_axis1
  m = generated.create(variables)
  # the shared layer: one attribute, one kernel, called twice
  assert source.count("self.shared_conv = ") == 1
  assert source.count("self.shared_conv(") == 2
  kernels = [p for p, _ in nnx.iter_graph(m) if p and p[-1] == "kernel"]
  assert sum(p[0] == "shared_conv" for p in kernels) == 1
  rng = np.random.default_rng(2)
  inputs = [rng.normal(0, 1, (2, 8, 8, 4)).astype("float32")
            for _ in range(2)]
  got = m(*inputs)
  assert isinstance(got, list) and len(got) == 2
  for g, w in zip(got, _keras(model, inputs)):
    assert_close(g, w)
  got = m(*inputs, train=True)
  for g, w in zip(got, _keras(model, inputs, training=True)):
    assert_close(g, w, what="train")
  layer = model.get_layer("bn_axis1")  # bridged: updated in place too
  assert_close(m.to_variables()["batch_stats"]["bn_axis1"]["mean"],
               layer.moving_mean.numpy(), what="bridged moving mean")
  # every linen leaf comes back, with its shape
  want = traverse_util.flatten_dict(variables)
  have = traverse_util.flatten_dict(m.to_variables())
  assert set(want) == set(have)


def test_wrong_variables_are_refused(tmp_path):
  model = _mixed()
  generated, _, _, variables = _generate(model, tmp_path, "mixed_bad")
  bad = jax.tree.map(lambda v: v, variables)
  bad["params"]["d1"]["kernel"] = bad["params"]["d1"]["kernel"].T
  with pytest.raises(ValueError, match="d1/kernel"):
    generated.create(bad)
  bad = jax.tree.map(lambda v: v, variables)
  bad["params"]["extra"] = {"kernel": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match="extra"):
    generated.create(bad)


@pytest.mark.slow  # 27 s: MobileNetV2 built, translated, run twice
def test_nested_application_backbone(tmp_path):
  backbone = keras.applications.MobileNetV2(
      input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None)
  model = keras.Sequential([keras.Input((32, 32, 3)), backbone,
                            keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(3, name="new_head")])
  random_weights.randomize(model, 2)
  generated, source, _, variables = _generate(model, tmp_path, "backbone")
  assert "nnx_bridge.LinenModel(models.create('mobilenetv2'" in source
  assert "nnx.Linear(1280, 3" in source
  m = generated.create(variables)
  x = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype(
      "float32")
  assert_close(m(x), _keras(model, [x])[0])


def test_one_optimizer_step_equals_linen(tmp_path):
  inp = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="c")(inp)
  x = keras.layers.BatchNormalization(momentum=0.8, name="bn")(x)
  x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
  x = keras.layers.LayerNormalization(name="ln")(x)
  x = keras.layers.Flatten()(x)
  out = keras.layers.Dense(3, name="d")(x)
  model = keras.Model(inp, out)
  random_weights.randomize(model, 3)
  generated, _, module, variables = _generate(model, tmp_path, "step")
  rng = np.random.default_rng(4)
  x = rng.normal(0, 1, (4, 8, 8, 3)).astype("float32")
  y = rng.normal(0, 1, (4, 3)).astype("float32")
  tx = optax.sgd(0.1, momentum=0.9)

  def linen_loss(params):
    out, updates = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    return ((out - y) ** 2).mean(), updates
  grads, updates = jax.grad(linen_loss, has_aux=True)(variables["params"])
  step, _ = tx.update(grads, tx.init(variables["params"]),
                      variables["params"])
  want = optax.apply_updates(variables["params"], step)

  m = generated.create(variables)
  optimizer = nnx.Optimizer(m, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(m, optimizer):
    def loss_fn(m):
      return ((m(x, train=True) - y) ** 2).mean()
    grads = nnx.grad(loss_fn)(m)
    optimizer.update(m, grads)
  train_step(m, optimizer)
  got = m.to_variables()
  flat_got = traverse_util.flatten_dict(got["params"])
  flat_want = traverse_util.flatten_dict(want)
  assert set(flat_got) == set(flat_want)
  for k, v in flat_want.items():
    assert_close(flat_got[k], v, what="/".join(k))
  for k in (("c", "kernel"), ("bn", "scale"), ("dw", "kernel"),
            ("ln", "scale"), ("d", "kernel")):  # the step moved them
    assert not np.allclose(flat_got[k], variables["params"][k[0]][k[1]]), k
  for k, v in traverse_util.flatten_dict(updates["batch_stats"]).items():
    assert_close(traverse_util.flatten_dict(got["batch_stats"])[k], v,
                 what="/".join(k))


def test_cli_api_nnx(tmp_path, cli):
  model = _cnn(0.0)
  random_weights.randomize(model, 5)
  keras_file = os.path.join(str(tmp_path), "m.keras")
  model.save(keras_file)
  out = os.path.join(str(tmp_path), "o.msgpack")
  gen = os.path.join(str(tmp_path), "g.py")
  code, stdout, err = cli("--weights", keras_file, "--output", out,
                          "--emit_source", gen, "--api", "nnx", "--nocheck")
  assert code == 0, err
  assert "create(translate.load_variables(" in stdout
  source = open(gen, encoding="utf-8").read()
  assert _imported_roots(source) <= ALLOWED_IMPORTS
  m = load_emitted(gen).create(translate.load_variables(out))
  x = np.random.default_rng(6).normal(0, 1, (2, 16, 16, 3)).astype("float32")
  assert_close(m(x), _keras(model, [x])[0])
  code, _, err = cli("--weights", keras_file, "--output",
                     os.path.join(str(tmp_path), "p.msgpack"), "--api", "nnx")
  assert code != 0
  assert len(err) == 1 and err[0].startswith("error:"), err
  assert "--emit_source" in err[0]
  assert not os.path.exists(os.path.join(str(tmp_path), "p.msgpack"))


def test_unknown_api_is_refused(tmp_path):
  with pytest.raises(ValueError, match="'linen' or 'nnx'"):
    emit_source(_cnn(0.0), os.path.join(str(tmp_path), "x.py"), api="bogus")
