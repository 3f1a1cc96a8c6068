"""``main.py`` through a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         *args], capture_output=True, text=True, cwd=cwd,
                        env=env, timeout=600)


def error_lines(proc):
  return [l for l in proc.stderr.splitlines() if l.startswith("error:")]


def test_random_weights_write_msgpack_and_sidecar(tmp_path):
  out = tmp_path / "r.msgpack"
  proc = run_cli("--model", "ResNet50", "--weights", "random",
                 "--output", str(out), "--include_top=false",
                 "--pooling", "avg")
  assert proc.returncode == 0, proc.stderr
  meta = json.loads((tmp_path / "r.json").read_text())
  assert meta["model"] == "resnet50" and meta["parity"]["passed"]
  assert meta["parity"]["max_rel"] <= 1e-4
  assert meta["create_kwargs"]["include_top"] is False
  for phase in ("keras build", "translate", "parity", "write"):
    assert phase in proc.stdout
  assert out.stat().st_size > 90e6


def test_default_output_and_local_weights_file(tmp_path):
  env_code = ("import translate; m = translate.build_keras('mobilenetv2', "
              "'random', seed=4); m.save_weights('w.weights.h5')")
  subprocess.run([sys.executable, "-c", env_code], cwd=tmp_path, check=True,
                 env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
  proc = run_cli("--model", "mobilenetv2", "--weights", "w.weights.h5",
                 cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  meta = json.loads((tmp_path / "translated" / "mobilenetv2.json").read_text())
  assert meta["weights"] == "w.weights.h5"
  assert len(meta["weights_sha256"]) == 64
  assert (tmp_path / "translated" / "mobilenetv2.msgpack").exists()


def test_unknown_model_suggests_names(tmp_path):
  proc = run_cli("--model", "resnet5O", cwd=tmp_path)
  assert proc.returncode != 0
  [line] = error_lines(proc)
  assert "unknown model" in line and "resnet50" in line
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "translated").exists()


def test_existing_output_is_refused_without_overwrite(tmp_path):
  out = tmp_path / "x.msgpack"
  out.write_bytes(b"keep me")
  proc = run_cli("--model", "resnet50", "--weights", "random",
                 "--output", str(out))
  assert proc.returncode != 0
  [line] = error_lines(proc)
  assert "--overwrite" in line
  assert out.read_bytes() == b"keep me"


def test_list_shows_every_registered_model():
  import models  # pylint: disable=g-import-not-at-top
  proc = run_cli("--list")
  assert proc.returncode == 0, proc.stderr
  for name in models.list_models():
    assert f"\n{name} " in "\n" + proc.stdout
  assert "25,583,592" in proc.stdout  # resnet50's parameters
