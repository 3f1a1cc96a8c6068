"""TFLite / LiteRT export of any JAX function through jax2tf.

The path that works with the installed versions: ``jax2tf.convert(fn,
with_gradient=False, native_serialization_platforms=("cpu",))``, the
variables held as ``tf.Variable``s in a ``tf.Module``, ``tf.saved_model.save``
and ``tf.lite.TFLiteConverter.from_saved_model``. Static input shapes (the
default) give builtin ops only, BatchNorm folded into the convolutions and
working full-int8 quantization. ``dynamic_batch=True`` exports a symbolic
batch dimension instead, at a real cost: JAX broadcasts every constant to the
symbolic shape (BROADCAST_TO, SHAPE, CONCATENATION ops), which stops the
converter from folding BatchNorm into the convolutions and from fusing
ReLU6 into them (MUL/SUB/MAXIMUM/MINIMUM stay in the graph). Measured with
``benchmarks/tflite_vs_keras.py --dynamic_batch`` (LiteRT, 2 threads, batch
1): ResNet50 582 ops instead of 74 and 6.5x slower, MobileNetV2 506 ops
instead of 64 and 33x slower, files about the same size. Full int8 is not
offered for it. Prefer one static export per batch size you serve.

Nothing here knows a model by name: ``fn(variables, *inputs)`` can be a
registered model's ``apply``, a vmapped or composite function.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from models.backend import quiet_native_stderr

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
                  | None = None, short_names: bool = True) -> bytes:
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
    short_names: keep only the first of the ``;``-joined source locations
      the converter gives each fused tensor (``jit(apply)/…/conv1_bn/mul;
      jit(apply)/…/conv1/conv_general_dilated;…``): they are debugging text
      only, and shortening them makes the file as small as Keras' own.

  Returns:
    The flatbuffer bytes.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  from models import recurrent  # pylint: disable=g-import-not-at-top

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
    # Traced here: models.recurrent layers left at unroll=None take their
    # TFLite form (short loops unrolled).
    with recurrent.tflite_export():
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
      flatbuffer = converter.convert()
  return shorten_tensor_names(flatbuffer) if short_names else flatbuffer


def shorten_tensor_names(flatbuffer: bytes) -> bytes:
  """Keeps the first ``;``-separated part of every tensor name.

  Tensor names are not used to run the model (signatures refer to tensor
  indices); the operators, buffers and signatures are left as they are.
  """
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top
  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
  for subgraph in model.subgraphs:
    for tensor in subgraph.tensors:
      if tensor.name and b";" in tensor.name:
        tensor.name = tensor.name.split(b";")[0]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


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
      ops[_op_name(schema, names,
                   codes[graph.Operators(i).OpcodeIndex()])] += 1
  return ops


@dataclasses.dataclass(frozen=True)
class TFLiteOp:
  """One operator of a flatbuffer's main subgraph.

  Attributes:
    name: builtin name (``"CONV_2D"``) or ``"CUSTOM:<name>"``.
    inputs: tensor indices (``-1`` for an omitted optional input).
    outputs: tensor indices.
    fused_activation: a convolution's fused activation (``"NONE"``,
      ``"RELU6"``…); ``"NONE"`` for other ops.
  """

  name: str
  inputs: tuple[int, ...]
  outputs: tuple[int, ...]
  fused_activation: str = "NONE"


@dataclasses.dataclass(frozen=True)
class TFLiteGraph:
  """The main subgraph of a flatbuffer, read through the schema.

  Attributes:
    ops: operators in execution order.
    shapes: static shape of every tensor, by index.
    dtypes: type of every tensor, by index (``"FLOAT32"``, ``"INT8"``…).
    inputs: the subgraph's input tensor indices.
    constants: indices of the tensors that are constants: neither a
      subgraph input nor any op's output, or a ``DEQUANTIZE`` of one (how
      float16 weights appear).
  """

  ops: tuple[TFLiteOp, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  inputs: tuple[int, ...]
  constants: frozenset[int]

  def producers(self) -> dict[int, TFLiteOp]:
    """Tensor index -> the op that writes it."""
    return {t: op for op in self.ops for t in op.outputs}


def _op_name(schema: Any, names: dict[int, str], code: Any) -> str:
  builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
  if builtin == schema.BuiltinOperator.CUSTOM:
    return "CUSTOM:" + code.CustomCode().decode()
  return names.get(builtin, str(builtin))


def tflite_graph(flatbuffer: bytes) -> TFLiteGraph:
  """Reads the main (first) subgraph's operators and tensors."""
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  names = {v: k for k, v in vars(schema.BuiltinOperator).items()
           if not k.startswith("_")}
  model = schema.Model.GetRootAsModel(flatbuffer, 0)
  codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
  graph = model.Subgraphs(0)
  activations = {v: k for k, v in
                 vars(schema.ActivationFunctionType).items()
                 if not k.startswith("_")}
  options = {"CONV_2D": schema.Conv2DOptions,
             "DEPTHWISE_CONV_2D": schema.DepthwiseConv2DOptions}
  ops = []
  for i in range(graph.OperatorsLength()):
    op = graph.Operators(i)
    name = _op_name(schema, names, codes[op.OpcodeIndex()])
    fused = "NONE"
    if name in options and op.BuiltinOptions() is not None:
      table = op.BuiltinOptions()
      opts = options[name]()
      opts.Init(table.Bytes, table.Pos)
      fused = activations.get(opts.FusedActivationFunction(), "?")
    ops.append(TFLiteOp(
        name,
        tuple(int(t) for t in op.InputsAsNumpy()) if op.InputsLength()
        else (),
        tuple(int(t) for t in op.OutputsAsNumpy()) if op.OutputsLength()
        else (),
        fused))
  shapes = tuple(
      tuple(int(d) for d in graph.Tensors(t).ShapeAsNumpy())
      if graph.Tensors(t).ShapeLength() else ()
      for t in range(graph.TensorsLength()))
  types = {v: k for k, v in vars(schema.TensorType).items()
           if not k.startswith("_")}
  dtypes = tuple(types.get(graph.Tensors(t).Type(), "?")
                 for t in range(len(shapes)))
  inputs = tuple(int(t) for t in graph.InputsAsNumpy())
  written = {t for op in ops for t in op.outputs}
  constants = set(range(len(shapes))) - written - set(inputs)
  for op in ops:  # float16 weights: DEQUANTIZE(constant)
    if op.name == "DEQUANTIZE" and set(op.inputs) <= constants:
      constants.update(op.outputs)
  return TFLiteGraph(tuple(ops), shapes, dtypes, inputs,
                     frozenset(constants))


CONVOLUTIONS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "CONV_3D")
_AFFINE = ("MUL", "ADD", "SUB", "DIV")


def unfolded_affine_ops(flatbuffer: bytes) -> list[str]:
  """Elementwise ``MUL``/``ADD``/``SUB``/``DIV`` ops applied to a
  convolution's output with a constant operand: what a BatchNorm (or a
  bias) left unfolded after a convolution looks like.

  A folded graph has none: BatchNorm's scale is in the convolution's
  kernel and its shift in the convolution's bias. The legitimate
  elementwise ops of a CNN take two computed tensors (residual ``ADD``,
  swish ``x * sigmoid(x)``, a squeeze-excite gate) or follow a non-
  convolution op (a BatchNorm after a concatenation or a pooling, which
  cannot be folded) or a convolution with a fused activation (MobileNetV3's
  hard sigmoid ``relu6(conv + 3) * (1 / 6)``: the scale follows the
  nonlinearity and cannot be folded), so they are not counted.

  Returns:
    ``"<op> after <conv>"`` for each such op (empty when all is folded).
  """
  graph = tflite_graph(flatbuffer)
  producers = graph.producers()
  found = []
  for op in graph.ops:
    if op.name not in _AFFINE or len(op.inputs) != 2:
      continue
    a, b = op.inputs
    for x, other in ((a, b), (b, a)):
      src = producers.get(x)
      if src is not None and src.name in CONVOLUTIONS and (
          src.fused_activation == "NONE") and other in graph.constants:
        found.append(f"{op.name} after {src.name}")
        break
  return found


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
