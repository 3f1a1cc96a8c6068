"""Flax linen ports of Keras Applications models.

Usage::

  import models
  module = models.create("resnet50", classifier_activation=None)
  logits = module.apply(variables, models.preprocess("resnet50", images))
"""

from __future__ import annotations

from models.registry import (ModelSpec, UnknownModelError, get_spec,
                             list_models, register, suggest)
from models.factory import (create, decode_predictions, preprocess,
                            resolve_input_shape)
from models.flax_layer import keras_layer
from models.inference import Inference
from models.preprocess import preprocess_mode
# Importing a family module registers its models.
# pylint: disable=unused-import
from models import resnet  # noqa: F401
from models import densenet  # noqa: F401
from models import mobilenet_v2  # noqa: F401
from models import efficientnet  # noqa: F401
from models import efficientnet_v2  # noqa: F401
from models import inception_v3  # noqa: F401
from models import resnet_rs  # noqa: F401
from models import regnet  # noqa: F401
from models import vgg  # noqa: F401
from models import xception  # noqa: F401
from models import mobilenet  # noqa: F401
from models import mobilenet_v3  # noqa: F401
from models import convnext  # noqa: F401
from models import inception_resnet_v2  # noqa: F401
from models import nasnet  # noqa: F401
# pylint: enable=unused-import

__all__ = [
    "ModelSpec", "UnknownModelError", "create", "decode_predictions",
    "get_spec", "list_models",
    "preprocess", "preprocess_mode", "register", "resolve_input_shape", "suggest",
]
