"""Placeholder: the densenet family is being ported (registers nothing yet)."""
