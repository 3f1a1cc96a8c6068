"""Flax linen modules for Keras layers that have no Flax counterpart.

Each module takes the Keras constructor's argument names and defaults and
computes what ``keras/src/layers/`` computes (Keras' arithmetic, not Flax's
defaults); its variables keep the names ``translate.rules.RULES`` expects.
Source emitted by ``translate.emit_source`` calls them as
``<group>.<KerasClass>(...)``, e.g. ``attention.MultiHeadAttention``.
One module per group of Keras layers.
"""
