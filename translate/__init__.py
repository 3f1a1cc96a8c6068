"""Generic Keras -> Flax weight translation.

Matching, einops rules chosen by Keras layer class, strict merge, parity,
save/load. Nothing here knows a model by name; model knowledge lives in
``models``.
"""

from translate.core import (Conversion, MergeError, TranslationReport,
                            build_keras, convert, merge, translate,
                            variable_shapes)
from translate.export import (export_tflite, load_interpreter, run_tflite,
                              tflite_graph, tflite_ops, unfolded_affine_ops)
from translate.fold import conv_bn_pairs, fold_batchnorm
from translate.io import (load_metadata, load_variables, save_variables,
                          sha256_file, sidecar_path)
from translate.match import Match, MatchError, match
from translate.parity import (ParityReport, TOLERANCE, check_parity,
                              random_images)
from translate.rules import DROP, RULES, Rule
from translate.to_keras import FoldedVariablesError, to_keras

__all__ = [
    "Conversion", "DROP", "Match", "MatchError", "MergeError",
    "ParityReport", "RULES", "Rule", "TOLERANCE", "TranslationReport",
    "build_keras", "check_parity", "export_tflite", "load_interpreter",
    "run_tflite", "tflite_graph", "tflite_ops", "unfolded_affine_ops",
    "conv_bn_pairs", "fold_batchnorm", "convert", "load_metadata",
    "load_variables", "match", "merge", "random_images", "save_variables",
    "sha256_file", "sidecar_path", "translate", "variable_shapes",
]
