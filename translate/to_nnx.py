"""Flax NNX: a translated linen module and its variables as one
``nnx.Module``, and the linen variables back.

``to_nnx(module, variables)`` holds the given arrays as NNX variables
(``params`` as ``nnx.Param``, ``batch_stats`` as ``nnx.BatchStat``, the
same nested names): nothing is initialized a second time. Calling it runs
the linen module on them, so it computes exactly what ``module.apply``
computes; ``train=True`` is linen's ``mutable=["batch_stats"]`` call with the
updated statistics written back into the module, and Dropout draws from the
module's ``nnx.Rngs`` stream ``dropout``. It is an ordinary NNX module:
``nnx.Optimizer(m, tx, wrt=nnx.Param)``, ``nnx.value_and_grad``, ``nnx.jit``,
``nnx.state`` (and orbax on it) and a place inside a user's own NNX model
all work. ``from_nnx`` gives back ``{"params", "batch_stats"}`` for
everything linen-side (``save_variables``, ``export_tflite``,
``to_keras``).

Why not ``flax.nnx.bridge.ToNNX``: it initializes lazily from a sample input
(random weights, then replaced by hand) and updates statistics only when
every call passes ``mutable=``; this wrapper takes the variables it is
given and follows ``train=`` alone.

``LinenModel`` lives in ``models.nnx_bridge`` (the NNX source
``emit_source(..., api="nnx")`` writes imports it from there).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

from models.nnx_bridge import LinenModel


def to_nnx(module: nn.Module, variables: Any, *,
           rngs: nnx.Rngs | None = None) -> LinenModel:
  """``module`` (a linen module: ``models.create(...)``, or
  ``translate.from_keras``' translation) holding ``variables``, as an
  ``nnx.Module``.

  ``m(*inputs)`` equals ``module.apply(variables, *inputs)``;
  ``m(*inputs, train=True)`` is training mode: BatchNorm on batch
  statistics, its moving statistics updated in ``m``, Dropout drawing from
  ``rngs``' ``dropout`` stream (default ``nnx.Rngs(dropout=0)``).

  Args:
    module: the linen module.
    variables: its ``{"params", "batch_stats"}`` (from ``translate.convert``,
      ``from_keras``, ``load_variables``, ...), used as they are.
    rngs: the NNX random streams for dropout.

  Returns:
    A ``LinenModel``; ``from_nnx`` gives its variables back.
  """
  return LinenModel(module, variables, rngs=rngs)


def from_nnx(m: nnx.Module) -> dict[str, Any]:
  """The linen variables ``{"params", "batch_stats"}`` of a ``to_nnx``
  module, or of the one ``to_nnx`` module inside a user's NNX model (a
  backbone with a new head: the head is the user's to save).

  Raises:
    ValueError: ``m`` holds no ``to_nnx`` module, or several (pass the one
      you mean).
  """
  if isinstance(m, LinenModel):
    return m.variables()
  found = [(path, node) for path, node in nnx.iter_graph(m)
           if isinstance(node, LinenModel)]
  if len(found) == 1:
    return found[0][1].variables()
  if not found:
    raise ValueError(f"from_nnx: {type(m).__name__} holds no module made by "
                     "translate.to_nnx; pass one of those (or a model that "
                     "holds exactly one)")
  paths = ", ".join(".".join(map(str, p)) or "(top)" for p, _ in found)
  raise ValueError(f"from_nnx: {type(m).__name__} holds {len(found)} modules "
                   f"made by translate.to_nnx ({paths}); pass the one you "
                   "mean, e.g. from_nnx(model.backbone)")
