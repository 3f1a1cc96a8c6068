"""The fast unit tier: tiny synthetic models, seconds in all.

Every test under ``tests/unit`` is marked ``unit``, so ``python -m pytest -q
tests/unit`` (or ``-m unit``) runs the translate/ logic alone, before the
model tiers (``.ci/run`` runs it first).
"""

import pytest


def pytest_collection_modifyitems(items):
  for item in items:
    if "tests/unit/" in str(item.fspath).replace("\\", "/"):
      item.add_marker(pytest.mark.unit)
