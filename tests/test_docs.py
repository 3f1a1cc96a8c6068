"""The documentation's code runs as written, and its links lead somewhere.

Every ```python block of README.md and docs/*.md runs, offline
(``weights="imagenet"`` becomes ``weights="random"``, as in
tests/test_readme.py). The blocks of one page run in order, in one namespace,
in a temporary directory, so a page reads as one session. A block that cannot
run in this process is marked on the line before its fence with
``<!-- not run: reason -->``. The README's first block is the one
tests/test_readme.py runs and checks against Keras, so it is not run twice.

Every relative link of those pages points to an existing file, and to an
existing heading when it names one; every docs page is linked from the
README, and the README stays a guide of at most 300 lines.
"""

import glob
import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 300
NOT_RUN = re.compile(r"<!-- not run: (\S.*?) -->")


def _rel(path: str) -> str:
  return os.path.relpath(path, ROOT)


def code_blocks(path: str) -> list[dict]:
  """Every fenced block: its language, first code line (1-based), code, and
  the ``not run`` reason on the line before its fence (or None)."""
  lines = open(path, encoding="utf-8").read().split("\n")
  blocks, i = [], 0
  while i < len(lines):
    fence = re.match(r"^(`{3,})(\w*)\s*$", lines[i])
    if not fence:
      i += 1
      continue
    start = i + 1
    end = start
    while end < len(lines) and lines[end].strip() != fence.group(1):
      end += 1
    assert end < len(lines), f"{_rel(path)}:{i + 1}: unclosed code fence"
    before = NOT_RUN.search(lines[i - 1]) if i else None
    blocks.append({"lang": fence.group(2), "line": start + 1,
                   "code": "\n".join(lines[start:end]),
                   "not_run": before.group(1) if before else None})
    i = end + 1
  return blocks


def python_blocks(path: str) -> list[dict]:
  """The ```python blocks this test runs or deliberately skips."""
  blocks = [b for b in code_blocks(path) if b["lang"] == "python"]
  if path == README:  # the Python API example: tests/test_readme.py runs it
    blocks = [b for b in blocks if not _api_example(b)]
  return blocks


def _api_example(block: dict) -> bool:
  return 'weights="imagenet"' in block["code"] and (
      "translate.convert" in block["code"])


RUNNABLE = [p for p in PAGES if any(b["not_run"] is None
                                    for b in python_blocks(p))]


# Pages whose blocks train, export or time a model (12-19 s each on 2
# cores) run in the slow tier.
SLOW_PAGES = ("docs/training.md", "docs/tflite.md", "docs/back-to-keras.md",
              "docs/performance.md", "docs/nnx.md")


@pytest.mark.parametrize("page", [
    pytest.param(_rel(p), marks=[pytest.mark.slow] if _rel(p) in SLOW_PAGES
                 else []) for p in RUNNABLE])
def test_python_blocks_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = os.path.join(ROOT, page)
  scope = {"__name__": "__docs__"}
  for block in python_blocks(path):
    if block["not_run"] is not None:
      continue
    code = block["code"].replace('weights="imagenet"', 'weights="random"')
    # Padded so that a traceback names the page's own line numbers.
    source = "\n" * (block["line"] - 1) + code
    exec(compile(source, path, "exec"), scope)  # pylint: disable=exec-used


def test_not_run_markers_are_few_and_sit_on_python_blocks():
  skipped = []
  for path in PAGES:
    text = open(path, encoding="utf-8").read()
    marked = [b for b in code_blocks(path) if b["not_run"] is not None]
    assert len(marked) == len(NOT_RUN.findall(_without_code(text))), (
        f"{_rel(path)}: a 'not run' marker that is not on the line before a "
        "code fence")
    assert all(b["lang"] == "python" for b in marked), _rel(path)
    skipped += [(_rel(path), b["line"], b["not_run"]) for b in marked]
  assert len(skipped) <= 4, skipped  # each needs a reason a reader accepts


def test_readme_python_example_is_left_to_test_readme():
  blocks = [b for b in code_blocks(README)
            if b["lang"] == "python" and _api_example(b)]
  assert len(blocks) == 1 and blocks[0]["not_run"] is None


def github_anchor(heading: str) -> str:
  """The anchor GitHub gives a heading: lower case, punctuation dropped,
  spaces to hyphens."""
  text = re.sub(r"`", "", heading.strip().lower())
  text = "".join(c for c in text if c in " -_" or unicodedata.category(
      c)[0] in "LN")
  return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
  text = _without_code(open(path, encoding="utf-8").read())
  seen: dict[str, int] = {}
  out = set()
  for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
    slug = github_anchor(heading)
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def _without_code(text: str) -> str:
  """The text without fenced blocks and inline code (links there are not
  links)."""
  text = re.sub(r"^(`{3,})\w*\s*\n.*?^\1\s*$", "", text, flags=re.S | re.M)
  return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text, flags=re.S)


def links(path: str) -> list[str]:
  text = _without_code(open(path, encoding="utf-8").read())
  return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", [_rel(p) for p in PAGES])
def test_relative_links_resolve(page):
  path = os.path.join(ROOT, page)
  broken = []
  for target in links(path):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
      continue
    file, _, anchor = target.partition("#")
    dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) \
        if file else path
    if not os.path.exists(dest):
      broken.append(f"{target}: no file {_rel(dest)}")
    elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
      broken.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
  assert not broken, f"{page}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
  linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0]))
            for t in links(README)}
  missing = [_rel(p) for p in PAGES[1:] if p not in linked]
  assert not missing, missing


def test_readme_is_a_short_guide():
  with open(README, encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert len(lines) <= README_MAX_LINES, len(lines)


def test_supported_layer_table_is_the_code():
  """docs/layers.md lists exactly the classes translate.layer_table
  registers (the table is generated; regenerate it with
  ``translate.layer_table.base.markdown_table()``)."""
  import translate.layer_table  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from translate.layer_table.base import markdown_table  # pylint: disable=g-import-not-at-top
  text = open(os.path.join(ROOT, "docs", "layers.md"), encoding="utf-8").read()
  table = text.split("markdown_table() -->\n")[1].split("\n<!-- end")[0]
  assert table == markdown_table()
  for cls in ("Dense", "Conv2D", "MultiHeadAttention", "LSTM",
              "BatchNormalization", "GetItem"):
    assert f"| `{cls}` |" in table


def test_layer_table_leaves_out_classes_a_user_registers(monkeypatch):
  """A class added by register_layer (the tests add some, and a user's
  process may) is not a built-in row: the docs check must not depend on
  which tests ran before it in the same worker."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from translate.layer_table import base  # pylint: disable=g-import-not-at-top
  before = base.markdown_table()
  monkeypatch.setattr(base, "TABLE", dict(base.TABLE))
  monkeypatch.setattr(base, "USER_CLASSES", set(base.USER_CLASSES))
  base.register_layer("DocsTableProbe", nn.Dense, {})
  assert "DocsTableProbe" in base.TABLE
  assert base.markdown_table() == before
