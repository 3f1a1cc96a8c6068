"""TFLite / LiteRT export of any JAX function through jax2tf.

The path that works with the installed versions: ``jax2tf.convert(fn,
with_gradient=False, native_serialization_platforms=("cpu",))``, the
variables held as ``tf.Variable``s in a ``tf.Module``, ``tf.saved_model.save``
and ``tf.lite.TFLiteConverter.from_saved_model``. Static input shapes (the
default) give builtin ops only, BatchNorm folded into the convolutions and
working full-int8 quantization. ``dynamic_batch=True`` exports a symbolic
batch dimension instead: the graph then carries shape arithmetic
(SHAPE/STRIDED_SLICE/… ops, and reshapes computed at run time), is larger and
slower to start, and full int8 is not offered for it.

Nothing here knows a model by name: ``fn(variables, *inputs)`` can be a
registered model's ``apply``, a vmapped or composite function.
"""

from __future__ import annotations

import collections
import os
import tempfile
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from translate.keras_io import quiet_native_stderr

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")


def _specs(input_specs: Sequence[Any]) -> list[tuple[tuple[int, ...], Any]]:
  """``(shape, dtype)`` pairs from ShapeDtypeStructs, arrays or tuples."""
  out = []
  for s in input_specs:
    if hasattr(s, "shape") and hasattr(s, "dtype"):
      out.append((tuple(s.shape), np.dtype(s.dtype)))
    else:
      shape, dtype = (s, np.float32) if isinstance(s[0], int) else s
      out.append((tuple(shape), np.dtype(dtype)))
  return out


def export_tflite(fn: Callable[..., Any], variables: Any,
                  input_specs: Sequence[Any], quantize: str | None = None,
                  *, dynamic_batch: bool = False,
                  representative_data: Iterable[Sequence[np.ndarray]]
                  | None = None) -> bytes:
  """Exports ``fn(variables, *inputs)`` to a TFLite flatbuffer.

  Args:
    fn: a JAX function of the variables and the inputs.
    variables: a pytree of arrays (held as ``tf.Variable``s, frozen into the
      flatbuffer by the converter).
    input_specs: one ``(shape, dtype)``, ``jax.ShapeDtypeStruct`` or array
      per input; shapes are static unless ``dynamic_batch``.
    quantize: ``None``/``"none"`` (float32), ``"float16"`` (weights in
      float16), ``"dynamic"`` (dynamic-range int8 weights) or ``"int8"``
      (full integer, calibrated on ``representative_data``; float32 input
      and output).
    dynamic_batch: export the leading dimension of every input as symbolic.
    representative_data: for ``"int8"``: an iterable of input tuples, each
      shaped like ``input_specs``.

  Returns:
    The flatbuffer bytes.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  quantize = quantize or "none"
  if quantize not in QUANTIZATIONS:
    raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got "
                     f"{quantize!r}")
  if quantize == "int8" and representative_data is None:
    raise ValueError("quantize='int8' needs representative_data (a few "
                     "preprocessed inputs) to calibrate on")
  if quantize == "int8" and dynamic_batch:
    raise ValueError("full int8 needs static shapes; drop dynamic_batch")
  specs = _specs(input_specs)
  polymorphic = (["(b, " + ", ".join("_" for _ in s[1:]) + ")"
                  if s else None for s, _ in specs]
                 if dynamic_batch else None)
  converted = jax2tf.convert(
      fn, with_gradient=False, native_serialization_platforms=("cpu",),
      polymorphic_shapes=None if polymorphic is None
      else [None, *polymorphic])

  module = tf.Module()
  module.variables_ = tf.nest.map_structure(
      lambda a: tf.Variable(np.asarray(a), trainable=False),
      jax.tree.map(np.asarray, variables))
  signature = [tf.TensorSpec((None, *s[1:]) if dynamic_batch else s,
                             tf.as_dtype(d), name=f"input_{i}")
               for i, (s, d) in enumerate(specs)]

  @tf.function(input_signature=signature, autograph=False)
  def serve(*inputs):
    return converted(module.variables_, *inputs)

  module.serve = serve
  with tempfile.TemporaryDirectory() as tmp:
    tf.saved_model.save(module, tmp,
                        signatures=serve.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
    if quantize == "float16":
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantize == "int8":
      data = list(representative_data)

      def representative():
        for sample in data:
          yield [np.asarray(a, d) for a, (_, d) in zip(sample, specs)]

      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.representative_dataset = representative
      converter.target_spec.supported_ops = [
          tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with quiet_native_stderr():  # the converter's C++ progress lines
      return converter.convert()


def tflite_ops(flatbuffer: bytes) -> collections.Counter:
  """Counts the operators of every subgraph, by builtin name.

  Custom ops appear as ``CUSTOM:<name>`` and TF (Flex) ops as
  ``CUSTOM:Flex…``, read from the flatbuffer schema, not by string search.
  """
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  names = {v: k for k, v in vars(schema.BuiltinOperator).items()
           if not k.startswith("_")}
  model = schema.Model.GetRootAsModel(flatbuffer, 0)
  codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
  ops: collections.Counter = collections.Counter()
  for g in range(model.SubgraphsLength()):
    graph = model.Subgraphs(g)
    for i in range(graph.OperatorsLength()):
      code = codes[graph.Operators(i).OpcodeIndex()]
      builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
      if builtin == schema.BuiltinOperator.CUSTOM:
        ops["CUSTOM:" + code.CustomCode().decode()] += 1
      else:
        ops[names.get(builtin, str(builtin))] += 1
  return ops


def interpreter_class() -> tuple[Any, str]:
  """LiteRT's interpreter, or TF's deprecated one if LiteRT is missing."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    return Interpreter, "ai_edge_litert"
  except ImportError:  # pragma: no cover - ai-edge-litert is a requirement
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.lite.Interpreter, "tf.lite (deprecated)"


def load_interpreter(model: bytes | str | os.PathLike,
                     num_threads: int | None = None) -> Any:
  """A ready (allocated) interpreter for flatbuffer bytes or a file."""
  cls, _ = interpreter_class()
  kwargs = {"num_threads": num_threads} if num_threads else {}
  with quiet_native_stderr():  # "Created TensorFlow Lite XNNPACK delegate"
    if isinstance(model, (bytes, bytearray)):
      interp = cls(model_content=bytes(model), **kwargs)
    else:
      interp = cls(model_path=os.fspath(model), **kwargs)
    interp.allocate_tensors()
  return interp


def run_tflite(model: Any, *inputs: np.ndarray,
               num_threads: int | None = None) -> list[np.ndarray]:
  """Runs a flatbuffer (bytes, path or interpreter) on ``inputs``."""
  interp = model if hasattr(model, "invoke") else load_interpreter(
      model, num_threads)
  details = interp.get_input_details()
  resized = False
  for d, x in zip(details, inputs):
    if tuple(d["shape"]) != tuple(np.shape(x)):
      interp.resize_tensor_input(d["index"], np.shape(x))
      resized = True
  if resized:
    interp.allocate_tensors()
  for d, x in zip(interp.get_input_details(), inputs):
    interp.set_tensor(d["index"], np.asarray(x, d["dtype"]))
  interp.invoke()
  return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]


def compare(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
  """max |Δ|, the relative figure max |Δ| / max(1, max |ref|), top-1."""
  out = np.asarray(out, np.float64).reshape(len(ref), -1)
  ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
  max_abs = float(np.max(np.abs(out - ref)))
  return {"max_abs": max_abs,
          "max_rel": max_abs / max(1.0, float(np.max(np.abs(ref)))),
          "top1_agreement": float(np.mean(out.argmax(-1) == ref.argmax(-1)))}
