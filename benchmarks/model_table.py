"""Renders the README's model table from the parity tests' log.

  PARITY_LOG=/tmp/parity.jsonl python -m pytest -q -m "slow or not slow" \\
      tests/test_parity.py
  python benchmarks/model_table.py /tmp/parity.jsonl [more.jsonl ...]

Every registered model must have a row in the logs; ``--allow-missing``
renders the ones without as "not in this log" instead of refusing.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("logs", nargs="+")
  parser.add_argument("--allow-missing", action="store_true")
  args = parser.parse_args()
  rows = {}
  for path in args.logs:
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if "keras_name" in r:  # test_parity's rows (family tests log others)
          rows[r["model"]] = r  # the last run of a model wins
  missing = [n for n in models.list_models() if n not in rows]
  if missing and not args.allow_missing:
    sys.exit(f"no parity figure for {missing}; run every tier")
  print("| model | Keras name | input | parameters | parity: max relative "
        "logit difference | max abs | max abs logit | tier |")
  print("|---|---|---|---|---|---|---|---|")
  for name in models.list_models():
    spec = models.get_spec(name)
    tier = "slow" if spec.slow else "README"
    h, w, c = spec.input_shape
    r = rows.get(name)
    if r is None:
      print(f"| {name} | {spec.keras_name} | {h}x{w}x{c} | {spec.params:,} | "
            f"not in this log | | | {tier} |")
      continue
    print(f"| {name} | {r['keras_name']} | {h}x{w}x{c} | "
          f"{r['params']:,} | {r['max_rel']:.1e}"
          f"{'' if r['passed'] else ' (FAIL)'} | {r['max_abs']:.1e} | "
          f"{r['max_logit']:.3g} | {tier} |")


if __name__ == "__main__":
  main()
