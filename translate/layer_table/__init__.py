"""What each Keras class becomes in Flax source: the contract
(``translate.layer_table.base``) and the table its group modules fill,
one module per group of Keras layers."""

# Importing a group module registers its classes.
# pylint: disable=unused-import
from translate.layer_table import (attention, conv, core,  # noqa: F401
                                   normalization, ops, preprocessing,
                                   recurrent, shapes)
# pylint: enable=unused-import
from translate.layer_table.base import (TABLE, Context, LayerTranslation,
                                        UnsupportedLayerError, lookup,
                                        register_layer, supported_classes)

__all__ = ["TABLE", "Context", "LayerTranslation", "UnsupportedLayerError",
           "lookup", "register_layer", "supported_classes"]
