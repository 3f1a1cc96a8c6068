"""Placeholder: the resnet_rs family is being ported (registers nothing yet)."""
