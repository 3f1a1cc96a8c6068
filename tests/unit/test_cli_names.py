"""The CLI's default output names, usage without arguments, ``--list``'s
width and the package metadata (no model is built here)."""

import itertools
import os
import re
import subprocess
import sys
import tomllib

import main
import models
import translate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
NATIVE = (224, 224, 3)

# Options that change the variables (or the pooled output) and so the name.
VARIANTS = [
    dict(include_top=True),
    dict(include_top=False),
    dict(include_top=False, pooling="avg"),
    dict(include_top=False, pooling="max"),
    dict(include_top=True, classes=10),
    dict(include_top=True, alpha=0.35),
    dict(include_top=True, alpha=0.5),
    dict(include_top=True, depth_multiplier=2),
    dict(include_top=True, minimalistic=True),
    dict(include_top=True, include_preprocessing=False),
    dict(include_top=True, input_shape=(96, 96, 3)),
    dict(include_top=True, input_shape=(96, 128, 3)),
    dict(include_top=False, pooling="avg", alpha=0.35,
         input_shape=(96, 96, 3)),
]


def _all_paths(name, kwargs, fmt):
  path = main.default_output(name, kwargs, NATIVE, fmt)
  return {path, translate.sidecar_path(path)}


def test_default_names_never_collide_across_options_and_formats():
  seen = {}
  for kwargs, fmt in itertools.product(VARIANTS, ("msgpack", "orbax")):
    for p in _all_paths("mobilenetv2", kwargs, fmt):
      assert p not in seen, (p, kwargs, fmt, seen.get(p))
      seen[p] = (kwargs, fmt)


def test_default_names_spell_the_options():
  out = main.default_output(
      "mobilenetv2", dict(include_top=False, pooling="avg", alpha=0.35,
                          input_shape=(96, 96, 3)), NATIVE)
  assert out == os.path.join("translated",
                             "mobilenetv2_notop_avg_alpha0.35_96x96.msgpack")
  orbax = main.default_output("resnet50", dict(include_top=True), NATIVE,
                              "orbax")
  assert orbax == os.path.join("translated", "resnet50.orbax")
  assert translate.sidecar_path(orbax) == os.path.join(
      "translated", "resnet50.orbax.json")
  # The default options and the native size add nothing.
  assert main.default_output("resnet50", dict(
      include_top=True, classes=1000, input_shape=NATIVE), NATIVE) == (
          os.path.join("translated", "resnet50.msgpack"))
  # Pooling only names a model without its top (Keras ignores it there).
  assert main.default_output("resnet50", dict(include_top=True,
                                              pooling="avg"), NATIVE) == (
      os.path.join("translated", "resnet50.msgpack"))


def _run(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         *args], capture_output=True, text=True, timeout=300,
                        cwd=ROOT)


def test_no_arguments_prints_usage():
  proc = _run()
  assert proc.returncode == 0, proc.stderr
  assert "error" not in proc.stderr.lower()
  assert "python main.py --model resnet50" in proc.stdout
  assert "--help" in proc.stdout


def test_list_fits_100_columns(capsys):
  main.list_models()
  out = capsys.readouterr().out
  widths = [len(line) for line in out.splitlines()]
  assert max(widths) <= 100, max(widths)
  for name in models.list_models():
    assert re.search(rf"^{name} ", out, re.M), name
  # Every family option is still listed, with its Keras default.
  assert "mobilenet_v3: --alpha=1.0, --minimalistic=False" in out
  assert "drop_connect_rate=0.2" in out


def _requirement_names(lines):
  out = {}
  for line in lines:
    line = line.split("#")[0].strip()
    if line:
      name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
      out[name] = line[len(name):].replace(" ", "")
  return out


def test_pyproject_dependencies_match_requirements():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    required = _requirement_names(f)
  declared = _requirement_names(project["dependencies"] + [
      d for extra in project["optional-dependencies"].values() for d in extra])
  for name, spec in declared.items():
    assert required.get(name) == spec, (name, spec, required.get(name))
  assert set(required) == set(declared), set(required) ^ set(declared)
  assert project["scripts"]["keras2flax"] == "main:cli"


def test_pyproject_installs_every_subpackage():
  """pip install . ships the subpackages too (translate.layer_table,
  models.keras_layers): the find rule includes every package directory."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"][
        "include"]
  for package in ("models", "translate"):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      if "__init__.py" in files:
        dotted = os.path.relpath(folder, ROOT).replace(os.sep, ".")
        assert any(dotted == p or (p.endswith(".*") and dotted.startswith(
            p[:-1])) for p in include), dotted
