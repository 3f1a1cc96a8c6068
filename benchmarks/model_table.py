"""Renders the README's model table from the parity tests' log.

  PARITY_LOG=/tmp/parity.jsonl python -m pytest -q -m "slow or not slow" \\
      tests/test_parity.py
  python benchmarks/model_table.py /tmp/parity.jsonl
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402  pylint: disable=wrong-import-position


def main(path: str) -> None:
  rows = {}
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if "keras_name" in r:  # test_parity's rows (family tests log others)
        rows[r["model"]] = r  # the last run of a model wins
  print("| model | Keras name | input | parameters | parity: max relative "
        "logit difference | max abs | max abs logit | tier |")
  print("|---|---|---|---|---|---|---|---|")
  missing = [n for n in models.list_models() if n not in rows]
  if missing:
    sys.exit(f"no parity figure for {missing}; run every tier")
  for r in (rows[n] for n in models.list_models()):
    tier = "slow" if models.get_spec(r["model"]).slow else "README"
    h, w, c = r["input_shape"]
    print(f"| {r['model']} | {r['keras_name']} | {h}x{w}x{c} | "
          f"{r['params']:,} | {r['max_rel']:.1e}"
          f"{'' if r['passed'] else ' (FAIL)'} | {r['max_abs']:.1e} | "
          f"{r['max_logit']:.3g} | {tier} |")


if __name__ == "__main__":
  main(sys.argv[1])
