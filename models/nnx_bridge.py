"""Linen inside Flax NNX: ``LinenModel`` (a linen module with its variables as
one ``nnx.Module``), ``LinenLayer`` (one linen leaf layer, built per call),
and the helpers the NNX source ``translate.emit_source(..., api="nnx")``
writes calls to (``subtree``, ``load``, ``dump``, ``check_same``).

Here, not in ``translate``, because a generated NNX file imports numpy, jax,
flax and ``models`` only; ``translate.to_nnx`` builds on ``LinenModel``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
from flax import serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

_KINDS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def _hold(owner: nnx.Module, variables: Any, what: str) -> None:
  state = serialization.to_state_dict(variables)
  other = sorted(set(state) - set(_KINDS))
  if other:
    raise ValueError(f"{what}: variable collection(s) {other} are not "
                     "params or batch_stats; only those are translated")
  for collection, kind in _KINDS.items():
    tree = jax.tree.map(jnp.asarray, state.get(collection, {}))
    setattr(owner, collection, kind(tree))


def _held(owner: nnx.Module) -> dict[str, Any]:
  out = {}
  for collection in _KINDS:
    tree = _pure(getattr(owner, collection).get_value())
    if tree:
      out[collection] = tree
  return out


class LinenModel(nnx.Module):
  """A linen module with its variables, as an NNX module (``to_nnx``).

  Each collection is one NNX variable holding the nested dict (one
  ``nnx.Param``, one ``nnx.BatchStat``): ``nnx.jit`` then walks two
  variables per call instead of one per array, which measured 7.5 ms a
  step on MobileNetV2's 262 arrays (``benchmarks/nnx_step.py``), and
  ``nnx.Optimizer``, ``nnx.grad`` and orbax see the arrays inside.

  Attributes:
    module: the linen module (static).
    params: an ``nnx.Param`` holding ``params`` (``params.get_value()``).
    batch_stats: an ``nnx.BatchStat`` holding ``batch_stats``.
    rngs: the ``nnx.Rngs`` whose ``dropout`` stream training mode uses.
  """

  def __init__(self, module: nn.Module, variables: Any, *,
               rngs: nnx.Rngs | None = None):
    _hold(self, variables, "to_nnx")
    self.module = module
    self.rngs = rngs if rngs is not None else nnx.Rngs(dropout=0)

  def variables(self) -> dict[str, Any]:
    """The linen variables: ``{"params": ..., "batch_stats": ...}`` (the
    current arrays, not copies)."""
    return _held(self)

  def to_variables(self) -> dict[str, Any]:
    """``variables()`` (the name generated NNX modules use)."""
    return _held(self)

  def __call__(self, *inputs: Any, train: bool = False) -> Any:
    variables = self.variables()
    if not train:
      return self.module.apply(variables, *inputs)
    out, updates = self.module.apply(
        variables, *inputs, train=True, mutable=["batch_stats"],
        rngs={"dropout": self.rngs.dropout()})
    if updates.get("batch_stats"):
      self.batch_stats.set_value(_pure(updates["batch_stats"]))
    return out


class LinenLayer(nnx.Module):
  """One linen leaf layer with its variables, as an NNX module.

  The layer is built on each call by ``make(train)`` (a linen constructor
  may read ``train``: ``nn.Dropout(0.1, deterministic=not train)``), so
  ``self.layer.bound(train)`` is the callable the linen source would call:
  ``self.layer.bound(train)(x)``. In training mode its ``batch_stats`` are
  updated in place and ``dropout`` draws from ``rngs``.

  Attributes:
    make: ``train -> linen module`` (static).
    params, batch_stats: one ``nnx.Param`` / ``nnx.BatchStat`` each, the
      layer's linen variables.
    rngs: the ``nnx.Rngs`` whose ``dropout`` stream training mode uses.
  """

  def __init__(self, make: Callable[[bool], nn.Module], variables: Any, *,
               rngs: nnx.Rngs | None = None):
    _hold(self, variables, "LinenLayer")
    self.make = make
    self.rngs = rngs if rngs is not None else nnx.Rngs(dropout=0)

  def to_variables(self) -> dict[str, Any]:
    return _held(self)

  def bound(self, train: bool = False) -> Callable[..., Any]:
    module = self.make(train)

    def run(*args: Any, **kwargs: Any) -> Any:
      variables = _held(self)
      if not train:
        return module.apply(variables, *args, **kwargs)
      out, updates = module.apply(
          variables, *args, mutable=["batch_stats"],
          rngs={"dropout": self.rngs.dropout()}, **kwargs)
      if updates.get("batch_stats"):
        self.batch_stats.set_value(_pure(updates["batch_stats"]))
      return out

    return run


def _pure(tree: Any) -> Any:
  """Nested plain dicts (NNX hands a dict value back as an ``nnx.State``
  after an update; linen takes plain dicts)."""
  if isinstance(tree, Mapping):
    return {k: _pure(v) for k, v in tree.items()}
  return tree


# --- helpers of the generated NNX source ----------------------------------

def subtree(variables: Mapping[str, Any], name: str) -> dict[str, Any]:
  """``{collection: variables[collection][name]}`` for the collections
  that have ``name`` (one submodule's linen variables)."""
  return {c: tree[name] for c, tree in variables.items() if name in tree}


def _attr(module: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    module = getattr(module, part)
  return module


def load(module: nnx.Module, variables: Mapping[str, Any],
         leaves: tuple[tuple[str, str, str], ...]) -> None:
  """Sets each NNX variable ``module.<attribute>`` of ``leaves`` (``(
  attribute path, linen collection, linen path "a/b")``) to its linen
  array, whose shape must be the variable's."""
  for attribute, collection, path in leaves:
    value = variables[collection]
    for part in path.split("/"):
      value = value[part]
    variable = _attr(module, attribute)
    have = tuple(variable.get_value().shape)
    value = jnp.asarray(value, variable.get_value().dtype)
    if tuple(value.shape) != have:
      raise ValueError(f"{collection}/{path}: shape {tuple(value.shape)} "
                       f"does not fit {attribute} {have}")
    variable.set_value(value)


def dump(module: nnx.Module, leaves: tuple[tuple[str, str, str], ...],
         children: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
  """The linen variables of ``module``: its ``leaves`` (as for ``load``)
  and each ``(attribute, linen name)`` child's ``to_variables()`` under
  that name. The current arrays, not copies."""
  flat: dict[tuple[str, ...], Any] = {}
  for attribute, collection, path in leaves:
    flat[(collection, *path.split("/"))] = _attr(module, attribute).get_value()
  for attribute, name in children:
    sub = traverse_util.flatten_dict(_attr(module, attribute).to_variables())
    for key, value in sub.items():
      flat[(key[0], name, *key[1:])] = value
  return traverse_util.unflatten_dict(flat)


def check_same(variables: Mapping[str, Any], held: Mapping[str, Any]) -> None:
  """Raises unless ``held`` (a module's ``to_variables()``) has exactly the
  leaves and shapes of ``variables``: every linen array used, once."""
  want = {k: np.shape(v) for k, v in
          traverse_util.flatten_dict(_pure(dict(variables))).items()}
  have = {k: np.shape(v) for k, v in
          traverse_util.flatten_dict(_pure(dict(held))).items()}
  if want != have:
    missing = sorted("/".join(k) for k in set(want) - set(have))
    extra = sorted("/".join(k) for k in set(have) - set(want))
    shapes = sorted("/".join(k) for k in set(want) & set(have)
                    if want[k] != have[k])
    raise ValueError(f"the variables do not fit this module: unused "
                     f"{missing[:5]}, missing {extra[:5]}, other shapes "
                     f"{shapes[:5]}")
