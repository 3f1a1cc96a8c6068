"""Placeholder: the efficientnet family is being ported (registers nothing yet)."""
