"""EAGLE composition root: settings, the inspection pipeline and the command line."""

__version__ = "0.1.0"
