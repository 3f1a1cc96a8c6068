"""Generic Keras -> Flax weight translation.

Matching, einops rules chosen by Keras layer class, strict merge, parity,
save/load. Nothing here knows a model by name; model knowledge lives in
``models``.

Submodules, each the one home of its names: ``keras_io`` (reading a built
Keras model), ``keras_build`` (building one), ``weights_files`` (reading
weights files), ``safe_files`` (weights files as hostile input), ``random_weights`` (randomizing a model for parity tests),
``rules``, ``core`` (strict merge, ``translate``, ``convert``), ``parity``,
``io`` (saving and loading variables), ``fold``, ``export``, ``graph``,
``emit``, ``layer_table`` and ``from_keras`` (any Keras model); ``match``,
``to_keras`` and ``to_nnx`` (with ``from_nnx``: Flax NNX) are here as the
functions of those modules. The names most
callers need are also here.
"""

# pylint: disable=unused-import
from translate import (core, emit, export, fold, graph,  # noqa: F401
                       io, keras_build, keras_io, layer_table, parity,
                       random_weights, rules, safe_files, weights_files)
# pylint: enable=unused-import

from translate.core import (Conversion, MergeError, TranslationReport,
                            convert, merge, translate, variable_shapes)
from translate.export import (export_tflite, load_interpreter, run_tflite,
                              tflite_graph, tflite_ops, unfolded_affine_ops)
from translate.fold import conv_bn_pairs, fold_batchnorm
from translate.from_keras import FromKerasReport, emit_source, from_keras
from translate.keras_build import build_keras
from translate.io import (VariablesFileError, load_metadata, load_variables,
                          save_variables, sha256_file, sidecar_path)
from translate.match import Match, MatchError, match
from translate.parity import (ParityReport, TOLERANCE, check_parity,
                              random_images)
from translate.layer_table import register_layer
from translate.rules import DROP, RULES, Rule
from translate.to_keras import FoldedVariablesError, to_keras
from translate.to_nnx import LinenModel, from_nnx, to_nnx

__all__ = [
    "Conversion", "DROP", "Match", "MatchError", "MergeError",
    "ParityReport", "RULES", "Rule", "TOLERANCE", "TranslationReport",
    "build_keras", "check_parity", "export_tflite", "load_interpreter",
    "run_tflite", "tflite_graph", "tflite_ops", "unfolded_affine_ops",
    "conv_bn_pairs", "fold_batchnorm", "convert", "load_metadata",
    "FromKerasReport", "emit_source", "from_keras", "register_layer",
    "load_variables", "match", "merge", "random_images", "save_variables",
    "sha256_file", "sidecar_path", "VariablesFileError", "translate",
    "variable_shapes", "LinenModel", "to_nnx", "from_nnx",
]
