"""Files the app hands out for download (bank zips, line-statistics CSVs), kept in one bounded scratch folder.

Gradio copies a returned file into its own cache before serving it, so the app's copy is only needed until the
handler returns. Every download is written into one folder per app process; the oldest files beyond ``keep``
are removed when a new one is made, and the folder itself when the process exits. Without this, every "Download
bank" click would leave a zip of the bank (its ~100 MB backbone graph included) in the temporary directory for
good. Gradio's own cached copies are cleaned by ``gr.Blocks(delete_cache=...)`` (see :mod:`app.ui`).

Example:
    >>> folder = DownloadFolder(keep=2)
    >>> for i in range(3):
    ...     _ = folder.new_file(f"report-{i}.csv").write_text("a,b")
    >>> sorted(p.name for p in folder.directory.rglob("*.csv"))
    ['report-1.csv', 'report-2.csv']
    >>> folder.remove()
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

__all__ = ["DownloadFolder", "download_path"]


class DownloadFolder:
    """A scratch folder that holds the ``keep`` most recent downloads.

    Each download gets a sub-folder of its own (``<n>-<random>/<file name>``) so that the user sees the file
    name they expect and two downloads of the same name never collide.

    Args:
        keep: how many downloads to keep; older ones are removed when a new one is made. Keep a few, so that
            a download still being copied by Gradio for another browser tab is not removed under it.
        parent: where to make the folder (default: the system's temporary directory).
    """

    def __init__(self, keep: int = 8, parent: str | Path | None = None):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.keep = keep
        self._parent = parent
        self._directory: Path | None = None
        self._counter = 0
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        """The folder, made on first use and removed at exit."""
        if self._directory is None or not self._directory.is_dir():
            self._directory = Path(tempfile.mkdtemp(prefix="eagle-downloads-", dir=self._parent))
            atexit.register(self.remove)
        return self._directory

    def new_file(self, filename: str) -> Path:
        """A path named ``filename`` (its last component only) in a fresh sub-folder; the parent exists."""
        with self._lock:
            directory = self.directory
            self._counter += 1
            slot = directory / f"{self._counter:08d}-{uuid.uuid4().hex[:8]}"
            slot.mkdir()
            self._prune(directory)
        return slot / Path(filename).name

    def _prune(self, directory: Path) -> None:
        slots = sorted(p for p in directory.iterdir() if p.is_dir())
        for stale in slots[: max(0, len(slots) - self.keep)]:
            shutil.rmtree(stale, ignore_errors=True)

    def remove(self) -> None:
        """Remove the folder and everything in it."""
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


_FOLDER = DownloadFolder()


def download_path(filename: str) -> Path:
    """A path for a new download named ``filename`` in this process's :class:`DownloadFolder`."""
    return _FOLDER.new_file(filename)
