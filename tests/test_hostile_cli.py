"""Hostile weights files through the CLI: exit 1 with one ``error:`` line,
no traceback, an existing output left byte-identical, and nothing of a
secret file the weights file points at anywhere in the output directory.

The files are MobileNetV2 (alpha 0.35, 96x96: the cheapest registered model)
saved by Keras 3, with one dataset rewritten; the unit tier
(tests/unit/test_hostile_files.py) covers every guard on a tiny model. The
four CLI runs go in parallel: each costs a process start-up, not a model.
"""

import io
import os
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

import translate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ("--model", "mobilenetv2", "--alpha", "0.35", "--input_shape",
         "96,96,3")


def _vars_path(f, layer):
  """``layers/<key>/vars`` of the layer named ``layer`` in a .weights.h5."""
  for key in f["layers"]:
    if f[f"layers/{key}/vars"].attrs.get("name") == layer:
      return f"layers/{key}/vars"
  raise KeyError(layer)


def _rewrite(h5, layer, index, make):
  """Replaces variable ``index`` of ``layer`` in HDF5 file ``h5`` (a path
  or BytesIO): ``make(group, leaf, shape)`` creates the new dataset."""
  with h5py.File(h5, "a") as f:
    group = f[_vars_path(f, layer)]
    shape = group[index].shape
    del group[index]
    make(group, index, shape)
    return f"/{group.name.strip('/')}/{index}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
  """(name -> (weights file, extra flags, needles)), the secret's bytes."""
  inputs = tmp_path_factory.mktemp("inputs")
  secret_file = tmp_path_factory.mktemp("secret") / "secret.bin"
  model = translate.build_keras("mobilenetv2", "random", seed=1, alpha=0.35,
                                input_shape=(96, 96, 3))
  kernel = model.get_layer("Conv1").kernel
  # Finite values of the kernel's size: without the guard, they would load
  # as Conv1's kernel and be written to the output.
  secret = (np.arange(np.prod(kernel.shape), dtype=np.float32)
            + 4242.5).tobytes()
  secret_file.write_bytes(secret)
  weights = str(inputs / "m.weights.h5")
  model.save_weights(weights)
  keras_file = str(inputs / "m.keras")
  model.save(keras_file)

  def external(group, leaf, shape):
    group.create_dataset(leaf, shape, "f4",
                         external=[(str(secret_file), 0, len(secret))])

  def values(v):
    return lambda group, leaf, shape: group.create_dataset(
        leaf, data=np.full(shape, v, np.float32))

  cases = {}
  for name, layer, index, make in [
      ("external", "Conv1", "0", external),
      ("nan", "Conv1", "0", values(np.nan)),
      ("inf", "bn_Conv1", "3", values(np.inf))]:  # the moving variance
    path = str(inputs / f"{name}.weights.h5")
    with open(weights, "rb") as src, open(path, "wb") as dst:
      dst.write(src.read())
    where = _rewrite(path, layer, index, make)
    cases[name] = path, where
  cases = {
      "external storage": (cases["external"][0], (),
                           [cases["external"][1], "external storage",
                            str(secret_file)]),
      "NaN kernel, --nocheck": (cases["nan"][0], ("--nocheck",),
                                ["holds NaN in Conv1/vars/0"]),
      "+Inf moving variance": (cases["inf"][0], (),
                               ["holds Inf in bn_Conv1/vars/3"]),
  }
  # A .keras whose zipped model.weights.h5 (read from memory) has external
  # storage with an absolute path.
  with zipfile.ZipFile(keras_file) as z:
    members = {i.filename: z.read(i) for i in z.infolist()}
  h5 = io.BytesIO(members["model.weights.h5"])
  where = _rewrite(h5, "Conv1", "0", external)
  members["model.weights.h5"] = h5.getvalue()
  path = str(inputs / "external.keras")
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  cases[".keras with external storage"] = (
      path, (), [f"{path} (model.weights.h5)", where, "external storage"])
  return cases, secret


def test_hostile_files_fail_cleanly_and_leak_nothing(tmp_path, hostile):
  cases, secret = hostile
  env = dict(os.environ, PYTHONPATH=ROOT)
  runs = {}
  for i, (name, (path, flags, _)) in enumerate(cases.items()):
    out = tmp_path / f"out{i}"
    out.mkdir()
    (out / "x.msgpack").write_bytes(b"earlier translation")
    (out / "x.json").write_text("{}")
    runs[name] = out, subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), *FLAGS, "--weights",
         path, "--output", "x.msgpack", "--overwrite", *flags],
        cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
  for name, (out, proc) in runs.items():
    _, stderr = proc.communicate(timeout=600)
    needles = cases[name][2]
    assert proc.returncode == 1, (name, stderr)
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, (name, stderr)
    assert "Traceback" not in stderr, (name, stderr)
    for needle in needles:
      assert needle in lines[0], (name, needle, lines[0])
    assert (out / "x.msgpack").read_bytes() == b"earlier translation", name
    assert (out / "x.json").read_text() == "{}", name
    files = sorted(os.listdir(out))
    assert files == ["x.json", "x.msgpack"], (name, files)
  for d, _, fs in os.walk(tmp_path):
    for f in fs:
      data = open(os.path.join(d, f), "rb").read()
      assert secret[:64] not in data, os.path.join(d, f)
