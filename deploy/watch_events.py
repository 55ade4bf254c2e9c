"""Which files of the watched folder their writer has closed: the kernel's close-write events, through watchdog.

A writer that pauses (a camera sending an image in chunks, a slow network share) leaves a file whose size and
modification time stay unchanged for a while although it is not complete. Polling cannot tell such a pause from
the end; the kernel can: on Linux, inotify reports ``IN_CLOSE_WRITE`` when a file opened for writing is closed
(watchdog's :class:`~watchdog.events.FileClosedEvent`). :class:`WriteTracker` records, per file name:

* ``"closed"``: the file was closed after writing (or renamed into the folder, which is atomic), and it is
  unchanged since (same size, modification time and inode as right after the event);
* ``"writing"``: it was created, or changed after its last close: a writer still holds it;
* nothing: no event seen (the file was there before the watcher started, or the file system sends no events,
  e.g. some network mounts): the caller falls back to polling.

Only the inotify observer reports close-write; on other platforms, or when inotify cannot be started (its
watch limit reached), :meth:`WriteTracker.start` returns ``False`` and the watcher polls.

Example:
    >>> import tempfile, threading
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> tracker = WriteTracker(folder, threading.Event())
    >>> # tracker.start(); (folder / "a.png").write_bytes(b"..."); tracker.state("a.png") -> "closed"
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Literal

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

logger = logging.getLogger(__name__)

Signature = tuple[int, int, int]
"""``(size, mtime_ns, inode)`` of a file."""


def signature_of(st: os.stat_result) -> Signature:
    """A file's ``(size, mtime_ns, inode)``."""
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class WriteTracker(FileSystemEventHandler):
    """Close-write state of the files directly in ``folder`` (see the module docstring).

    Args:
        folder: the watched folder (not its sub-folders).
        wake: set on every event that may make a file ready, so the watcher scans at once.
    """

    def __init__(self, folder: Path, wake: threading.Event) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.wake = wake
        self._lock = threading.Lock()
        self._closed: dict[str, Signature | None] = {}  # None: "writing"
        self._observer: object | None = None

    @property
    def active(self) -> bool:
        """Whether events are being received."""
        return self._observer is not None

    def start(self) -> bool:
        """Start the inotify observer; ``False`` (and a log line) where close-write events are not available."""
        try:
            from watchdog.observers.inotify import InotifyObserver
        except ImportError:  # not Linux
            logger.info("watched folder: no close-write events on this platform; polling only")
            return False
        observer = InotifyObserver(generate_full_events=True)  # a file moved in from elsewhere: a move, not a create
        try:
            observer.schedule(
                self,
                str(self.folder),
                recursive=False,
                event_filter=[FileCreatedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent],
            )
            observer.start()
        except OSError as err:  # e.g. the inotify watch or instance limit reached
            logger.warning("watched folder: close-write events unavailable (%s); polling only", err.strerror or err)
            return False
        self._observer = observer
        return True

    def stop(self) -> None:
        """Stop the observer (idempotent)."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()  # type: ignore[attr-defined]
            observer.join(10)  # type: ignore[attr-defined]

    def state(self, name: str, current: Signature) -> Literal["closed", "writing"] | None:
        """What the events say about ``name``, whose signature is now ``current``; ``None``: no event seen."""
        with self._lock:
            if name not in self._closed:
                return None
            closed = self._closed[name]
        return "closed" if closed == current else "writing"

    def forget(self, name: str) -> None:
        """Drop what is known about ``name`` (it was taken, or is gone)."""
        with self._lock:
            self._closed.pop(name, None)

    def forget_all_but(self, names: set[str]) -> None:
        """Keep only ``names`` (a long-running watcher must not grow)."""
        with self._lock:
            for name in set(self._closed) - names:
                del self._closed[name]

    # -- watchdog callbacks (observer thread) ----------------------------------------------------------------
    def _name_in_folder(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        return os.path.basename(path) if Path(path).parent == self.folder else None

    def _closed_now(self, name: str) -> None:
        try:
            closed: Signature | None = signature_of(os.lstat(self.folder / name))
        except OSError:
            closed = None
        with self._lock:
            self._closed[name] = closed
        self.wake.set()

    def on_created(self, event: FileSystemEvent) -> None:  # noqa: D102
        name = self._name_in_folder(event.src_path)
        if name is not None:
            with self._lock:
                self._closed[name] = None

    def on_closed(self, event: FileSystemEvent) -> None:  # noqa: D102
        name = self._name_in_folder(event.src_path)
        if name is not None:
            self._closed_now(name)

    def on_moved(self, event: FileSystemEvent) -> None:  # noqa: D102
        source = self._name_in_folder(event.src_path)
        if source is not None:
            self.forget(source)
        target = self._name_in_folder(event.dest_path)
        if target is not None:
            self._closed_now(target)  # a rename into the folder delivers a whole file

    def on_deleted(self, event: FileSystemEvent) -> None:  # noqa: D102
        name = self._name_in_folder(event.src_path)
        if name is not None:
            self.forget(name)
