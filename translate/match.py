"""Matching Keras layer names to Flax module paths.

Exact names first, then normalized names (case, ``_``, ``:0``), then
rapidfuzz with a minimum score and a required margin over the runner-up. An
ambiguous or missing match raises ``MatchError`` listing the candidates; the
matcher never picks silently.
"""

from __future__ import annotations

import collections
import dataclasses
import re

from rapidfuzz import fuzz, process

MIN_SCORE = 90.0  # rapidfuzz ratio (0-100) a fuzzy match must reach
MIN_MARGIN = 5.0  # and its lead over the runner-up


class MatchError(ValueError):
  """Raised when the layer names cannot be paired unambiguously."""


@dataclasses.dataclass(frozen=True)
class Match:
  flax: str
  keras: str
  kind: str  # "exact", "normalized" or "fuzzy"
  score: float = 100.0


def normalize(name: str) -> str:
  """Lower-case, without ``_``, ``/``, ``-`` and a trailing ``:0``."""
  name = re.sub(r":\d+$", "", name)
  return re.sub(r"[_/\-\s]", "", name.lower())


def _unique_by(names, key):
  groups = collections.defaultdict(list)
  for n in names:
    groups[key(n)].append(n)
  return groups


def match(keras_names: list[str], flax_names: list[str], *,
          min_score: float = MIN_SCORE,
          min_margin: float = MIN_MARGIN) -> list[Match]:
  """Pairs every Flax module path with exactly one Keras layer name.

  Args:
    keras_names: names of the Keras layers that hold weights.
    flax_names: '/'-joined paths of the Flax modules that hold variables.
    min_score: least rapidfuzz ratio for a fuzzy pairing.
    min_margin: least lead of the best fuzzy candidate over the runner-up,
      on both sides (the Keras name's best Flax name must be this one too).

  Returns:
    One ``Match`` per Flax name, in ``flax_names`` order.

  Raises:
    MatchError: a name is left unpaired or a pairing is ambiguous; the
      message lists the names and their best candidates.
  """
  for side, names in (("Keras", keras_names), ("Flax", flax_names)):
    dup = [n for n, c in collections.Counter(names).items() if c > 1]
    if dup:
      raise MatchError(f"duplicate {side} layer names: {dup[:5]}")
  keras_left = set(keras_names)
  found: dict[str, Match] = {}

  for name in flax_names:
    if name in keras_left:
      found[name] = Match(name, name, "exact")
      keras_left.discard(name)

  flax_left = [n for n in flax_names if n not in found]
  k_groups = _unique_by(keras_left, normalize)
  f_groups = _unique_by(flax_left, normalize)
  problems = []
  for key, fl in f_groups.items():
    kl = k_groups.get(key, [])
    if not kl:
      continue
    if len(fl) > 1 or len(kl) > 1:
      problems.append(f"normalized name {key!r} is ambiguous: Flax {fl} vs "
                      f"Keras {kl}")
      continue
    found[fl[0]] = Match(fl[0], kl[0], "normalized")
    keras_left.discard(kl[0])
  if problems:
    raise MatchError("; ".join(problems))

  flax_left = [n for n in flax_names if n not in found]
  if flax_left and keras_left:
    k_norm = {normalize(k): k for k in keras_left}
    f_norm = {normalize(f): f for f in flax_left}
    proposals = {}
    for f in flax_left:
      best = process.extract(normalize(f), list(k_norm), scorer=fuzz.ratio,
                             limit=2)
      proposals[f] = best
    for f, best in proposals.items():
      if not best or best[0][1] < min_score:
        continue
      top, score = best[0][0], best[0][1]
      runner = best[1][1] if len(best) > 1 else 0.0
      back = process.extract(top, list(f_norm), scorer=fuzz.ratio, limit=2)
      back_runner = back[1][1] if len(back) > 1 else 0.0
      if (score - runner < min_margin or back[0][0] != normalize(f)
          or back[0][1] - back_runner < min_margin):
        cands = ", ".join(f"{k_norm[c]} ({s:.0f})" for c, s, _ in best)
        problems.append(f"Flax {f!r} is ambiguous among Keras {cands}")
        continue
      k = k_norm[top]
      found[f] = Match(f, k, "fuzzy", float(score))
      keras_left.discard(k)
    if problems:
      raise MatchError("; ".join(problems))

  flax_left = [n for n in flax_names if n not in found]
  if flax_left or keras_left:
    lines = []
    if flax_left:
      lines.append(f"{len(flax_left)} Flax module(s) with no Keras layer: "
                   + _listing(flax_left, keras_left))
    if keras_left:
      lines.append(f"{len(keras_left)} Keras layer(s) with no Flax module: "
                   + _listing(sorted(keras_left), flax_left))
    raise MatchError("; ".join(lines))
  return [found[n] for n in flax_names]


def _listing(names, others, limit: int = 6) -> str:
  """``name (closest: other)`` for the first few names."""
  out = []
  for n in list(names)[:limit]:
    near = process.extractOne(n, list(others), scorer=fuzz.ratio) if (
        others) else None
    out.append(f"{n} (closest: {near[0]})" if near else n)
  more = len(names) - limit
  return ", ".join(out) + (f", … and {more} more" if more > 0 else "")
