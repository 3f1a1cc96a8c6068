"""Placeholder: the inception_v3 family is being ported (registers nothing yet)."""
