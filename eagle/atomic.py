"""Atomic file writes for the front ends: :mod:`expert.atomic`, re-exported.

The helper is defined once, in :mod:`expert.atomic` (the lowest package, so ``expert`` and ``eagle`` use it
directly); ``deploy`` and ``app`` may import only ``eagle`` (the import contracts), so they import it from here.
"""

from expert.atomic import *  # noqa: F403 - re-exporting the helper is this module's whole job
from expert.atomic import __all__  # noqa: F401
