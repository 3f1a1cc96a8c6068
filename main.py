"""Translate a Keras Applications model into Flax variables.

  python main.py --model resnet50                  # ImageNet weights (download)
  python main.py --model resnet50 --weights random # offline: randomized weights
  python main.py --model resnet50 --weights my.weights.h5
  python main.py --weights translated/resnet50.msgpack --export tflite
  python main.py --to_keras translated/resnet50.msgpack
  python main.py --list                            # the registered models
  python main.py --help                            # every flag

Writes ``translated/<model>.msgpack`` (the Flax variables) and
``translated/<model>.json`` (metadata and parity figures), after checking that
the Flax model reproduces the Keras logits. Installed with ``pip install .``,
``keras2flax`` is the same command.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging

_MODEL = flags.DEFINE_string("model", None, "Registered model name, e.g. "
                             "resnet50 (the Keras spelling ResNet50 works).")
_WEIGHTS = flags.DEFINE_string(
    "weights", "imagenet", "imagenet (Keras downloads and caches them), "
    "random (offline: Keras weights=None, then every weight and BatchNorm "
    "statistic randomized from --seed), a local Keras file (.weights.h5, "
    "legacy .h5, .keras), or this tool's own output (a .msgpack or an orbax "
    "directory with its .json sidecar: re-check it against Keras, --export "
    "it; the model and options come from the sidecar).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of --weights random and of the "
                             "parity check's images.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Output .msgpack path (the .json sidecar goes beside it). "
    "Default: translated/<model>[_<options>].msgpack, or "
    "translated/<model>[_<options>].orbax/ with --format orbax.")
_FORMAT = flags.DEFINE_enum(
    "format", "msgpack", ["msgpack", "orbax"], "Output format: msgpack (one "
    "file) or orbax (a checkpoint directory that orbax.checkpoint."
    "PyTreeCheckpointer().restore(DIR) reads); the .json sidecar goes beside "
    "either.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace existing output files.")
_CHECK = flags.DEFINE_bool("check", True, "Check parity against Keras; exit "
                           "non-zero and write nothing if over tolerance.")
_KEEP_FAILED = flags.DEFINE_bool("keep_failed", False, "Write the outputs even "
                                 "when the parity check fails.")
_INCLUDE_TOP = flags.DEFINE_bool("include_top", True, "Include the classifier.")
_POOLING = flags.DEFINE_enum("pooling", None, ["avg", "max"],
                             "Global pooling when --noinclude_top.")
_CLASSES = flags.DEFINE_integer("classes", 1000, "Classifier size.")
_CLASSIFIER_ACTIVATION = flags.DEFINE_enum(
    "classifier_activation", "softmax", ["softmax", "none"],
    "Activation of the classifier: softmax (Keras' default) or none "
    "(logits). A whole-model weights file fixes it.")
_INPUT_SHAPE = flags.DEFINE_list("input_shape", None,
                                 "height,width,channels (default: native).")
_ALPHA = flags.DEFINE_float("alpha", None, "Width multiplier (MobileNet, "
                            "MobileNetV2, MobileNetV3).")
_DEPTH_MULTIPLIER = flags.DEFINE_integer(
    "depth_multiplier", None, "Depthwise channel multiplier (MobileNet).")
_MINIMALISTIC = flags.DEFINE_bool(
    "minimalistic", None, "MobileNetV3 without squeeze-and-excite and "
    "hard-swish.")
_INCLUDE_PREPROCESSING = flags.DEFINE_bool(
    "include_preprocessing", None, "Keep the model's own input rescaling "
    "layers (MobileNetV3, EfficientNetV2, ConvNeXt, RegNet); "
    "--noinclude_preprocessing drops them.")
# The family options that have a flag (the others: models.create only).
FLAG_OPTIONS = ("alpha", "depth_multiplier", "minimalistic",
                "include_preprocessing")
_EMIT_SOURCE = flags.DEFINE_string(
    "emit_source", None, "With a whole-model --weights file (.keras, .h5) "
    "and no --model: also write the model's Flax linen source to this .py "
    "file (readable; it imports numpy, jax, flax and models only).")
_API = flags.DEFINE_enum(
    "api", "linen", ["linen", "nnx"], "The Flax API of --emit_source: "
    "linen (a linen module, create().apply(variables, *inputs)) or nnx "
    "(nnx.Module classes, create(variables)(*inputs)).")
_LIST = flags.DEFINE_bool("list", False, "List the registered models.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks on errors.")
_EXPORT = flags.DEFINE_enum("export", None, ["tflite"], "Also export the "
                            "translated model (jax2tf -> TFLite/LiteRT), "
                            "beside the msgpack.")
_QUANTIZE = flags.DEFINE_enum("quantize", "none",
                              ["none", "float16", "dynamic", "int8"],
                              "TFLite quantization for --export.")
_CALIBRATION = flags.DEFINE_string(
    "calibration", None, "int8 calibration images: a directory of image "
    "files or a .npy array (N, H, W, 3) in [0, 255]; default: random "
    "images. Passed through the model's preprocessing.")
_DYNAMIC_BATCH = flags.DEFINE_bool("dynamic_batch", False, "Export a symbolic "
                                   "batch size (BatchNorm left unfolded: "
                                   "6-30x slower in LiteRT).")
_TO_KERAS = flags.DEFINE_string(
    "to_keras", None, "Translate back: a .msgpack or orbax directory of Flax "
    "variables (written by this tool, or fine-tuned) into a Keras 3 "
    ".weights.h5 at --output (default: beside it) that keras.applications."
    "<Name>(weights=None, <the same options>).load_weights() loads; "
    "parity-checked like the forward direction. --model and the options come "
    "from its .json sidecar (flags given override those that do not change "
    "the variables).")


class UserError(Exception):
  """A mistake in the command line or its inputs: one line, exit 1."""


def _phase(name: str, timings: dict[str, float]):
  @contextlib.contextmanager
  def timer():
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"  {name:<12} {timings[name]:7.2f} s", flush=True)
  return timer()


def default_output(name: str, create_kwargs: dict[str, Any],
                   native: tuple[int, ...], fmt: str = "msgpack") -> str:
  """``translated/<model>[_notop][_avg|_max][_classes<n>][_alpha<a>]
  [_dm<m>][_minimalistic][_nopreprocessing][_<h>x<w>]`` + ``.msgpack``, or
  ``.orbax`` (a checkpoint directory) for ``fmt="orbax"``: the options that
  change the variables (or the pooling of the outputs) are in the name, so
  two translations never share a file, and the two formats' sidecars
  (``<stem>.json``, ``<stem>.orbax.json``) never collide."""
  stem = name
  if not create_kwargs.get("include_top", True):
    stem += "_notop"
    if create_kwargs.get("pooling"):
      stem += f"_{create_kwargs['pooling']}"
  elif create_kwargs.get("classes", 1000) != 1000:
    stem += f"_classes{create_kwargs['classes']}"
  if "alpha" in create_kwargs:
    stem += f"_alpha{create_kwargs['alpha']:g}"
  if "depth_multiplier" in create_kwargs:
    stem += f"_dm{create_kwargs['depth_multiplier']}"
  if create_kwargs.get("minimalistic"):
    stem += "_minimalistic"
  if create_kwargs.get("include_preprocessing") is False:
    stem += "_nopreprocessing"
  shape = create_kwargs.get("input_shape")
  if shape is not None and tuple(shape) != tuple(native):
    stem += f"_{shape[0]}x{shape[1]}"
  return os.path.join("translated", stem + (".orbax" if fmt == "orbax"
                                            else ".msgpack"))


def check_output(path: str, overwrite: bool, fmt: str = "msgpack") -> None:
  """Refuses an existing output (unless ``overwrite``) or a directory that
  cannot be written, before any work is done."""
  import translate  # pylint: disable=g-import-not-at-top
  directory = os.path.dirname(os.path.abspath(path))
  if fmt == "msgpack" and not path.endswith(".msgpack"):
    raise UserError(f"--output {path!r} must end with .msgpack (or pass "
                    "--format orbax for a checkpoint directory)")
  if fmt == "orbax" and path.endswith((".msgpack", ".json", os.sep)):
    raise UserError(f"--output {path!r}: with --format orbax, name the "
                    "checkpoint directory, e.g. translated/resnet50")
  for p in (path, translate.sidecar_path(path)):
    if os.path.exists(p) and not overwrite:
      raise UserError(f"{p} already exists; pass --overwrite to replace it "
                      "or choose another --output")
  if (path.startswith("translated" + os.sep)
      and directory == os.path.abspath("translated")
      and not os.path.exists(directory)):
    # The default location is created when the outputs are written (_save);
    # here its parent must take it.
    directory = os.path.dirname(directory)
  if not os.path.isdir(directory):
    raise UserError(f"output directory {directory} does not exist; create it "
                    "or choose another --output")
  try:  # a real probe: os.access() says yes to root even where it fails
    tempfile.TemporaryFile(dir=directory).close()
  except OSError as e:
    raise UserError(f"output directory {directory} is not writable "
                    f"({e.strerror}); choose another --output") from None


def list_models(width: int = 100) -> None:
  """Prints the registry as a table, then each family's options with their
  Keras defaults, within ``width`` columns (parameter counts from the specs;
  nothing is traced or built)."""
  import textwrap  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  rows = [("model", "Keras name", "input", "preprocess", "parameters")]
  options: dict[str, str] = {}
  for name in models.list_models():
    spec = models.get_spec(name)
    h, w, c = spec.input_shape
    rows.append((name, spec.keras_name, f"{h}x{w}x{c}", spec.preprocess,
                 "?" if spec.params is None else f"{spec.params:,}"))
    if spec.options:
      options.setdefault(spec.family, ", ".join(
          f"--{k}={v}" if k in FLAG_OPTIONS else f"{k}={v}"
          for k, v in spec.options.items()))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  for r in rows:
    print("  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths))).rstrip())
  print("\nOptions by family (--flags on the command line; the others only "
        "through\nmodels.create(NAME, option=value)):")
  for family, text in options.items():
    print(textwrap.fill(text, width, initial_indent=f"  {family}: ",
                        subsequent_indent="    "))


# The create() options a flag sets, with the flags' defaults.
_DEFAULTS = dict(include_top=True, classes=1000, pooling=None,
                 classifier_activation="softmax")
# Options that change the variables' shapes: a flag that contradicts a
# sidecar here cannot be honoured with its variables.
_SHAPE_OPTIONS = ("include_top", "classes", "alpha", "depth_multiplier",
                  "minimalistic")


def _given_kwargs() -> dict[str, Any]:
  """The ``create`` options of the flags given on the command line (the
  others come from a whole-model file, a sidecar or the defaults)."""
  kwargs: dict[str, Any] = {}
  for flag in (_INCLUDE_TOP, _CLASSES, _POOLING, _ALPHA, _DEPTH_MULTIPLIER,
               _MINIMALISTIC, _INCLUDE_PREPROCESSING):
    if flag.present:
      kwargs[flag.name] = flag.value
  if _CLASSIFIER_ACTIVATION.present:
    kwargs["classifier_activation"] = (
        None if _CLASSIFIER_ACTIVATION.value == "none"
        else _CLASSIFIER_ACTIVATION.value)
  if _INPUT_SHAPE.present:
    try:
      kwargs["input_shape"] = tuple(int(s) for s in _INPUT_SHAPE.value)
    except ValueError:
      raise UserError(f"--input_shape {','.join(_INPUT_SHAPE.value)} is not "
                      "height,width,channels integers, e.g. 224,224,3"
                      ) from None
  return kwargs


def _is_translation(path: str) -> bool:
  """Whether ``path`` is this tool's own output: a ``.msgpack`` file or an
  orbax checkpoint directory."""
  return path.endswith(".msgpack") or os.path.isdir(path)


def _weights_arg(weights: str) -> str:
  if weights in ("imagenet", "random"):
    return weights
  if not os.path.exists(weights):
    raise UserError(f"--weights {weights!r} is not imagenet, random or an "
                    "existing file")
  if not (weights.endswith((".h5", ".keras")) or _is_translation(weights)):
    raise UserError(f"--weights {weights!r}: expected a Keras weights file "
                    "(.weights.h5, .h5 or .keras) or this tool's output (a "
                    ".msgpack or an orbax directory)")
  return weights


def _from_sidecar(source: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """``(model name, create kwargs, sidecar)`` for a saved translation: the
  model and options its sidecar records, with the flags given on top.

  A flag that changes the variables' shapes and contradicts the sidecar
  (``--classes 10`` for a 1000-class translation), or a ``--model`` other
  than the sidecar's, is one error line; the other flags override.
  """
  import translate  # pylint: disable=g-import-not-at-top
  side = translate.sidecar_path(source)
  meta: dict[str, Any] = {}
  if os.path.isfile(side):
    try:
      meta = translate.load_metadata(source)
    except (OSError, ValueError) as e:
      raise UserError(f"cannot read {side}: {' '.join(str(e).split())} (is "
                      "it the sidecar this tool wrote?)") from None
    if not isinstance(meta, dict):
      raise UserError(f"{side} is not the sidecar this tool writes (a JSON "
                      "object)")
  given = _given_kwargs()
  recorded = meta.get("model")
  if _MODEL.value and recorded:
    import models  # pylint: disable=g-import-not-at-top
    if models.get_spec(_MODEL.value).name != recorded:
      raise UserError(f"--model {_MODEL.value} contradicts {side}, which "
                      f"records model {recorded!r}; drop --model (the "
                      "sidecar names it)")
  name = _MODEL.value or recorded
  if not name:
    raise UserError(f"{source} has no sidecar naming its model ({side}); "
                    "pass --model and the options it was translated with")
  kwargs = dict(meta.get("create_kwargs") or {})
  if "input_shape" in kwargs and kwargs["input_shape"] is not None:
    kwargs["input_shape"] = tuple(kwargs["input_shape"])
  for key, value in given.items():
    if key in _SHAPE_OPTIONS and key in kwargs and kwargs[key] != value:
      raise UserError(
          f"--{key} {value} contradicts {side}, which records "
          f"{key}={kwargs[key]!r} for these variables; drop --{key} (the "
          "sidecar fixes it)")
  kwargs.update(given)
  return name, {**_DEFAULTS, **kwargs}, meta


def _load_translation(source: str) -> dict[str, Any]:
  """Variables of a saved translation, or one error line."""
  import translate  # pylint: disable=g-import-not-at-top
  try:
    variables = translate.load_variables(source)
  except Exception as e:  # pylint: disable=broad-except
    message = " ".join(str(e).split()) or type(e).__name__
    if source in message:
      raise UserError(message) from None
    raise UserError(f"cannot read {source}: {message} (is it truncated or "
                    "not a msgpack of Flax variables?)") from None
  if not isinstance(variables, dict) or "params" not in variables:
    raise UserError(f"{source} is not a msgpack of Flax variables (no "
                    "'params' collection)")
  translate.safe_files.check_finite_tree(source, variables)  # NaN/Inf: refused
  return variables


def _check_export_flags(tflite_path: str) -> None:
  """Refuses export flag combinations before any work is done."""
  if _EXPORT.value and os.path.exists(tflite_path) and not _OVERWRITE.value:
    raise UserError(f"{tflite_path} already exists; pass --overwrite to "
                    "replace it or choose another --output")
  if _CALIBRATION.value and _QUANTIZE.value != "int8":
    raise UserError("--calibration is only used with --quantize int8")
  if not _EXPORT.value and (_QUANTIZE.value != "none"
                            or _DYNAMIC_BATCH.value):
    raise UserError("--quantize and --dynamic_batch only apply with "
                    "--export tflite")
  if _DYNAMIC_BATCH.value and _QUANTIZE.value == "int8":
    raise UserError("--quantize int8 needs a static batch; drop "
                    "--dynamic_batch")
  if _CALIBRATION.value and not (os.path.isdir(_CALIBRATION.value) or (
      _CALIBRATION.value.endswith(".npy")
      and os.path.isfile(_CALIBRATION.value))):
    raise UserError(f"--calibration {_CALIBRATION.value} is neither a "
                    "directory nor an existing .npy file")


def _parity_or_fail(parity: Any, name: str,
                    float64: Callable[[], Any] | None = None) -> Any:
  """Prints the parity report; a float32 failure is checked again in
  float64 by ``float64()`` (a ``check_parity(..., float64=True)``), when
  given: equal there, the translation is exact and the float32 difference
  is rounding the weights amplify, so the run goes on. Returns the float64
  report, or None when float32 passed or no recheck was given."""
  print("  " + parity.summary())
  if parity.passed:
    return None
  again = None
  if float64 is not None:
    again = float64()
    print("  " + again.summary())
    if again.passed:
      print(f"  float32 rounding, not the translation: in float64 Flax and "
            f"Keras agree to {again.max_rel:.2g} (these weights amplify "
            "float32 rounding)")
      return again
  if not _KEEP_FAILED.value:
    also = (f", {again.max_rel:.3g} in float64" if again is not None else "")
    raise UserError(
        f"parity check failed for {name} (relative difference "
        f"{parity.max_rel:.3g} > {parity.tolerance:g}{also}); nothing "
        "written (--keep_failed writes anyway)")
  return again


def _float64_check(module: Any, variables: Any, keras_model: Any, name: str,
                   input_shape: tuple[int, ...]) -> Callable[[], Any]:
  """The float64 recheck ``_parity_or_fail`` runs after a float32 failure:
  the same inputs through ``float64_twin(keras_model)`` and the module in
  float64."""
  import translate  # pylint: disable=g-import-not-at-top

  def check() -> Any:
    return translate.check_parity(
        module, variables, translate.parity.float64_twin(keras_model), name,
        input_shape=input_shape, seed=_SEED.value, float64=True)
  return check


def _parity_metadata(parity: Any, parity64: Any = None
                     ) -> dict[str, Any] | None:
  """The sidecar's record of the parity check; ``parity64`` the float64
  recheck that passed where float32 did not."""
  if parity is None:
    return None
  out = {"max_abs": parity.max_abs, "max_rel": parity.max_rel,
         "top1_agreement": parity.top1_agreement,
         "tolerance": parity.tolerance, "passed": parity.passed,
         "images": parity.batch, "logits": parity.logits}
  if parity64 is not None:
    out["float64"] = {"max_rel": parity64.max_rel,
                      "tolerance": parity64.tolerance,
                      "passed": parity64.passed}
  return out


def _save(output: str, variables: Any, metadata: dict[str, Any],
          timings: dict[str, float]) -> None:
  import translate  # pylint: disable=g-import-not-at-top
  if output.startswith("translated" + os.sep):
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with _phase("write", timings):
    try:
      paths = translate.save_variables(output, variables, metadata,
                                       format=_FORMAT.value,
                                       overwrite=_OVERWRITE.value)
    except FileExistsError as e:  # created meanwhile by another run
      raise UserError(" ".join(str(e).split())) from None
  print(f"wrote {paths[0]} and {paths[1]}")


def run() -> int:
  """The whole job; returns the exit code. Raises on errors."""
  if _API.present and not _EMIT_SOURCE.value:
    raise UserError(f"--api {_API.value} chooses the Flax API of "
                    "--emit_source's file; pass --emit_source GEN.py with it")
  import jax  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from translate import keras_build  # pylint: disable=g-import-not-at-top

  if _LIST.value:
    list_models()
    return 0
  if _TO_KERAS.value:
    return to_keras_run()
  if _MODEL.value and not _is_translation(_WEIGHTS.value):
    # A bad --input_shape is reported before the weights are looked at.
    models.resolve_input_shape(models.get_spec(_MODEL.value).name,
                               _given_kwargs().get("input_shape"))
  weights = _weights_arg(_WEIGHTS.value)
  if _is_translation(weights):
    return recheck_run(weights)
  if not _MODEL.value:
    if weights not in ("imagenet", "random"):
      return graph_run(weights)
    raise UserError("--model is required with --weights imagenet or random "
                    "(see --list for the names); a whole-model file "
                    "(--weights my_model.keras) needs none")
  if _EMIT_SOURCE.value:
    raise UserError("--emit_source writes the source of a whole Keras model "
                    "file: drop --model (a registered model's source is "
                    "models/ itself)")
  _refuse_other_architecture(weights, _MODEL.value)
  spec = models.get_spec(_MODEL.value)
  given = _given_kwargs()
  # A bad --input_shape is reported before any weights file is read.
  models.resolve_input_shape(spec.name, given.get("input_shape"))
  # The one merge of a whole-model file's options with the flags given.
  kwargs = {**_DEFAULTS,
            **keras_build.resolve_options(spec.name, weights, given)}
  input_shape = kwargs["input_shape"]
  module_kwargs = dict(kwargs)
  if weights == "imagenet":
    module_kwargs.update(spec.imagenet_options)
  module = models.create(spec.name, **module_kwargs)
  output = _OUTPUT.value or default_output(spec.name, kwargs,
                                           spec.input_shape, _FORMAT.value)
  check_output(output, _OVERWRITE.value, _FORMAT.value)
  tflite_path = tflite_output(output, _QUANTIZE.value)
  _check_export_flags(tflite_path)

  print(f"{spec.keras_name}: weights={weights}, input {input_shape}")
  timings: dict[str, float] = {}
  with _phase("keras build", timings):
    with keras_build.record_downloads() as fetched:
      keras_model = keras_build.build_model(spec.name, weights,
                                            seed=_SEED.value, **kwargs)
  with _phase("translate", timings):
    variables, report = translate.translate(module, keras_model, input_shape)
  print(report.table())

  parity = None
  parity64 = None
  if _CHECK.value:
    with _phase("parity", timings):
      parity = translate.check_parity(module, variables, keras_model,
                                      spec.name, input_shape=input_shape,
                                      seed=_SEED.value)
      parity64 = _parity_or_fail(parity, spec.name, _float64_check(
          module, variables, keras_model, spec.name, input_shape))

  source = weights if weights != "imagenet" else (fetched[-1] if fetched
                                                  else None)
  import flax  # pylint: disable=g-import-not-at-top
  metadata = {
      "model": spec.name,
      "keras_name": spec.keras_name,
      "create_kwargs": {**module_kwargs,
                        "input_shape": list(input_shape)},
      "input_shape": list(input_shape),
      "preprocess": spec.preprocess,
      "weights": weights if weights in ("imagenet", "random")
                 else os.path.basename(weights),
      "seed": _SEED.value if weights == "random" else None,
      "weights_sha256": (translate.sha256_file(source)
                         if source and os.path.isfile(source) else None),
      "versions": {"keras": keras_build.keras_version(keras_model),
                   "flax": flax.__version__, "jax": jax.__version__},
      "translation": {"match_counts": report.match_counts,
                      "params": report.params, "stats": report.stats},
      "parity": _parity_metadata(parity, parity64),
  }
  _save(output, variables, metadata, timings)
  if _EXPORT.value:
    export_phase(spec, module, variables, keras_model, input_shape,
                 tflite_path, timings)
  return 0


def _refuse_other_architecture(weights: str, name: str) -> None:
  """With ``--model NAME`` and a whole-model file that is not ``NAME`` as
  registered (a Sequential or a graph around a nested model: a new head),
  say so and point at the whole-model route, before any weights are read."""
  if weights in ("imagenet", "random"):
    return
  import models  # pylint: disable=g-import-not-at-top
  from translate import weights_files  # pylint: disable=g-import-not-at-top
  config = weights_files.model_config(weights)
  if config is None:
    return
  nested = [l.get("class_name") for l in config.get("config", {}).get(
      "layers", []) if isinstance(l.get("config"), dict)
            and "layers" in l["config"]]
  if config.get("class_name") == "Sequential" or nested:
    spec = models.get_spec(name)
    raise UserError(
        f"{weights} holds a {config.get('class_name')} model with "
        f"{len(nested)} nested model(s) and its own layers, not "
        f"{spec.keras_name} as Keras builds it (a new head?); drop --model "
        "to translate the whole model in the file")


def graph_run(path: str) -> int:
  """``--weights FILE`` without ``--model``: the whole Keras model in a
  ``.keras`` or whole-model ``.h5`` file, translated layer by layer
  (``translate.from_keras``), checked on random inputs built from its input
  specs, written with its sidecar, and with ``--emit_source`` its Flax
  source."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from translate import keras_build, parity as parity_lib  # pylint: disable=g-import-not-at-top
  from translate.from_keras import load_keras  # pylint: disable=g-import-not-at-top
  if path.endswith(".weights.h5"):
    raise UserError(f"--weights {path} holds weights only, no architecture: "
                    "pass --model NAME for a registered application, or save "
                    "the whole model (model.save('model.keras'))")
  for flag in (_INCLUDE_TOP, _CLASSES, _POOLING, _CLASSIFIER_ACTIVATION,
               _INPUT_SHAPE, _ALPHA, _DEPTH_MULTIPLIER, _MINIMALISTIC,
               _INCLUDE_PREPROCESSING):
    if flag.present:
      raise UserError(f"--{flag.name} applies to a registered --model; the "
                      f"file {path} fixes its whole architecture")
  stem = os.path.basename(path)
  for ext in (".keras", ".h5"):
    stem = stem[: -len(ext)] if stem.endswith(ext) else stem
  output = _OUTPUT.value or default_output(stem, {}, (), _FORMAT.value)
  check_output(output, _OVERWRITE.value, _FORMAT.value)
  tflite_path = tflite_output(output, _QUANTIZE.value)
  _check_export_flags(tflite_path)
  emit_path = _EMIT_SOURCE.value
  if emit_path:
    if not emit_path.endswith(".py"):
      raise UserError(f"--emit_source {emit_path!r} must end with .py")
    if os.path.exists(emit_path) and not _OVERWRITE.value:
      raise UserError(f"{emit_path} already exists; pass --overwrite to "
                      "replace it or choose another --emit_source")
    if not os.path.isdir(os.path.dirname(os.path.abspath(emit_path))):
      raise UserError(f"--emit_source {emit_path}: its directory does not "
                      "exist")

  print(f"{path}: the whole Keras model")
  timings: dict[str, float] = {}
  with _phase("keras load", timings):
    keras_model = load_keras(path)
  with _phase("translate", timings):
    module, variables, report = translate.from_keras(keras_model)
  apps = ", ".join(f"{k} = models.create({v!r})"
                   for k, v in report.applications.items())
  print(f"  {report.class_name}: {report.layers} Keras layer(s) translated"
        f"{'; ' + apps if apps else ''}; {report.params:,} parameters, "
        f"{report.stats:,} batch statistics")
  parity = None
  if _CHECK.value:
    with _phase("parity", timings):
      parity = parity_lib.check_graph_parity(module, variables, keras_model,
                                             seed=_SEED.value)
    _parity_or_fail(parity, keras_model.name)
  metadata = {
      "model": None,
      "keras_model": keras_model.name,
      "keras_file": os.path.abspath(path),
      "weights": os.path.basename(path),
      "weights_sha256": translate.sha256_file(path),
      "class_name": report.class_name,
      "input_specs": [{"shape": list(s), "dtype": d}
                      for s, d in report.input_specs],
      "applications": report.applications,
      "versions": {"keras": keras_build.keras_version(keras_model),
                   "flax": flax.__version__, "jax": jax.__version__},
      "translation": {"layers": report.layers, "params": report.params,
                      "stats": report.stats},
      "parity": _parity_metadata(parity),
  }
  _save(output, variables, metadata, timings)
  if emit_path:
    source = report.source
    usage = (f"create().apply(translate.load_variables({output!r}), "
             "*inputs)")
    if _API.value == "nnx":
      from translate.from_keras import nnx_source  # pylint: disable=g-import-not-at-top
      source = nnx_source(keras_model)
      usage = f"create(translate.load_variables({output!r}))(*inputs)"
    translate.io.write_files_atomically([emit_path], [source.encode()],
                                        overwrite=_OVERWRITE.value)
    print(f"wrote {emit_path}: {usage}")
  if _EXPORT.value:
    graph_export(module, variables, keras_model, report, tflite_path,
                 timings)
  return 0


def graph_export(module, variables, keras_model, report, path,
                 timings) -> None:
  """TFLite export of a whole-model translation, checked against Flax and
  Keras on random inputs from its input specs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from translate import export, parity as parity_lib  # pylint: disable=g-import-not-at-top
  if _QUANTIZE.value == "int8":
    raise UserError("--quantize int8 needs calibration images: it applies "
                    "to registered image models (--model)")
  specs = [((1, *[8 if d is None else d for d in s]), np.dtype(d))
           for s, d in report.input_specs]
  with _phase("export", timings):
    flatbuffer = export.export_tflite(
        module.apply, variables, specs, quantize=_QUANTIZE.value,
        dynamic_batch=_DYNAMIC_BATCH.value)
    translate.io.write_files_atomically([path], [flatbuffer],
                                        overwrite=_OVERWRITE.value)
  ops = export.tflite_ops(flatbuffer)
  print(f"wrote {path} ({len(flatbuffer) / 2**20:.1f} MiB, "
        f"{sum(ops.values())} ops)")
  inputs = parity_lib.graph_inputs(keras_model, batch=1, seed=_SEED.value + 1)
  interp = export.load_interpreter(flatbuffer)
  out = export.run_tflite(interp, *inputs)
  out = out if isinstance(out, (list, tuple)) else [out]
  with parity_lib.full_float32():
    ref = keras_model(inputs if len(inputs) > 1 else inputs[0],
                      training=False)
  refs = ref if isinstance(ref, (list, tuple)) else [ref]
  worst = max(float(np.max(np.abs(np.asarray(o, np.float64) - np.asarray(r))))
              / max(1.0, float(np.max(np.abs(np.asarray(r)))))
              for o, r in zip(out, refs))
  print(f"  TFLite vs Keras: relative {worst:.3g}")
  if _QUANTIZE.value == "none" and worst > parity_lib.GRAPH_TOLERANCE:
    os.remove(path)
    raise UserError(f"TFLite export differs from Keras by {worst:.3g} (> "
                    f"{parity_lib.GRAPH_TOLERANCE:g}); {path} removed")


def recheck_run(source: str) -> int:
  """``--weights X.msgpack`` (or an orbax directory): this tool's own or a
  fine-tuned translation, re-checked against Keras' model holding the same
  variables (``translate.to_keras``), written again only to a given
  ``--output``, and exported with ``--export`` (beside ``X`` by default).
  """
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  name, kwargs, meta = _from_sidecar(source)
  spec = models.get_spec(name)
  input_shape = models.resolve_input_shape(spec.name,
                                           kwargs.get("input_shape"))
  kwargs["input_shape"] = input_shape
  output = _OUTPUT.value
  if output:
    check_output(output, _OVERWRITE.value, _FORMAT.value)
  if not (output or _EXPORT.value or _CHECK.value):
    raise UserError(f"--weights {source} with --nocheck and neither "
                    "--output nor --export does nothing; pass --export "
                    "tflite or --output")
  base = output or (source[: -len(".msgpack")] if source.endswith(".msgpack")
                    else source.rstrip(os.sep))
  tflite_path = tflite_output(base + ".msgpack", _QUANTIZE.value)
  _check_export_flags(tflite_path)
  variables = _load_translation(source)
  module = models.create(spec.name, **kwargs)
  print(f"{spec.keras_name}: Flax {source}, input {input_shape}")
  timings: dict[str, float] = {}
  keras_model = None
  parity = None
  parity64 = None
  if _CHECK.value or _EXPORT.value:
    with _phase("keras build", timings):
      try:
        keras_model = translate.to_keras(spec.name, variables, **kwargs)
      except (translate.MatchError, translate.MergeError) as e:
        raise UserError(f"{source} does not fit {spec.name} with the "
                        f"options {_options_text(kwargs)}: {e}") from None
  if _CHECK.value:
    with _phase("parity", timings):
      parity = translate.check_parity(module, variables, keras_model,
                                      spec.name, input_shape=input_shape,
                                      seed=_SEED.value)
      parity64 = _parity_or_fail(parity, spec.name, _float64_check(
          module, variables, keras_model, spec.name, input_shape))
  if output:
    metadata = {**meta, "model": spec.name, "keras_name": spec.keras_name,
                "create_kwargs": {**kwargs, "input_shape": list(input_shape)},
                "input_shape": list(input_shape),
                "translated_from": os.path.basename(source.rstrip(os.sep)),
                "parity": _parity_metadata(parity, parity64)}
    metadata.pop("variables_sha256", None)  # the new file's is recorded anew
    _save(output, variables, metadata, timings)
  if _EXPORT.value:
    export_phase(spec, module, variables, keras_model, input_shape,
                 tflite_path, timings)
  return 0


def _options_text(kwargs: dict[str, Any]) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))


def to_keras_run() -> int:
  """``--to_keras``: Flax msgpack -> Keras ``.weights.h5``, checked, atomic.

  The model and its options come from the msgpack's sidecar (flags given
  override, see ``_from_sidecar``). The weights are written to a temporary
  file beside the output, loaded into a fresh Keras model with Keras' own
  ``load_weights`` and compared with the Flax model (the forward direction's
  tolerance); only then is the file renamed into place.
  """
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from translate.to_keras import atomic_weights_path  # pylint: disable=g-import-not-at-top
  source = _TO_KERAS.value
  if flags.FLAGS["weights"].present or _EXPORT.value:
    raise UserError("--to_keras reads the weights from its msgpack; "
                    "--weights and --export do not apply")
  if not (os.path.isfile(source) or os.path.isdir(source)):
    raise UserError(f"--to_keras {source!r} is not an existing file or "
                    "orbax directory")
  side = translate.sidecar_path(source)
  if os.path.isfile(side) and not _MODEL.value:
    meta = _from_sidecar_graph(source)
    if meta is not None:
      return graph_to_keras_run(source, meta)
  name, kwargs, _ = _from_sidecar(source)
  spec = models.get_spec(name)
  input_shape = models.resolve_input_shape(spec.name,
                                           kwargs.get("input_shape"))
  kwargs["input_shape"] = input_shape
  stem = (os.path.splitext(source)[0] if os.path.isfile(source)
          else source.rstrip(os.sep))
  output = _OUTPUT.value or stem + ".weights.h5"
  if not output.endswith(".weights.h5"):
    raise UserError(f"--output {output!r} must end with .weights.h5 (Keras "
                    "3 loads weights files by that suffix)")
  if os.path.exists(output) and not _OVERWRITE.value:
    raise UserError(f"{output} already exists; pass --overwrite to replace "
                    "it or choose another --output")
  directory = os.path.dirname(os.path.abspath(output))
  try:  # a real probe, as in check_output
    tempfile.TemporaryFile(dir=directory).close()
  except OSError as e:
    raise UserError(f"output directory {directory} does not exist or is not "
                    f"writable ({e.strerror}); choose another --output"
                    ) from None
  variables = _load_translation(source)

  print(f"{spec.keras_name}: Flax {source} -> Keras, input {input_shape}")
  timings: dict[str, float] = {}
  with _phase("to keras", timings):
    try:
      keras_model = translate.to_keras(spec.name, variables, **kwargs)
    except (translate.MatchError, translate.MergeError) as e:
      raise UserError(f"{source} does not fit {spec.name} (check --model, "
                      f"--include_top, --classes and the options): {e}"
                      ) from None
  with atomic_weights_path(output) as tmp:
    with _phase("write", timings):
      keras_model.save_weights(tmp)
    if _CHECK.value:
      with _phase("parity", timings):
        reloaded = translate.build_keras(spec.name, None, **kwargs)
        reloaded.load_weights(tmp)  # Keras' own loader, as a user would
        module = models.create(spec.name, **kwargs)
        parity = translate.check_parity(
            module, variables, reloaded, spec.name, input_shape=input_shape,
            seed=_SEED.value)
        _parity_or_fail(parity, spec.name, _float64_check(
            module, variables, reloaded, spec.name, input_shape))
  print(f"wrote {output}: {spec.keras_name}(weights=None, <the same "
        "arguments>).load_weights() loads it")
  return 0


def _from_sidecar_graph(source: str) -> dict[str, Any] | None:
  """The sidecar of a whole-model translation (``keras_file`` recorded, no
  registered ``model``), or None for any other sidecar."""
  import translate  # pylint: disable=g-import-not-at-top
  try:
    meta = translate.load_metadata(source)
  except (OSError, ValueError):
    return None
  if isinstance(meta, dict) and meta.get("keras_file") and not meta.get(
      "model"):
    return meta
  return None


def _weights_path(output: str) -> None:
  """Refuses a ``--to_keras`` output that Keras cannot load or that exists."""
  if not output.endswith(".weights.h5"):
    raise UserError(f"--output {output!r} must end with .weights.h5 (Keras "
                    "3 loads weights files by that suffix)")
  if os.path.exists(output) and not _OVERWRITE.value:
    raise UserError(f"{output} already exists; pass --overwrite to replace "
                    "it or choose another --output")
  directory = os.path.dirname(os.path.abspath(output))
  try:  # a real probe, as in check_output
    tempfile.TemporaryFile(dir=directory).close()
  except OSError as e:
    raise UserError(f"output directory {directory} does not exist or is not "
                    f"writable ({e.strerror}); choose another --output"
                    ) from None


def graph_to_keras_run(source: str, meta: dict[str, Any]) -> int:
  """``--to_keras`` of a whole-model translation: the variables (e.g.
  fine-tuned) go back into the user's own Keras model, rebuilt from the
  file the sidecar records (its sha256 checked), and are written as a
  ``.weights.h5`` that ``model.load_weights`` loads. The check: the written
  file, loaded by Keras into a fresh copy of the model and translated
  again, gives back the same variables bit for bit."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from translate.from_keras import load_keras  # pylint: disable=g-import-not-at-top
  from translate.to_keras import atomic_weights_path  # pylint: disable=g-import-not-at-top
  keras_file = meta["keras_file"]
  if not os.path.isfile(keras_file):
    raise UserError(f"{source} was translated from {keras_file}, which no "
                    "longer exists; translate.to_keras(model, variables) "
                    "takes the model object")
  if translate.sha256_file(keras_file) != meta.get("weights_sha256"):
    raise UserError(f"{keras_file} changed since {source} was translated "
                    "from it (its sha256 differs from the sidecar's); "
                    "translate it again")
  stem = (os.path.splitext(source)[0] if os.path.isfile(source)
          else source.rstrip(os.sep))
  output = _OUTPUT.value or stem + ".weights.h5"
  _weights_path(output)
  variables = _load_translation(source)
  print(f"{keras_file}: Flax {source} -> Keras")
  timings: dict[str, float] = {}
  with _phase("to keras", timings):
    try:
      keras_model = translate.to_keras(keras_file, variables)
    except (translate.MatchError, translate.MergeError) as e:
      raise UserError(f"{source} does not fit the model in {keras_file}: "
                      f"{e}") from None
  with atomic_weights_path(output) as tmp:
    with _phase("write", timings):
      keras_model.save_weights(tmp)
    if _CHECK.value:
      with _phase("check", timings):
        fresh = load_keras(keras_file)
        fresh.load_weights(tmp)  # Keras' own loader, as a user would
        _, again, _ = translate.from_keras(fresh)
        same = jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
            translate.io.to_numpy(variables), again))
      if not same:
        raise UserError(f"the weights written for {keras_file} do not give "
                        f"back {source} bit for bit; nothing written")
      print("  round trip: the written weights translate back bit for bit")
  print(f"wrote {output}: load it with model.load_weights({output!r})")
  return 0


def tflite_output(msgpack_path: str, quantize: str) -> str:
  """``translated/resnet50.msgpack`` -> ``translated/resnet50[.<q>].tflite``."""
  root = msgpack_path[: -len(".msgpack")] if msgpack_path.endswith(
      ".msgpack") else msgpack_path  # an orbax checkpoint directory
  return root + ("" if quantize == "none" else f".{quantize}") + ".tflite"


def load_calibration(path: str | None, spec: Any, input_shape: tuple[int, ...],
                     count: int = 8) -> list[Any]:
  """int8 calibration inputs (preprocessed, batch 1 each)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  if path is None:
    images = translate.random_images(input_shape, count, seed=_SEED.value)
  elif path.endswith(".npy"):
    try:
      images = np.load(path, allow_pickle=False)  # never unpickle
    except (OSError, ValueError) as e:
      raise UserError(f"--calibration {path}: cannot read it as a numeric "
                      f".npy array ({e})") from None
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(input_shape):
      raise UserError(f"--calibration {path} holds shape {images.shape}; "
                      f"expected (N, {', '.join(map(str, input_shape))})")
  elif os.path.isdir(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp",
                                          ".gif")))
    if not files:
      raise UserError(f"--calibration {path} has no .jpg/.png/.bmp/.gif "
                      "images")
    images = np.stack([
        tf.image.resize(tf.io.decode_image(tf.io.read_file(f), channels=3,
                                           expand_animations=False),
                        input_shape[:2]).numpy() for f in files[:100]])
  else:
    raise UserError(f"--calibration {path} is neither a directory nor a "
                    ".npy file")
  x = np.asarray(models.preprocess(spec.name, images.astype(np.float32)))
  return [(x[i:i + 1],) for i in range(len(x))]


def export_phase(spec, module, variables, keras_model, input_shape, path,
                 timings) -> None:
  """Exports to TFLite, writes it atomically, checks it against Flax and
  Keras with the LiteRT interpreter."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from translate import export  # pylint: disable=g-import-not-at-top
  quantize = _QUANTIZE.value
  data = (load_calibration(_CALIBRATION.value, spec, input_shape)
          if quantize == "int8" else None)
  with _phase("export", timings):
    flatbuffer = export.export_tflite(
        module.apply, variables, [((1, *input_shape), np.float32)],
        quantize=quantize, dynamic_batch=_DYNAMIC_BATCH.value,
        representative_data=data)
    translate.io.write_files_atomically([path], [flatbuffer],
                                        overwrite=_OVERWRITE.value)
  ops = export.tflite_ops(flatbuffer)
  flex = [o for o in ops if o.startswith("CUSTOM")]
  print(f"wrote {path} ({len(flatbuffer) / 2**20:.1f} MiB, "
        f"{sum(ops.values())} ops{', custom: ' + str(flex) if flex else ''})")
  images = translate.random_images(input_shape, 4, seed=_SEED.value + 1)
  x = np.asarray(models.preprocess(spec.name, images))
  interp = export.load_interpreter(flatbuffer)
  out = np.concatenate([export.run_tflite(interp, x[i:i + 1])[0]
                        for i in range(len(x))])
  with translate.parity.full_float32():  # no TF32 on a GPU
    flax_out = np.asarray(jax.jit(module.apply)(variables, x))
    keras_out = np.asarray(keras_model(x, training=False))
  figures = {what: export.compare(out, ref)
             for what, ref in (("Flax", flax_out), ("Keras", keras_out))}
  for what, c in figures.items():
    print(f"  TFLite vs {what}: max |Δ| {c['max_abs']:.3g}, relative "
          f"{c['max_rel']:.3g}, top-1 agreement {c['top1_agreement']:.0%} "
          f"on {len(x)} images")
  c = figures["Flax"]
  if quantize == "none" and c["max_rel"] > translate.TOLERANCE:
    os.remove(path)
    raise UserError(f"TFLite export of {spec.name} differs from Flax by "
                    f"{c['max_rel']:.3g} (> {translate.TOLERANCE:g}); "
                    f"{path} removed")


def main(argv: list[str]) -> int:
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)  # JAX's backend probing, etc.
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; flags look like "
          "--model resnet50", file=sys.stderr)
    return 2
  try:
    return run()
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if _VERBOSE.value:
      traceback.print_exc()
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return 1


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag value as one ``error:`` line (exit 2)
  instead of absl's multi-line ``FATAL Flags parsing error`` block."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = " ".join(str(e).split())
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def usage() -> None:
  """What ``python main.py`` with no arguments prints."""
  prog = os.path.basename(sys.argv[0])
  text = __doc__.strip()
  print(text.replace("python main.py", prog) if prog == "keras2flax"
        else text)


def cli() -> None:
  """The ``keras2flax`` command (``pip install .``): ``python main.py``."""
  if len(sys.argv) == 1:
    usage()
    sys.exit(0)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
