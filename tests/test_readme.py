"""The README's Python example runs as written (offline: random weights)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(tmp_path, monkeypatch):
  text = open(os.path.join(ROOT, "README.md")).read()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  assert 'weights="imagenet"' in code
  code = code.replace('weights="imagenet"', 'weights="random"')  # offline
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["logits"].shape == (1, 1000)
  assert scope["out"].shape == (1, 10)
  assert (tmp_path / "resnet50.msgpack").exists()
