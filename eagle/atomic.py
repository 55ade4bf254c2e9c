"""Atomic file writes for the front ends: :mod:`expert.atomic`, re-exported.

The helper is defined once, in :mod:`expert.atomic` (the lowest package, so ``expert`` and ``eagle`` use it
directly); ``deploy`` and ``app`` may import only ``eagle`` (the import contracts), so they import it from here.
"""

from expert.atomic import (
    atomic_path,
    file_lock,
    fsync_dir,
    fsync_file,
    fsync_tree,
    link_or_copy,
    replace,
    write_bytes,
    write_text,
)

__all__ = [
    "atomic_path",
    "file_lock",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "link_or_copy",
    "replace",
    "write_bytes",
    "write_text",
]
