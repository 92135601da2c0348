"""Cordum agent control plane on Trio."""

__version__ = "0.1.0"
