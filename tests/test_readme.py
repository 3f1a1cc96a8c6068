"""The README's Python example runs as written (offline: random weights),
and what it builds computes what Keras computes: the whole model's logits,
and the backbone inside the user's own model gives the translated features.
"""

import os
import re

import keras
import numpy as np

import models
import translate
from translate import parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _close(out, ref):
  """max |Δ| within the project's tolerance, relative to max(1, max |ref|)."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  max_abs = float(np.max(np.abs(out - ref)))
  assert max_abs <= translate.TOLERANCE * max(1.0, float(np.max(np.abs(
      ref)))), max_abs
  return max_abs


def test_readme_python_example_runs(tmp_path, monkeypatch):
  text = open(os.path.join(ROOT, "README.md")).read()
  [code] = [c for c in re.findall(r"```python\n(.*?)```", text, re.S)
            if 'weights="imagenet"' in c and "translate.convert" in c]
  code = code.replace('weights="imagenet"', 'weights="random"')  # offline
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["logits"].shape == (1, 1000)
  assert scope["out"].shape == (1, 10)
  assert (tmp_path / "resnet50.msgpack").exists()

  keras_model, saved = scope["keras_model"], scope["saved"]
  preprocess_input = models.get_spec("resnet50").keras_preprocess_input()

  def keras_logits(images):
    with parity._keras_logits(keras_model) as made_linear:  # pylint: disable=protected-access
      assert made_linear
      return np.asarray(keras_model(preprocess_input(np.array(images)),
                                    training=False))

  # The whole model, loaded back from the file: the README's logits are
  # Keras' logits (on its zero images), and so they are on random images.
  _close(scope["logits"], keras_logits(scope["images"]))
  images = translate.random_images((224, 224, 3), 2, seed=7)
  logits = models.create("resnet50", classifier_activation=None).apply(
      saved, models.preprocess("resnet50", images))
  ref = keras_logits(images)
  _close(logits, ref)
  assert np.ptp(ref) > 1  # not a degenerate comparison

  # The backbone inside the user's model gives Keras' pooled features
  # (ResNet50's "avg_pool" layer), with the translated weights and
  # BatchNorm statistics, and the user's new head sees them.
  clf, variables = scope["clf"], scope["variables"]
  out, state = clf.apply(
      variables, images,
      capture_intermediates=lambda mdl, _: mdl.name == "backbone")
  (features,) = state["intermediates"]["backbone"]["__call__"]
  keras_features = np.asarray(keras.Model(
      keras_model.input, keras_model.get_layer("avg_pool").output)(
          preprocess_input(np.array(images)), training=False))
  assert keras_features.shape == (2, 2048)
  assert np.ptp(keras_features) > 0.1
  _close(features, keras_features)
  # The same features as the standalone no-top model on the translated
  # variables without the top.
  no_top = {"params": {k: v for k, v in saved["params"].items()
                       if k != "predictions"},
            "batch_stats": saved["batch_stats"]}
  _close(features, models.create("resnet50", include_top=False,
                                 pooling="avg").apply(
                                     no_top,
                                     models.preprocess("resnet50", images)))
  head = scope["fresh"]["params"]["head"]
  np.testing.assert_allclose(
      out, np.asarray(features) @ head["kernel"] + head["bias"], rtol=1e-5,
      atol=1e-5)
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                head["kernel"])


def test_your_own_keras_model_section(tmp_path, monkeypatch):
  """The README's "Your own Keras model" section, in order: the Python
  block saves a transfer-learning .keras file, the command translates it
  without --model and writes the source, the second block checks the
  emitted module on the written variables against Keras."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text[text.index("## Your own Keras model"):]
  section = section[:section.index("\n## ", 5)]
  first, second = re.findall(r"```python\n(.*?)```", section, re.S)
  [command] = re.findall(r"```bash\n(.*?)\n```", section, re.S)
  assert command.startswith("python main.py --weights tl.keras")
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  exec(compile(first, "README.md", "exec"), {})  # pylint: disable=exec-used
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         *command.split()[2:]], capture_output=True,
                        text=True, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "PASS" in proc.stdout
  source = (tmp_path / "tl_flax.py").read_text()
  assert "models.create('efficientnetb0'" in source
  assert len(source.splitlines()) < 60
  scope = {}
  exec(compile(second, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["keras_out"].shape == (2, 5)
