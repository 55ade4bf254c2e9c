"""EAGLE composition root: settings, the inspection pipeline and the command line.

Layers, data flow and where each rule lives: docs/architecture.md.
"""

__version__ = "0.1.0"
