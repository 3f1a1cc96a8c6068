"""Training mode: Keras' BatchNorm arithmetic, gradients against a float64
Keras reference, training-mode forward and moving statistics against Keras'
``model(x, training=True)``, and the laws of dropout / drop-connect /
stochastic depth (their RNG cannot match Keras', so they are tested
statistically)."""

import gc

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models
import translate
from models import layers as L
from translate import core, keras_build, keras_io
from translate.parity import random_images


# ---------------------------------------------------------------------------
# Keras helpers.


def _keras_dtype(spec, dtype):
  """Sets Keras' (or tf-keras', for the tf-keras families) float type."""
  if spec is not None and spec.keras_preprocess.startswith("tf_keras."):
    import tf_keras  # pylint: disable=g-import-not-at-top
    tf_keras.backend.set_floatx(dtype)
    return
  import keras  # pylint: disable=g-import-not-at-top
  keras.config.set_floatx(dtype)
  keras.config.set_dtype_policy(dtype)  # set_floatx alone leaves it float64


def keras_float64(spec, keras32, **kwargs):
  """A float64 copy of ``keras32`` (same architecture and weights)."""
  _keras_dtype(spec, "float64")
  try:
    k64 = keras_build.build(spec, None, **kwargs)
  finally:
    _keras_dtype(spec, "float32")
  k64.set_weights(keras32.get_weights())
  for layer in keras_io.iter_layers(k64):
    if layer.weights and hasattr(layer, "finalize_state"):
      # Normalization (EfficientNet) uses its mean/variance variables only
      # after finalize_state(), as after adapt() or a load.
      layer.finalize_state()
  return k64


def _as_flax(module, input_shape, keras_model, values):
  """``values`` (``{id(keras variable): array}``) laid out as ``module``'s
  variables, through the translator's own rules; other weights are zero."""
  layers = []
  for layer in keras_io.iter_layers(keras_model):
    w = {keras_io.weight_name(v): values.get(id(v), np.zeros(v.shape))
         for v in layer.weights}
    if w:
      layers.append(keras_io.KerasLayer(layer.name, type(layer).__name__, w))
  tree, _, _ = core.merge(layers, core.variable_shapes(module, input_shape))
  return tree


def keras_loss_and_grads(module, input_shape, keras_model, x, labels):
  """Keras' softmax cross-entropy and its gradient in training mode, as a
  flat ``{path: float64 array}`` in the Flax layout."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  xv = tf.constant(x.astype(keras_model.weights[0].dtype))
  with tf.GradientTape() as tape:
    logits = keras_model(xv, training=True)
    loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
  tv = keras_model.trainable_variables
  grads = tape.gradient(loss, tv)
  values = {id(v): g.numpy().astype(np.float64) for v, g in zip(tv, grads)}
  tree = _as_flax(module, input_shape, keras_model, values)
  return float(loss.numpy()), traverse_util.flatten_dict(tree["params"])


def keras_jax_loss_and_grads(module, input_shape, keras_model, name, kwargs,
                             x, labels, tmp_path):
  """Keras' own float32 loss and gradient on its JAX backend (jitted, as
  Keras' JAX trainer runs it), from a subprocess with the same weights."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  weights = str(tmp_path / "model.weights.h5")
  keras_model.save_weights(weights)
  np.savez(tmp_path / "in.npz", x=x, labels=labels)
  script = os.path.join(os.path.dirname(__file__), "keras_jax_grads.py")
  env = {**os.environ, "KERAS_BACKEND": "jax"}
  subprocess.run([sys.executable, script, str(tmp_path / "in.npz"), weights,
                  str(tmp_path / "out.npz"), name, repr(kwargs)],
                 check=True, env=env, timeout=1200)
  out = np.load(tmp_path / "out.npz")
  tv = keras_model.trainable_variables
  values = {id(v): out[f"g{i}"].astype(np.float64) for i, v in enumerate(tv)}
  tree = _as_flax(module, input_shape, keras_model, values)
  return float(out["loss"]), traverse_util.flatten_dict(tree["params"])


def flax_loss_and_grads(module, variables, x, labels):
  def loss_fn(params):
    logits, _ = module.apply({**variables, "params": params},
                             jnp.asarray(x), train=True,
                             mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
  return float(loss), traverse_util.flatten_dict(jax.device_get(grads))


def relu_sign_flips(module, variables, x, labels, monkeypatch):
  """``[(call index, count)]`` of the ReLUs whose float32 input, in the
  jitted loss-and-gradient computation, has the other sign than in float64
  (the same Flax module): a diagnostic for a gradient failure. Such an input
  lies within float32 rounding of the kink; the float32 gradient there is
  exact for a neighbouring point, and differs from float64's by that
  element's whole contribution, whatever the arithmetic."""
  relu = nn.relu

  def inputs(dtype):
    def loss_fn(params, x):
      seen = []

      def spy(a):
        seen.append(a)
        return relu(a)

      monkeypatch.setattr(nn, "relu", spy)
      try:
        logits, _ = module.apply(
            {"params": params, "batch_stats": v["batch_stats"]}, x,
            train=True, mutable=["batch_stats"])
      finally:
        monkeypatch.setattr(nn, "relu", relu)
      loss = -jnp.mean(jnp.take_along_axis(
          jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], 1))
      return loss, seen

    v = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    _, seen = jax.jit(jax.grad(loss_fn, has_aux=True))(
        v["params"], jnp.asarray(x, dtype))
    return [np.asarray(a, np.float64) for a in seen]

  a32 = inputs(jnp.float32)
  with jax.enable_x64(True):
    a64 = inputs(jnp.float64)
  flips = [int(np.sum((a > 0) != (b > 0))) for a, b in zip(a32, a64)]
  return [(i, n) for i, n in enumerate(flips) if n]


def gradient_report(flax_grads, keras32_grads, keras64_grads):
  """Per tensor: Flax's max error against float64, the worse of Keras'
  float32 errors (``keras32_grads``: one flat dict per backend), and the
  tensor's scale; sorted by how close Flax is to its bound (worst first).
  The bound is 2x that Keras error or 1e-4 of the scale."""
  rows = []
  for k, ref in keras64_grads.items():
    scale = float(np.abs(ref).max())
    ef = float(np.abs(flax_grads[k] - ref).max())
    ek = max(float(np.abs(g[k] - ref).max()) for g in keras32_grads)
    bound = max(2 * ek, 1e-4 * scale)
    rows.append((ef / bound if bound else (0.0 if ef == 0 else np.inf),
                 "/".join(k), ef, ek, scale))
  return sorted(rows, reverse=True)


# ---------------------------------------------------------------------------
# The BatchNorm layer itself, against Keras' BatchNormalization.


def _keras_bn_case(dtype, x, gamma, beta, mean, var, momentum, eps, g):
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  layer = keras.layers.BatchNormalization(momentum=momentum, epsilon=eps,
                                          dtype=dtype)
  layer.build(x.shape)
  layer.set_weights([a.astype(dtype) for a in (gamma, beta, mean, var)])
  xv = tf.constant(x.astype(dtype))
  with tf.GradientTape() as tape:
    tape.watch(xv)
    y = layer(xv, training=True)
    loss = tf.reduce_sum(y * tf.constant(g.astype(dtype)))
  dx, dgamma, dbeta = tape.gradient(loss, [xv, layer.gamma, layer.beta])
  out = [y, dx, dgamma, dbeta, layer.moving_mean, layer.moving_variance]
  return [np.asarray(o, np.float64) for o in out]


def _flax_bn_case(bn, x, gamma, beta, mean, var, g):
  variables = {"params": {"scale": gamma, "bias": beta},
               "batch_stats": {"mean": mean, "var": var}}

  def f(x, params):
    y, new = bn.apply({**variables, "params": params}, x,
                      mutable=["batch_stats"])
    return jnp.sum(y * g), (y, new["batch_stats"])

  (_, (y, stats)), (dx, dp) = jax.jit(jax.value_and_grad(
      f, argnums=(0, 1), has_aux=True))(x, variables["params"])
  out = [y, dx, dp["scale"], dp["bias"], stats["mean"], stats["var"]]
  return [np.asarray(o, np.float64) for o in out]


def _bn_data(offset):
  rng = np.random.default_rng(0)
  c = 4
  # Channels whose mean is far from zero against their spread: E[x²] - E[x]²
  # cancels there in float32.
  x = (rng.normal(size=(8, 6, 6, c)) * [0.05, 1.0, 0.3, 2.0]
       + [offset, -0.5, -offset, 3.0]).astype(np.float32)
  gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
  beta = rng.normal(size=c).astype(np.float32)
  mean = rng.normal(size=c).astype(np.float32)
  var = rng.uniform(0.5, 2.0, c).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  return x, gamma, beta, mean, var, g


def _bn_errors(bn, momentum, eps, offset=40.0):
  x, gamma, beta, mean, var, g = _bn_data(offset)
  ref = _keras_bn_case("float64", x, gamma, beta, mean, var, momentum, eps, g)
  k32 = _keras_bn_case("float32", x, gamma, beta, mean, var, momentum, eps,
                       g)
  fl = _flax_bn_case(bn, x, gamma, beta, mean, var, g)
  names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_var"]
  return {n: (float(np.abs(f - r).max()), float(np.abs(k - r).max()),
              float(np.abs(r).max()))
          for n, f, k, r in zip(names, fl, k32, ref)}


def _within_keras(errors):
  return {n: ef <= max(2 * ek, 1e-4 * scale, 1e-7 * scale)
          for n, (ef, ek, scale) in errors.items()}


@pytest.mark.parametrize("momentum,eps", [(0.99, 1e-3), (0.9, 1.001e-5),
                                          (0.0, 1e-5)])
def test_batchnorm_layer_matches_keras_float64(momentum, eps):
  """Output, gradients (x, gamma, beta) and moving statistics of one layer
  in training mode: as close to float64 Keras as Keras' float32 is."""
  bn = L.BatchNorm(use_running_average=False, momentum=momentum,
                   epsilon=eps)
  ok = _within_keras(_bn_errors(bn, momentum, eps))
  assert all(ok.values()), ok


def test_flax_fast_variance_batchnorm_fails_the_same_check():
  """The check has teeth: Flax's default BatchNorm (E[x²] - E[x]²) is far
  outside Keras' float32 error on the same data."""
  bn = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3)
  errors = _bn_errors(bn, 0.99, 1e-3)
  ok = _within_keras(errors)
  assert not ok["y"] and not ok["dx"], errors


def test_batchnorm_moving_statistics_use_keras_momentum():
  """A momentum of 1 - m instead of m (a classic swap) is caught."""
  x, gamma, beta, mean, var, _ = _bn_data(0.0)
  bn = L.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  _, new = bn.apply({"params": {"scale": gamma, "bias": beta},
                     "batch_stats": {"mean": mean, "var": var}}, x,
                    mutable=["batch_stats"])
  xb = x.astype(np.float64)
  np.testing.assert_allclose(new["batch_stats"]["mean"],
                             0.9 * mean + 0.1 * xb.mean((0, 1, 2)),
                             rtol=1e-5)
  # Keras' moving variance takes the biased (1/N) batch variance.
  np.testing.assert_allclose(new["batch_stats"]["var"],
                             0.9 * var + 0.1 * xb.var((0, 1, 2)), rtol=1e-5)


def test_batchnorm_keeps_flax_names_and_folds():
  """Same variables as ``nn.BatchNorm`` (translation unchanged), an
  ``nn.BatchNorm`` instance (fold and inference find it), scale/center
  off as Keras' scale=False/center=False."""
  class ConvBn(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = L.conv(x, 3, 3, name="conv", use_bias=False)
      return L.batch_norm(x, name="bn", epsilon=1e-3, train=train)

  shapes = jax.eval_shape(ConvBn().init, jax.random.key(0),
                          jnp.zeros((1, 5, 5, 2)))
  assert jax.tree.map(lambda a: a.shape, shapes) == {
      "params": {"conv": {"kernel": (3, 3, 2, 3)},
                 "bn": {"scale": (3,), "bias": (3,)}},
      "batch_stats": {"bn": {"mean": (3,), "var": (3,)}}}
  nos = jax.eval_shape(
      L.BatchNorm(use_running_average=True, use_scale=False,
                  use_bias=False).init, jax.random.key(0),
      jnp.zeros((1, 3)))
  assert set(nos) == {"batch_stats"}
  pairs = translate.fold.conv_bn_pairs(ConvBn(), shapes, (5, 5, 2))
  assert [(p["conv"], p["bn"], p["epsilon"]) for p in pairs] == [
      (("conv",), ("bn",), 1e-3)]


# ---------------------------------------------------------------------------
# Whole models in training mode against Keras.

# One model per Keras 3 family, the smallest variant, at a size where every
# BatchNorm sees at least MIN_BN_VALUES values per channel (e.g. 2x2 final
# maps x 32 images; checked in the parity test), stochastic layers off by
# Keras' own option names (Keras would draw its own masks). VGG and ConvNeXt
# have no BatchNorm: a small batch does.
FAMILY_CASES = {
    # Images of seed 1: with the default seed 3, one ReLU input in
    # conv4_block1_out lies within float32 rounding of zero and takes the
    # other side in Flax's float32 (its CPU convolution forms round
    # differently from XLA's native ones), and conv4_block1's gradients miss
    # the bound by that element's contribution (35x; Keras-JAX's native
    # float32 flips elsewhere, in conv4_block5). Of seeds 0-7, 1 and 5 give
    # no flip at all (see relu_sign_flips).
    "resnet50": dict(input_shape=(64, 64, 3), image_seed=1),
    "mobilenetv2": dict(input_shape=(64, 64, 3), alpha=0.35),
    "densenet121": dict(input_shape=(64, 64, 3)),
    "efficientnetb0": dict(input_shape=(64, 64, 3), dropout_rate=0.0,
                           drop_connect_rate=0.0),
    "efficientnetv2b0": dict(input_shape=(64, 64, 3), dropout_rate=0.0,
                             drop_connect_rate=0.0),
    # InceptionV3 / InceptionResNetV2: 107x107 is the smallest with 2x2
    # final maps (75x75 gives 1x1).
    "inceptionv3": dict(input_shape=(107, 107, 3)),
    # Batch 25: exactly 100 values per channel at the 2x2 maps; at 32 its
    # float64 gradient tape and the jitted Flax step together took a worker
    # past 13 GB (OOM-killed beside another slow test on a 23 GB machine).
    "inceptionresnetv2": dict(input_shape=(107, 107, 3), batch=25),
    "xception": dict(input_shape=(71, 71, 3), batch=12),  # 3x3 final maps
    "nasnetmobile": dict(input_shape=(64, 64, 3)),
    "mobilenet": dict(input_shape=(64, 64, 3), alpha=0.25, dropout=0.0),
    "mobilenetv3small": dict(input_shape=(64, 64, 3), alpha=0.75,
                             dropout_rate=0.0),
    "vgg16": dict(input_shape=(32, 32, 3), batch=8),
    "convnexttiny": dict(input_shape=(32, 32, 3), batch=8),
}
BATCH = 32
MIN_BN_VALUES = 100


def _convert(name, batch=BATCH, image_seed=3, **kwargs):
  kwargs = dict(classes=10, classifier_activation=None, **kwargs)
  conv = translate.convert(name, weights="random", seed=0, **kwargs)
  spec = models.get_spec(name)
  shape = kwargs["input_shape"]
  images = random_images(shape, batch=batch, seed=image_seed)
  x = np.asarray(spec.keras_preprocess_input()(images), np.float32)
  labels = np.random.default_rng(0).integers(0, 10, batch)
  return conv, spec, kwargs, x, labels


def _batchnorm_values(module, variables, x):
  """``{name: values per channel}`` each BatchNorm sees in training mode
  (traced only)."""
  seen = {}

  def spy(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.BatchNorm)
        and context.method_name == "__call__"):
      seen[context.module.name] = int(np.prod(args[0].shape[:-1]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    jax.eval_shape(lambda v, x: module.apply(
        v, x, train=True, mutable=["batch_stats"]), variables, x)
  return seen


def _training_parity(name, kwargs, min_bn_values=0, converted=None):
  """Relative errors of the training-mode logits and of the new moving
  statistics against Keras, and how far Keras' statistics moved (None
  without BatchNorm). ``converted``: ``_convert``'s result, to reuse."""
  conv, _, kw, x, _ = converted or _convert(name, **kwargs)
  module, variables, _, keras_model = conv
  counts = _batchnorm_values(module, variables, x)
  assert not counts or min(counts.values()) >= min_bn_values, min(
      counts.items(), key=lambda kv: kv[1])
  logits, new = jax.jit(lambda v, x: module.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, x)
  k_logits = np.asarray(keras_model(x, training=True))
  k_stats = _as_flax(module, kw["input_shape"], keras_model, {
      id(v): np.asarray(v.numpy()) for v in keras_model.weights}
  ).get("batch_stats")
  rel = np.abs(np.asarray(logits) - k_logits).max() / max(
      1.0, np.abs(k_logits).max())
  if "batch_stats" not in variables:  # VGG, ConvNeXt: no BatchNorm
    assert not counts and not new and k_stats is None
    return rel, 0.0, None
  stats = traverse_util.flatten_dict(jax.device_get(new["batch_stats"]))
  k_flat = traverse_util.flatten_dict(k_stats)
  old = traverse_util.flatten_dict(variables["batch_stats"])
  worst = max(np.abs(stats[k] - k_flat[k]).max() / max(
      1.0, np.abs(k_flat[k]).max()) for k in k_flat)
  moved = max(np.abs(old[k] - k_flat[k]).max() / max(
      1.0, np.abs(k_flat[k]).max()) for k in k_flat)
  return rel, worst, moved


def test_training_forward_and_moving_statistics_match_keras_mobilenetv2():
  rel, worst, moved = _training_parity(
      "mobilenetv2", dict(input_shape=(32, 32, 3), alpha=0.35))
  assert moved > 1e-3  # Keras' statistics did move, so the check means it
  assert rel < 1e-4, rel
  assert worst < 1e-5, worst


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_training_mode_and_gradients_match_keras(name, tmp_path,
                                                 monkeypatch):
  """One model per family in training mode, translated once (the
  translation is most of the cost):

  1. the training-mode logits and the updated moving statistics against
     Keras' ``model(x, training=True)``, with every BatchNorm seeing at
     least ``MIN_BN_VALUES`` values per channel;
  2. every trainable tensor's gradient, jitted: Flax float32 against float64
     Keras within 2x the worse of Keras' own float32 errors on its
     TensorFlow and JAX backends, or 1e-4 of the tensor's scale; the loss to
     1e-5.

  The bound from TensorFlow's error alone is tighter (the worse of two is at
  least either); when Flax is within it, Keras-JAX (a subprocess that
  builds the model on the JAX backend, minutes for the big families) cannot
  change the verdict and is skipped.
  """
  converted = _convert(name, **FAMILY_CASES[name])
  rel, worst, moved = _training_parity(name, FAMILY_CASES[name],
                                       MIN_BN_VALUES, converted)
  print(f"{name}: logits rel {rel:.1e}, moving statistics rel {worst:.1e}, "
        f"moved {moved}")
  # Keras' statistics moved 10x the tolerance at least (NASNet's momentum
  # 0.9997 moves them least), so a missing or wrong update is caught.
  assert moved is None or moved > 1e-4, moved
  assert rel < 1e-4, rel
  assert worst < 1e-5, worst

  # Gradients. Keras' moving statistics moved above; in training mode they
  # are not read, so the float64 copy of the model may take them as they are.
  conv, spec, kw, x, labels = converted
  module, variables, _, k32 = conv
  k64 = keras_float64(spec, k32, **kw)
  shape = kw["input_shape"]
  l64, g64 = keras_loss_and_grads(module, shape, k64, x, labels)
  del k64  # the float64 model and its tape: gigabytes for the big families
  gc.collect()
  l32, g32 = keras_loss_and_grads(module, shape, k32, x, labels)
  gc.collect()
  lf, gf = flax_loss_and_grads(module, variables, x, labels)
  assert abs(lf - l64) <= 1e-5 * abs(l64), (lf, l64, l32)
  report, against = gradient_report(gf, [g32], g64), "Keras-TF"
  if report[0][0] > 1.0:
    _, gj = keras_jax_loss_and_grads(module, shape, k32, name, kw, x, labels,
                                     tmp_path)
    report, against = gradient_report(gf, [g32, gj], g64), "Keras-TF/JAX"
  print(f"{name}: loss rel {abs(lf - l64) / abs(l64):.1e}; worst tensors "
        f"against {against} (ratio to bound, name, Flax err, Keras err, "
        "scale):", report[:3])
  if report[0][0] > 1.0:
    flips = relu_sign_flips(module, variables, x, labels, monkeypatch)
    pytest.fail(f"{name}: {report[:5]}; ReLU sign flips float32 vs float64 "
                f"(call, count): {flips}")


# ---------------------------------------------------------------------------
# Dropout, drop-connect and stochastic depth: Keras' laws, statistically.


def _stochastic_calls(module, shape, batch, seed=0):
  """``[(name, rate, kind, input, output)]`` of every Dropout (and
  StochasticDepth) the module calls in training mode (one jitted run)."""
  meta = []

  def run(variables, x, key):
    seen = []

    def spy(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      m = context.module
      if context.method_name != "__call__":
        return out
      if isinstance(m, nn.Dropout):
        seen.append((args[0], out))
        meta.append((m.name, m.rate, tuple(m.broadcast_dims)))
      elif type(m).__name__ == "StochasticDepth":
        seen.append((args[0], out))
        meta.append((m.name, m.rate, "per_sample"))
      return out

    with nn.intercept_methods(spy):
      module.apply(variables, x, train=True, mutable=["batch_stats"],
                   rngs={"dropout": key})
    return seen

  x = jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *shape)),
                  jnp.float32)
  variables = jax.jit(module.init)(jax.random.key(0), x[:1])
  arrays = jax.jit(run)(variables, x, jax.random.key(seed + 1))
  return [(*m, a, b) for m, (a, b) in zip(meta, arrays)]


def _check_law(name, rate, kind, x, y):
  """Kept values are ``x / (1 - rate)``, dropped ones 0; per-sample masks
  are constant over a sample; the drop fraction is within 5 sigma."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  keep = 1.0 - rate
  kept = np.abs(y) > 0
  nz = np.abs(x) > 1e-6
  np.testing.assert_allclose(y[kept], x[kept] / keep, rtol=1e-5,
                             err_msg=name)
  if kind == "per_sample" or kind == (1, 2, 3):
    per = kept.reshape(len(x), -1)
    nzs = nz.reshape(len(x), -1)
    for row, m in zip(per, nzs):
      assert len(set(row[m])) <= 1, f"{name}: mask varies within a sample"
    dropped = np.array([not row[m].any() for row, m in zip(per, nzs)])
  else:
    dropped = ~kept[nz]
  n = dropped.size
  sigma = np.sqrt(rate * keep / n)
  assert abs(dropped.mean() - rate) <= 5 * sigma + 1e-9, (
      name, dropped.mean(), rate, n)


STOCHASTIC_CASES = [
    # (model, options, expected Keras layer kinds)
    pytest.param("convnexttiny", dict(drop_path_rate=0.5, include_top=False),
                 {"stochastic_depth": "per_sample"}, marks=pytest.mark.slow),
    pytest.param("mobilenetv3small", dict(dropout_rate=0.5),
                 {"dropout": ()}, marks=pytest.mark.slow),
    # Keras: Dropout(noise_shape=(None, 1, 1, 1)) named "<block>drop" for
    # drop-connect, a plain Dropout "top_dropout" before predictions.
    pytest.param("efficientnetb0", dict(dropout_rate=0.5,
                                        drop_connect_rate=0.5),
                 {"drop": (1, 2, 3), "top_dropout": ()},
                 marks=pytest.mark.slow),
    pytest.param("efficientnetv2b0", dict(dropout_rate=0.5,
                                          drop_connect_rate=0.5),
                 {"drop": (1, 2, 3), "top_dropout": ()},
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,options,kinds", STOCHASTIC_CASES)
def test_stochastic_layers_follow_keras_laws(name, options, kinds):
  module = models.create(name, input_shape=(32, 32, 3), **options)
  calls = _stochastic_calls(module, (32, 32, 3), batch=64)
  assert calls, "no stochastic layer ran in training mode"
  found = set()
  for layer, rate, kind, x, y in calls:
    key = next(k for k in sorted(kinds, key=len, reverse=True)
               if layer.endswith(k))
    assert key in kinds, layer
    assert kind == kinds[key], (layer, kind)
    _check_law(layer, rate, kind, x, y)
    found.add(key)
  assert found == set(kinds)


def test_stochastic_law_check_catches_a_per_element_mask():
  """A drop-connect drawn per element (no noise shape) fails the check."""
  x = jnp.ones((64, 4, 4, 8))
  y = nn.Dropout(0.5, deterministic=False).apply(
      {}, x, rngs={"dropout": jax.random.key(0)})
  with pytest.raises(AssertionError):
    _check_law("drop", 0.5, (1, 2, 3), x, y)
  with pytest.raises(AssertionError):  # unscaled kept values
    _check_law("drop", 0.5, (), x, jnp.where(y > 0, x, 0))


def _flax_stochastic_layers(module, shape):
  """``[(rate, Keras noise_shape, input shape)]`` of the module's
  stochastic layers in call order (traced only)."""
  seen = []

  def spy(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__":
      ndim, where = args[0].ndim, tuple(args[0].shape[1:])
      if isinstance(m, nn.Dropout):
        seen.append((m.rate, (None,) + tuple(
            1 if d in m.broadcast_dims else None for d in range(1, ndim))
                     if m.broadcast_dims else None, where))
      elif type(m).__name__ == "StochasticDepth":
        seen.append((m.rate, (None,) + (1,) * (ndim - 1), where))
    return next_fun(*args, **kwargs)

  x = jnp.zeros((2, *shape))
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  with nn.intercept_methods(spy):
    jax.eval_shape(lambda v, x: module.apply(
        v, x, train=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(0)}), variables, x)
  return seen


def _keras_stochastic_layers(keras_model):
  out = []
  for layer in keras_io.iter_layers(keras_model):
    kind = type(layer).__name__
    if kind in ("Dropout", "StochasticDepth"):
      where = tuple(layer.input.shape[1:])
    if kind == "Dropout":
      noise = layer.noise_shape
      out.append((layer.rate, None if noise is None else tuple(noise),
                  where))
    elif kind == "StochasticDepth":  # ConvNeXt's: one draw per sample
      out.append((layer.drop_path_rate, (None, 1, 1, 1), where))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [
    ("efficientnetb0", dict(dropout_rate=0.3, drop_connect_rate=0.4)),
    ("efficientnetb0", dict(dropout_rate=0.0, drop_connect_rate=0.0)),
    ("efficientnetv2b0", dict(dropout_rate=0.3, drop_connect_rate=0.4)),
    ("efficientnetv2b0", dict(dropout_rate=0.0, drop_connect_rate=0.0)),
    ("mobilenet", dict(dropout=0.3, alpha=0.25)),
    ("mobilenetv3small", dict(dropout_rate=0.3)),
    ("convnexttiny", dict(drop_path_rate=0.3)),
])
def test_stochastic_options_reach_keras_by_keras_names(name, options):
  """The same option names build the same stochastic layers in Flax and in
  Keras (``keras_io.build``, as ``translate.convert`` does): rates, noise
  shapes and the shapes they apply to, layer by layer; a rate of 0 builds
  none where Keras builds none."""
  shape = (32, 32, 3)
  module = models.create(name, input_shape=shape, **options)
  keras_model = keras_build.build(models.get_spec(name), None,
                               input_shape=shape, **options)
  flax_layers = _flax_stochastic_layers(module, shape)
  keras_layers = _keras_stochastic_layers(keras_model)
  assert len(flax_layers) == len(keras_layers)
  np.testing.assert_allclose([l[0] for l in flax_layers],
                             [l[0] for l in keras_layers], rtol=1e-6)
  assert [l[1:] for l in flax_layers] == [l[1:] for l in keras_layers]
  if not any(options.values()):
    assert not keras_layers
