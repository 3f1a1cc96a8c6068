"""Every shell command of README.md, docs/*.md and the examples' docstrings
runs as written (slow tier: about 40 CLI runs), each page's commands in
order in one fresh directory (later commands use earlier outputs).

Not run, by rule: ``pip`` and ``pytest`` (CI runs those), and commands that
need the network (ImageNet weights: a ``--model`` run without ``--weights``,
or ``--weights imagenet``).
"""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(
    glob.glob(os.path.join(ROOT, "docs", "*.md")))
# examples/finetune.py's and finetune_nnx.py's docstrings run hundreds of
# training steps: their commands are run shorter by tests/test_finetune.py,
# tests/test_finetune_nnx.py, README.md and docs/training.md.
EXAMPLES = sorted(p for p in glob.glob(os.path.join(ROOT, "examples", "*.py"))
                  if os.path.basename(p) not in ("finetune.py",
                                                 "finetune_nnx.py"))


def _commands_of_page(path: str) -> list[str]:
  text = open(path, encoding="utf-8").read()
  out = []
  for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
    for line in block.splitlines():
      line = line.split("  #")[0].strip()
      if line and not line.startswith("#"):
        out.append(line)
  return out


def _commands_of_example(path: str) -> list[str]:
  doc = open(path, encoding="utf-8").read().split('"""')[1]
  return [l.split("  #")[0].strip() for l in doc.splitlines()
          if re.match(r"^\s+(\w+=\S+ )*python ", l)]


# Commands whose inputs a page's Python block makes: run by the test that
# runs that block.
COVERED = {"python main.py --weights tl.keras --output tl.msgpack "
           "--emit_source tl_flax.py": "tests/test_readme.py"}


def runnable(command: str) -> bool:
  if command in COVERED:
    return False
  words = command.split()
  if "pip" in words or "pytest" in words or "--help" in words:
    return False
  if "--weights imagenet" in command:
    return False
  if "--model" in words and "--weights" not in words and (
      "--to_keras" not in words):
    return False  # ImageNet weights: Keras downloads them
  return "python" in words


CASES = {os.path.relpath(p, ROOT): [c for c in _commands_of_page(p)
                                    if runnable(c)] for p in PAGES}
CASES.update({os.path.relpath(p, ROOT): [c for c in _commands_of_example(p)
                                         if runnable(c)] for p in EXAMPLES})
CASES = {k: v for k, v in CASES.items() if v}


def _argv(command: str) -> tuple[dict[str, str], list[str]]:
  words = shlex.split(command, comments=True)
  env = {}
  while "=" in words[0] and not words[0].startswith("-"):
    k, v = words.pop(0).split("=", 1)
    env[k] = v
  assert words[0] == "python", command
  words[0] = sys.executable
  if words[1:2] == ["main.py"] or words[1].startswith("examples/"):
    words[1] = os.path.join(ROOT, words[1])
  return env, words


# A user's shell, not the test process's: tests/conftest.py sets
# KERAS_BACKEND=tensorflow for the tests, and an example that picks its own
# backend (keras_new_head.py: jax) must see the user's empty setting.
USER_ENV = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(CASES))
def test_documented_commands_run(page, tmp_path):
  for command in CASES[page]:
    env, argv = _argv(command)
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900,
                          env={**USER_ENV, **env})
    assert proc.returncode == 0, (command, proc.stderr[-3000:])


def test_commands_are_found():
  """The collection itself: the pages and examples hold commands, and the
  skipped ones are only those the rule names."""
  assert len(CASES) >= 5 and sum(map(len, CASES.values())) >= 25, CASES
  assert set(COVERED) <= set(_commands_of_page(os.path.join(ROOT,
                                                           "README.md")))
  assert not runnable("python main.py --model resnet50")
  assert runnable("python main.py --model resnet50 --weights random")
  # a docstring's trailing comment is not an argument
  assert _argv("python main.py --steps 6 # go on")[1][2:] == ["--steps", "6"]
