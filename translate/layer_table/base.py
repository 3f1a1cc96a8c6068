"""The per-layer contract: what each Keras class becomes in Flax source.

One table (``TABLE``), keyed by the Keras class name of a layer (``Conv2D``)
or of a ``keras.ops`` operation in a functional graph (``Add`` for
``keras.ops.add``; ops are keyed ``"ops.<Class>"``). Each entry is a
``LayerTranslation``:

- ``module(config, ctx)``: the source of the Flax submodule's constructor,
  without its ``name=`` (``'nn.Dense(5)'``); None as the entry (or as what
  it returns for a configuration) for a layer without variables, which
  becomes a plain expression;
- ``call(config, callee, inputs, ctx)``: the source of the expression that
  computes the layer's output(s) from ``inputs`` (source expressions of the
  tensor arguments, in Keras' order) with ``callee`` (the constructed
  submodule's expression, or None);
- ``rules``: how the layer's Keras weights fill the submodule's variables
  (``translate.rules.Rule`` by Keras weight name), for the strict merge and
  its inverse (``to_keras``).

The graph walker (``translate.graph``) and the emitter (``translate.emit``)
know no class: the set of supported classes is this table's keys, which the
docs list and a test checks. The group modules of this package fill it;
``register_layer`` adds a user's own class.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from typing import Any, Callable

from translate.graph import Value
from translate.keras_io import UnsupportedLayerError
from translate.rules import RULES, Rule


@dataclasses.dataclass
class Context:
  """What a ``call`` sees besides the config.

  Attributes:
    name: the Keras layer's name (its Flax submodule's name).
    call: the ``translate.graph.Call`` being translated.
    imports: the emitted file's import lines; a translation adds the ones
      its source needs (``"from models import keras_layers as K"``).
  """

  name: str
  call: Any
  imports: set[str]
  kw_sources: dict[str, str] = dataclasses.field(default_factory=dict)

  def need(self, line: str) -> None:
    self.imports.add(line)

  @property
  def kwargs(self) -> dict[str, Any]:
    return self.call.kwargs


@dataclasses.dataclass(frozen=True)
class LayerTranslation:
  """One Keras class's translation; see the module docstring."""

  call: Callable[[dict[str, Any], str | None, list[str], Context], str]
  module: Callable[[dict[str, Any], Context], str] | None = None
  rules: dict[str, Rule | None] = dataclasses.field(default_factory=dict)
  note: str = ""  # one line for the docs' table (options not supported)
  # The layer's training mode follows the module's train= whatever the
  # graph recorded (Keras' augmentation layers record training=True).
  ignores_training: bool = False


TABLE: dict[str, LayerTranslation] = {}
USER_CLASSES: set[str] = set()  # added by register_layer (not in the docs)


def register(keras_class: str, translation: LayerTranslation) -> None:
  """Adds a built-in translation; a class registered twice is an error.

  Its weight rules join ``translate.rules.RULES`` (the strict merge and
  ``to_keras`` read them there) unless that table has the class already,
  in which case they must be the same rules.
  """
  if keras_class in TABLE:
    raise ValueError(f"Keras class {keras_class!r} is registered twice")
  if translation.module is not None and not keras_class.startswith("ops."):
    have = RULES.setdefault(keras_class, translation.rules)
    if have != translation.rules:
      raise ValueError(f"{keras_class}: its rules differ from "
                       "translate.rules.RULES[{keras_class!r}]")
  TABLE[keras_class] = translation


def lookup(cls: str, kind: str) -> LayerTranslation | None:
  """The translation of a layer class, or of an operation (``kind="op"``)."""
  return TABLE.get(f"ops.{cls}" if kind == "op" else cls)


def supported_classes() -> dict[str, list[str]]:
  """``{"layers": [...], "ops": [...]}``: the Keras classes the table
  translates, sorted (what the docs' table lists)."""
  layers = sorted(k for k in TABLE if not k.startswith("ops."))
  ops = sorted(k[4:] for k in TABLE if k.startswith("ops."))
  return {"layers": layers, "ops": ops}


# --- source helpers shared by the group modules -----------------------------

def lit(value: Any) -> str:
  """A Python literal for a config value (tuples for lists)."""
  if isinstance(value, list):
    value = tuple(lit_value(v) for v in value)
  return repr(lit_value(value))


def lit_value(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(lit_value(v) for v in value)
  if isinstance(value, tuple):
    return tuple(lit_value(v) for v in value)
  return value


def refuse(ctx: Context, what: str, fix: str) -> UnsupportedLayerError:
  """The error for an option a translation does not reproduce."""
  return UnsupportedLayerError(
      f"Keras layer {ctx.name!r} ({ctx.call.cls}): {what} is not supported; "
      f"{fix}")


def require(config: dict[str, Any], ctx: Context, **allowed: Any) -> None:
  """Raises unless each ``config[key]`` (when present) is one of the
  ``allowed[key]`` values (a tuple) or equals it."""
  for key, ok in allowed.items():
    if key not in config:
      continue
    values = ok if isinstance(ok, tuple) else (ok,)
    value = lit_value(config[key])
    if value not in values:
      raise refuse(ctx, f"{key}={config[key]!r}",
                   f"the translation supports {key} in {list(values)}")


def source_of(x: Any) -> str:
  """Source of a call argument: a ``Value``'s name, a constant's literal,
  structures element-wise."""
  if isinstance(x, Value):
    return x.var
  if isinstance(x, list):
    return "[" + ", ".join(source_of(v) for v in x) + "]"
  if isinstance(x, tuple):
    inner = ", ".join(source_of(v) for v in x)
    return f"({inner},)" if len(x) == 1 else f"({inner})"
  if isinstance(x, dict):
    return "{" + ", ".join(f"{k!r}: {source_of(v)}" for k, v in x.items()) + "}"
  if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
    return f"float({str(x)!r})"
  if type(x).__module__ == "numpy":
    return f"np.asarray({x.tolist()!r}, dtype={str(x.dtype)!r})"
  return repr(x)


# --- a user's own layer class ------------------------------------------------

def register_layer(keras_class: Any, flax_factory: type,
                   rule: dict[str, Rule | None] | None = None) -> None:
  """Registers the Flax version of a user's own Keras layer class.

  The emitted source imports ``flax_factory`` from its module and builds it
  with the Keras layer's config entries whose names are fields of the Flax
  class (plus ``name=`` the Keras layer's name); it is called with the
  layer's tensor inputs, and with ``train=train`` when its ``__call__``
  takes ``train``. ``rule`` maps each Keras weight name of the layer
  (``"kernel"``) to the Flax variable it fills (``translate.Rule("params",
  "kernel")``, with an optional einops pattern), or to ``translate.DROP``.

  Args:
    keras_class: the Keras layer class (or its class name).
    flax_factory: a ``flax.linen.Module`` subclass, top-level in its module
      (the emitted source imports it from there: for ``emit_source`` files,
      an importable module, not a script's ``__main__``).
    rule: the weight rule; ``{}`` (default) for a layer without weights.

  Raises:
    ValueError: the class is already registered (built in or before), or
      the factory is not an importable linen Module class.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  name = keras_class if isinstance(keras_class, str) else keras_class.__name__
  if not (isinstance(flax_factory, type) and issubclass(flax_factory,
                                                        nn.Module)):
    raise ValueError(f"flax_factory for {name} must be a flax.linen.Module "
                     f"subclass, got {flax_factory!r}")
  if name in TABLE:
    raise ValueError(f"Keras class {name!r} already has a translation; "
                     "register_layer is for classes the table lacks")
  module_path = flax_factory.__module__
  fields = [f.name for f in dataclasses.fields(flax_factory)
            if f.name not in ("parent", "name")]
  takes_train = "train" in inspect.signature(flax_factory.__call__).parameters
  cls_name = flax_factory.__qualname__
  if "." in cls_name:
    raise ValueError(f"flax_factory {cls_name} must be a top-level class of "
                     "its module (the generated source imports it by name)")
  if module_path not in sys.modules:
    # Defined in code executed outside any module (a notebook cell, exec):
    # from_keras' in-process source can still import it. A file from
    # emit_source needs the class in an importable module.
    shim = types.ModuleType(module_path)
    setattr(shim, cls_name, flax_factory)
    sys.modules[module_path] = shim
  alias = cls_name

  def module(config, ctx):
    ctx.need(f"from {module_path} import {cls_name}")
    args = ", ".join(f"{k}={lit(config[k])}" for k in fields if k in config)
    return f"{alias}({args})"

  def call(config, callee, inputs, ctx):
    train = ", train=train" if takes_train else ""
    return f"{callee}({', '.join(inputs)}{train})"

  if rule:
    RULES.setdefault(name, rule)
  TABLE[name] = LayerTranslation(call=call, module=module,
                                 rules=dict(rule or {}),
                                 note="registered with register_layer")
  USER_CLASSES.add(name)


def markdown_table() -> str:
  """The built-in Keras classes as the Markdown table of ``docs/layers.md``
  (a test checks that page against this); ``register_layer``'s are not
  listed."""
  rows = ["| Keras class | kind | notes |", "|---|---|---|"]
  built_in = [k for k in TABLE if k not in USER_CLASSES]
  for key in sorted(built_in, key=lambda k: (k.startswith("ops."),
                                             k.lower())):
    kind = "keras.ops" if key.startswith("ops.") else "layer"
    name = key[4:] if key.startswith("ops.") else key
    rows.append(f"| `{name}` | {kind} | {TABLE[key].note} |")
  return "\n".join(rows)
