"""Translations of Keras classes: see translate/layer_table/base.py."""

from __future__ import annotations
