"""``models.keras_layer``: a port as a ``keras.layers.FlaxLayer``.

The test process runs Keras on TensorFlow, so the JAX-backend checks run in
a subprocess (``KERAS_BACKEND`` unset there: ``keras_layer`` selects JAX);
here, the clear errors.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(alpha=0.35, input_shape=(32, 32, 3), include_top=False,
          pooling="avg")


def random_variables(seed=0):
  """Variables of MobileNetV2 (``KW``) without a compiled init: shapes from
  ``jax.eval_shape``, values random (variances positive)."""
  module = models.create("mobilenetv2", **KW)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  rng = np.random.default_rng(seed)
  flat = {}
  for k, s in traverse_util.flatten_dict(shapes).items():
    if k[-1] == "var":
      v = rng.uniform(0.5, 2.0, s.shape)
    elif k[-1] == "kernel":
      v = rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape)
    else:
      v = rng.normal(0, 0.3, s.shape)
    flat[k] = v.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def test_keras_layer_needs_the_jax_backend():
  with pytest.raises(RuntimeError, match=r"JAX backend.*'tensorflow'.*"
                     r"KERAS_BACKEND=jax"):
    models.keras_layer("mobilenetv2", random_variables(), **KW)


def test_keras_layer_refuses_variables_that_do_not_fit():
  flat = dict(traverse_util.flatten_dict(random_variables()))
  del flat[("batch_stats", "bn_Conv1", "mean")]
  flat[("params", "Conv1", "kernel")] = np.zeros((3, 3, 3, 8), np.float32)
  flat[("params", "extra", "kernel")] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError) as e:
    models.keras_layer("mobilenetv2", traverse_util.unflatten_dict(flat),
                       **KW)
  msg = str(e.value)
  assert "missing from the variables, first: batch_stats/bn_Conv1/mean" in msg
  assert "not in the module, first: params/extra/kernel" in msg
  assert "params/Conv1/kernel (3, 3, 3, 8) (module (3, 3, 3, 16))" in msg


SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from flax import traverse_util
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import models
    from test_keras_layer import KW, random_variables

    variables = random_variables(seed=1)
    layer = models.keras_layer("mobilenetv2", variables, **KW)
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    assert isinstance(layer, keras.layers.FlaxLayer)
    module = models.create("mobilenetv2", **KW)

    def as_variables(layer):
      tree = {{**layer.params, **layer.state}}
      return jax.tree_util.tree_map(lambda v: np.asarray(v.value), tree)

    def assert_same(a, b):
      a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
      assert set(a) == set(b), set(a) ^ set(b)
      for k in a:
        assert np.array_equal(a[k], b[k]), k

    # Its weights are the variables, params trainable, statistics not.
    assert_same(as_variables(layer), variables)
    n_params = len(traverse_util.flatten_dict(variables["params"]))
    n_stats = len(traverse_util.flatten_dict(variables["batch_stats"]))
    assert len(layer.trainable_weights) == n_params
    assert len(layer.non_trainable_weights) == n_stats

    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3))
    x = x.astype(np.float32)
    want = np.asarray(module.apply(variables, x))
    got = np.asarray(layer(x))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    # Training mode: batch statistics, and the moving statistics updated
    # as Flax updates them.
    train_out, updates = module.apply(variables, x, train=True,
                                      mutable=["batch_stats"])
    got = np.asarray(layer(x, training=True))
    np.testing.assert_allclose(got, np.asarray(train_out), rtol=1e-5,
                               atol=1e-5)
    assert_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                           atol=1e-6)
    new_stats = traverse_util.flatten_dict(as_variables(layer)["batch_stats"])
    for k, v in traverse_util.flatten_dict(updates["batch_stats"]).items():
      assert_close(new_stats[k], np.asarray(v))
    assert not np.allclose(new_stats[("bn_Conv1", "mean")],
                           variables["batch_stats"]["bn_Conv1"]["mean"])

    # In a functional model with a Keras head, fit trains the backbone too.
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(3, name="head")(layer(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    before = as_variables(layer)
    head = np.array(model.get_layer("head").kernel.numpy())
    model.fit(x, np.array([0, 1, 2, 0]), epochs=2, batch_size=4, verbose=0)
    after = as_variables(layer)
    moved = lambda c: [k for k, v in traverse_util.flatten_dict(
        after[c]).items() if not np.array_equal(
            v, traverse_util.flatten_dict(before[c])[k])]
    # All, but maybe the biases of the project BatchNorms: each feeds only
    # 1x1 convolutions (through residual adds) whose train-mode BatchNorm
    # subtracts any per-channel shift, so their true gradient is zero and
    # float32 leaves them as they were or moves them by rounding noise
    # (which ones varies with the convolutions' arithmetic).
    unmoved = set(traverse_util.flatten_dict(after["params"])) - set(
        moved("params"))
    assert all(k[0].endswith("project_BN") and k[1] == "bias"
               for k in unmoved), unmoved
    assert len(moved("batch_stats")) == n_stats, "statistics not updated"
    assert not np.array_equal(model.get_layer("head").kernel.numpy(), head)
    # Inference after fit is the Flax module on the layer's new weights.
    np.testing.assert_allclose(np.asarray(layer(x)),
                               np.asarray(module.apply(after, x)),
                               rtol=1e-6, atol=1e-6)
    print("KERAS_LAYER_OK")
    """)


def run_python(code_or_args, timeout=600):
  env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
  env["PYTHONPATH"] = ROOT
  args = (["-c", code_or_args] if isinstance(code_or_args, str)
          else code_or_args)
  return subprocess.run([sys.executable, *args], capture_output=True,
                        text=True, env=env, timeout=timeout, cwd=ROOT)


def script(fit):
  """The checks above; without ``fit`` (the default tier: compiling the
  train step doubles the time) it stops before the functional model."""
  code = SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
  if not fit:
    code = code[:code.index("# In a functional")] + "print('KERAS_LAYER_OK')"
  return code


@pytest.mark.slow
def test_flax_layer_on_the_jax_backend():
  proc = run_python(script(fit=False))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "KERAS_LAYER_OK" in proc.stdout


@pytest.mark.slow
def test_flax_layer_in_a_functional_model_trains_with_fit():
  proc = run_python(script(fit=True))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "KERAS_LAYER_OK" in proc.stdout


# examples/keras_new_head.py runs as its docstring says, with and without
# --variables: tests/test_doc_commands.py.


GRAPH_SCRIPT = textwrap.dedent("""
    import os
    import sys
    sys.path.insert(0, {tests!r})
    os.environ["KERAS_BACKEND"] = "jax"
    import keras
    import numpy as np
    import models
    import translate
    from graph_check import assert_close, random_inputs
    from translate import random_weights
    assert keras.backend.backend() == "jax"
    L = keras.layers
    a, b = keras.Input((6, 6, 3), name="a"), keras.Input((4,), name="b")
    x = L.Conv2D(5, 3, name="conv")(a)
    x = L.BatchNormalization(name="bn")(x)
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    out = L.Dense(2, name="head")(L.Concatenate()([x, L.Dense(3)(b)]))
    model = keras.Model([a, b], out)
    random_weights.randomize(model, 0)
    module, variables, _ = translate.from_keras(model)
    layer = models.keras_layer(module, variables, layer_name="mine")
    inputs = random_inputs(model, 1)
    want = np.asarray(model(inputs, training=False))
    assert_close(np.asarray(layer(inputs)), want, what="inference")
    # Training mode is Keras' (batch statistics) and moves the statistics.
    before = [np.asarray(w.value).copy() for w in layer.non_trainable_weights]
    assert_close(np.asarray(layer(inputs, training=True)),
                 np.asarray(model(inputs, training=True)), what="training")
    after = [np.asarray(w.value) for w in layer.non_trainable_weights]
    assert before and any(not np.array_equal(x, y)
                          for x, y in zip(before, after)), "stats not moved"
    assert layer.name == "mine"
    print("GRAPH_LAYER_OK")
    """)


@pytest.mark.slow
def test_translated_keras_model_as_a_flax_layer():
  proc = run_python(GRAPH_SCRIPT.format(tests=os.path.join(ROOT, "tests")))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "GRAPH_LAYER_OK" in proc.stdout
