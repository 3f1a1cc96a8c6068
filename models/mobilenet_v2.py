"""Placeholder: the mobilenet_v2 family is being ported (registers nothing yet)."""
