"""``python -m storage.inspect``: look at, verify and compare stores and stage 1 outputs (see :mod:`storage.inspect.cli`)."""

from storage.inspect.cli import main

__all__ = ["main"]
