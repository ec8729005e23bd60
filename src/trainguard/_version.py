"""The version, in a module of its own: code inside the pillars can read it without
importing the package (whose lazy names make import cycles)."""

__version__ = "0.1.0"
