"""Helpers every layer uses: atomic file writes and the progress protocol; imports nothing else of the project.

The bottom layer of the import contracts (``pyproject.toml``): ``expert/``, ``mllm/``, ``eagle/``, ``app/`` and
``deploy/`` may all import it, so each helper has exactly one home.
"""
