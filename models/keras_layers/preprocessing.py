"""Flax versions of Keras layers (see models/keras_layers/__init__.py)."""
