"""The structure of the packages: no import cycles (function-level imports
included), no family importing another, one home for each shared helper."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
PACKAGES = ("models", "translate")


def _modules() -> dict[str, str]:
  """Dotted module name -> path, for every module of the two packages
  (subpackages included)."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in sorted(os.walk(os.path.join(ROOT, package))):
      dotted = os.path.relpath(folder, ROOT).replace(os.sep, ".")
      for name in sorted(files):
        if name.endswith(".py"):
          module = dotted if name == "__init__.py" else f"{dotted}.{name[:-3]}"
          out[module] = os.path.join(folder, name)
  return out


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
  """Module -> the project modules its import statements name, anywhere in
  the file (inside functions too). ``from pkg import name`` names the
  submodule ``pkg.name`` where there is one, else the package."""
  graph = {}
  for module, text in sources.items():
    edges = set()
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not (
          node.level):
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}"
                 in sources else node.module for a in node.names]
      else:
        continue
      edges |= {n for n in names if n in sources and n != module}
    graph[module] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as ``[a, b, ..., a]``, or None."""
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def _sources() -> dict[str, str]:
  return {m: open(p).read() for m, p in _modules().items()}


def test_no_import_cycles():
  assert find_cycle(import_graph(_sources())) is None


def test_cycle_finder_sees_function_level_imports():
  """The checker itself: a cycle closed by an import inside a function (the
  kind that hid keras_io <-> weights_files) is found."""
  sources = {
      "translate": "",
      "translate.a": "from translate import b\n",
      "translate.b": "def f():\n  from translate.a import g\n",
      "translate.c": "import translate\n",
  }
  assert find_cycle(import_graph(sources)) == [
      "translate.a", "translate.b", "translate.a"]
  del sources["translate.b"]
  assert find_cycle(import_graph(sources)) is None


def test_models_never_import_translate():
  for module, edges in import_graph(_sources()).items():
    if module.startswith("models"):
      assert not {e for e in edges if e.startswith("translate")}, module


def _families(sources: dict[str, str]) -> set[str]:
  """The modules that register models (``register(ModelSpec(...))``)."""
  return {m for m, text in sources.items()
          if m.startswith("models.") and "register(ModelSpec(" in text}


def test_no_family_imports_another():
  sources = _sources()
  families = _families(sources)
  assert len(families) == 15
  graph = import_graph(sources)
  for family in sorted(families):
    assert not graph[family] & families, (family, graph[family] & families)


@pytest.mark.parametrize("helper", [
    "correct_pad", "make_divisible", "snake_case", "_snake_case",
    "activation", "_activation", "ensure_backend", "is_file", "build_keras",
    "randomize", "read_weights", "sha256_file"])
def test_one_definition_per_helper(helper):
  """Each shared helper is defined in one module of the two packages (a
  private wrapper that only delegates is allowed: it calls the home)."""
  homes = []
  for module, text in _sources().items():
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.FunctionDef) and node.name == helper:
        body = [n for n in node.body if not isinstance(n, ast.Expr)
                or not isinstance(n.value, ast.Constant)]
        delegates = (len(body) == 1 and isinstance(body[0], ast.Return)
                     and isinstance(body[0].value, ast.Call))
        if not delegates:
          homes.append(module)
  assert len(homes) <= 1, (helper, homes)


def test_no_reexport_blocks():
  """No module re-imports names at its bottom for callers of another
  module (the ``noqa: E402`` re-exports that held a cycle together)."""
  for module, text in _sources().items():
    assert "E402" not in text, module
