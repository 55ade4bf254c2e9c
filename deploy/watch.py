"""The watched folder: inspect every image dropped into a folder, exactly once, surviving crashes.

Layout (``IN`` is ``--in``, ``OUT`` is ``--out``)::

    IN/part-0001.png            a new image (picked up once fully written, see below)
    IN/processing/<run>__part-0001.png   claimed: being inspected (the journal)
    IN/done/part-0001.png       inspected
    IN/failed/part-0002.png     could not be inspected (unreadable, too large, ...)
    OUT/part-0001.json          the result record (InspectionResult fields + run_id, input_name)
    OUT/part-0001.annotated.png heatmap + red boxes
    OUT/part-0002.error.json    why part-0002 failed

**Only regular files of its own.** The folder is listed with ``lstat``: symbolic links (to a file, an image or a
folder anywhere), pipes, sockets and devices, whatever their name, and image files with more than one name (hard
links) are moved to ``failed/`` WITHOUT being opened or followed (the rename moves the link itself), with code
``not_a_regular_file`` in ``OUT/<name>.error.json``, the audit row (empty sha256: nothing was read) and the log,
all saying what KIND of entry it is, never what it or its target holds (see :mod:`deploy.watch_files`). Plain
sub-folders are left in place (logged once). If ``processing/``, ``done/``, ``failed/`` or the lock file is a
link, the watcher refuses to start.

**Fully written.** Only top-level files with an image extension are considered, and never names starting
with ``.`` or ``~`` or ending in ``.tmp``, ``.part``, ``.partial``, ``.crdownload``, ``.filepart`` or ``.swp``.
With ``events`` (inotify close-write through watchdog, :mod:`deploy.watch_events`), a file is taken as soon as its
writer closed it and it has not changed since; a file a writer still holds waits for its close (or for
``truncated_retry_s`` after its last change). Without events for a file (it was there before the watcher started,
the file system sends none, or ``events=False``) it is taken when its size, modification time, inode and link
count were identical in ``stable_polls`` consecutive scans (``poll_s`` apart); a zero-byte file must stay so ten
times longer. A file that changed while events run but whose event has not arrived yet waits ``EVENT_GRACE_S``
for it first (the observer thread can lag a scan on a loaded machine). Either way, an image whose end is missing
(PNG without ``IEND``, JPEG without its end marker, BMP or WebP shorter than declared:
:func:`eagle.images.looks_complete`) is left in place until ``truncated_retry_s`` passed since its last change, and
one the decoder finds cut short (TIFF...) is put back for the same time; only
then is it failed. Writers that can should still use the lock-free convention: write ``name.png.part`` (or
``.name.png``) and rename it to ``name.png`` when complete — a rename is atomic, so the image appears whole.

**Exactly once.** A file is claimed by an atomic rename into ``processing/`` under a fresh run id, then:
outputs are written atomically (temporary file + rename), the audit row is inserted keyed by
``(image sha256, image name, run id)`` (a replay is ignored), and finally the input is renamed into ``done/``
(or ``failed/``). After a crash or kill anywhere in between, the next start re-processes whatever is in
``processing/`` with the SAME run id: outputs are rewritten identically, the audit row is not duplicated, and
the move completes. An input that crashed the process ``max_attempts`` times goes to ``failed/`` with code
``crashed``. Inputs are never deleted. A lock file (``IN/.eagle-watch.lock``, ``flock``) keeps a second
watcher off the same folder.

Example:
    >>> # watcher = FolderWatcher(pipeline, Path("in"), Path("out"), "screws", audit=AuditLog(Path("a.db")))
    >>> # watcher.run(stop_event)       # until stop_event is set (SIGTERM in `eagle watch`)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from common import atomic
from deploy.limits import check_image_pixels
from deploy.watch_events import WriteTracker, signature_of
from deploy.watch_files import NotARegularFileError, kind_of, read_ends, read_regular_file
from eagle.annotate import annotated_image, encode_png
from eagle.audit import AuditLog, utc_now
from eagle.banks import BankNotFoundError
from eagle.errors import ErrorInfo, describe, one_line
from eagle.images import IMAGE_EXTENSIONS, TAIL_BYTES, TruncatedImageError, image_sha256, looks_complete
from eagle.kept_images import keep_inspected_image

if TYPE_CHECKING:
    from eagle.pipeline import InspectionPipeline
    from eagle.records import InspectionResult

logger = logging.getLogger(__name__)

PROCESSING, DONE, FAILED = "processing", "done", "failed"
LOCK_NAME = ".eagle-watch.lock"
EVENT_GRACE_S = 2.0
"""How long a file changed while events run, with no event seen for it yet, waits for its create/close event
before polling decides (the observer thread may lag the scan on a loaded machine)."""
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".swp")
_CLAIMED = re.compile(r"^(?P<run>[0-9a-f]{32})__(?P<name>.+)$")
_OWN = frozenset({PROCESSING, DONE, FAILED, LOCK_NAME})


class WatcherBusyError(RuntimeError):
    """Another watcher holds the input folder's lock."""


class UnsafeFolderError(ValueError):
    """The watcher's own ``processing/``, ``done/``, ``failed/`` or lock file is a link or of the wrong kind."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one input."""

    name: str
    run_id: str
    status: Literal["done", "failed"]
    destination: Path
    record: Path
    audited: bool
    error_code: str | None = None


@dataclass(frozen=True)
class _Input:
    """A claimed input read and checked, waiting for its inspection."""

    claimed: Path
    run_id: str
    name: str
    data: bytes
    sha256: str


@dataclass
class _Seen:
    signature: tuple[int, ...]
    stable: int


def is_candidate(path: Path) -> bool:
    """Whether a file name is an image the watcher should consider (not hidden, partial or foreign)."""
    name = path.name
    lowered = name.lower()
    if name.startswith((".", "~")) or lowered.endswith(PARTIAL_SUFFIXES):
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS


class FolderWatcher:
    """Inspect images appearing in ``in_dir`` against one bank; see the module docstring.

    Args:
        pipeline: an ``eagle.pipeline.Pipeline``.
        in_dir: the watched folder (``processing/``, ``done/``, ``failed/`` are created inside it).
        out_dir: where records and annotated images go.
        bank: the bank to inspect against.
        audit: the audit log (rows with source ``watch``).
        options: ``eagle.records.InspectOptions`` for every image (``None``: settings' defaults).
        max_pixels: larger images fail with ``image_too_large`` (read from the header).
        poll_s: seconds between scans.
        stable_polls: identical consecutive scans needed before a file is taken.
        max_attempts: starts after which an input that keeps crashing the process is failed.
        truncated_retry_s: an image that is cut short is left in place (and retried) until this many seconds
            passed since its last change; only then is it failed (0: fail at once).
        events: take a file as soon as its writer closes it (inotify close-write through watchdog, where
            available), polling kept as the fallback; ``False``: polling only.
        batch_size: when several images are ready, up to this many are claimed together and the expert embeds
            them in one forward pass (:meth:`~eagle.pipeline.Pipeline.inspect_many`); each still gets its own
            outputs, audit row and move, exactly as alone. 1: one at a time.
    """

    def __init__(
        self,
        pipeline: InspectionPipeline,
        in_dir: Path,
        out_dir: Path,
        bank: str,
        *,
        audit: AuditLog,
        options: Any = None,
        max_pixels: int = 64_000_000,
        poll_s: float = 1.0,
        stable_polls: int = 2,
        max_attempts: int = 3,
        truncated_retry_s: float = 30.0,
        events: bool = True,
        batch_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.pipeline = pipeline
        self.in_dir = Path(in_dir)
        self.out_dir = Path(out_dir)
        self.bank = bank
        self.audit = audit
        self.options = options
        self.max_pixels = max_pixels
        self.poll_s = poll_s
        self.stable_polls = max(1, stable_polls)
        self.max_attempts = max(1, max_attempts)
        self.truncated_retry_s = max(0.0, truncated_retry_s)
        self.events = events
        self.batch_size = batch_size
        self.processing_dir = self.in_dir / PROCESSING
        self.done_dir = self.in_dir / DONE
        self.failed_dir = self.in_dir / FAILED
        self._seen: dict[str, _Seen] = {}
        self._skipped: set[str] = set()
        self._cut_short: dict[str, tuple[int, ...]] = {}  # name -> signature last seen cut short (not re-read)
        self._lock_file: Any = None
        self._wake = threading.Event()
        self._tracker = WriteTracker(self.in_dir, self._wake)
        self._events_since = float("inf")  # when the tracker started (files changed after it expect an event)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Create the folders and take the input folder's lock.

        Raises:
            WatcherBusyError: another watcher runs on ``in_dir``.
            NotADirectoryError: ``in_dir`` does not exist.
            UnsafeFolderError: ``processing/``, ``done/``, ``failed/`` or the lock file is a link (or of the wrong
                kind): the watcher would write where the link points.
        """
        if not self.in_dir.is_dir():
            raise NotADirectoryError(f"the watched folder {self.in_dir} does not exist")
        if self.out_dir.resolve() == self.in_dir.resolve():
            raise ValueError("--out must differ from --in (annotated PNGs would be inspected as new images)")
        for folder in (self.processing_dir, self.done_dir, self.failed_dir):
            try:
                st = os.lstat(folder)
            except FileNotFoundError:
                folder.mkdir()
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeFolderError(
                    f"{folder} is {kind_of(st)}, not a folder: the watcher keeps its own {folder.name}/ there and "
                    "will not write through a link; remove it (the watcher creates the folder)"
                )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lock = self._open_lock()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise WatcherBusyError(f"another watcher (pid {holder}) is processing {self.in_dir}") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_file = lock
        self._events_since = time.time()
        if self.events and not self._tracker.start():
            logger.info("watching %s by polling every %s s", self.in_dir, self.poll_s)

    def _open_lock(self) -> Any:
        """The lock file, opened without following a link (a link there is refused, not written through)."""
        path = self.in_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise UnsafeFolderError(
                f"{path} is a symbolic link: remove it (the watcher creates its lock file)"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UnsafeFolderError(f"{path} is {kind_of(st)}, not the watcher's lock file: remove it")
        return os.fdopen(fd, "r+")

    def close(self) -> None:
        """Stop the events and release the lock."""
        self._tracker.stop()
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> FolderWatcher:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        stop: threading.Event,
        *,
        once: bool = False,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Recover the journal, then scan and process until ``stop`` is set.

        Args:
            stop: set it (e.g. from a SIGTERM handler) to finish the current image and return.
            once: return as soon as the folder holds no pending image (batch mode).
            on_outcome: called after each input is finished.

        Returns:
            The outcomes of this run, in processing order.
        """
        outcomes: list[Outcome] = []

        def finish(outcome: Outcome) -> None:
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

        for claimed in self.journal():
            if stop.is_set():
                return outcomes
            outcome = self.process_claimed(claimed)
            if outcome is not None:
                finish(outcome)
        bank_missing = False
        while not stop.is_set():
            if not self._can_inspect():
                if once:
                    raise BankNotFoundError(f"no bank named {self.bank!r}")
                if not bank_missing:
                    logger.error("bank %r does not exist; waiting for it (images stay where they are)", self.bank)
                bank_missing = True
                stop.wait(self.poll_s)
                continue
            bank_missing = False
            ready, waiting = self.scan()
            for start in range(0, len(ready), self.batch_size):
                if stop.is_set():
                    break
                claimed = [c for c in (self.claim(path) for path in ready[start : start + self.batch_size]) if c]
                for outcome in self.process_batch(claimed):
                    finish(outcome)
            if once and not ready and not waiting:
                break
            if not ready:
                self._pause(stop)
        return outcomes

    def _can_inspect(self) -> bool:
        """Whether the bank exists, or is a line declared without one that the MLLM alone can inspect (0-shot)."""
        banks = self.pipeline.banks
        return banks.exists(self.bank) or (self.pipeline.mllm_enabled and banks.is_declared(self.bank))

    def _pause(self, stop: threading.Event) -> None:
        """Wait ``poll_s``, or less when ``stop`` is set or an event says a file was closed."""
        deadline = time.monotonic() + self.poll_s
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if self._wake.wait(min(left, 0.1)):
                self._wake.clear()
                return

    # -- steps -----------------------------------------------------------------------------------------------
    def journal(self) -> list[Path]:
        """Inputs left in ``processing/`` by an earlier run (to be re-processed with their run ids)."""
        return sorted(  # any kind but a folder: a link or pipe claimed by mistake is refused, never read
            p
            for p in self.processing_dir.iterdir()
            if _CLAIMED.match(p.name) is not None and not stat.S_ISDIR(os.lstat(p).st_mode)
        )

    def scan(self) -> tuple[list[Path], list[Path]]:
        """One poll: ``(ready, waiting)`` — entries to take now, and candidates still being written.

        Nothing is followed or opened here but a candidate's own ends (to see whether an image is cut short):
        links, pipes, sockets and devices are ready at once (to be refused, see :meth:`process_claimed`); plain
        sub-folders are left in place (logged once); other files are candidates when :func:`is_candidate`.
        """
        ready: list[Path] = []
        waiting: list[Path] = []
        present: set[str] = set()
        listed: set[str] = set()
        now = time.time()
        for path in sorted(self.in_dir.iterdir()):
            name = path.name
            listed.add(name)
            if name in _OWN:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                self._note_once(name, "leaving the sub-folder %s in place (only files in the folder itself are taken)")
                continue
            if not stat.S_ISREG(st.st_mode):
                ready.append(path)  # a link, pipe, socket or device: refused without being opened
                continue
            if not is_candidate(path):
                self._note_once(name, "ignoring %s (not an image, hidden, or still being written)")
                continue
            present.add(name)
            signature = (*signature_of(st), st.st_nlink)
            seen = self._seen.get(name)
            if seen is None or seen.signature != signature:
                self._seen[name] = seen = _Seen(signature, 1)
            else:
                seen.stable += 1
            (ready if self._is_ready(path, st, seen, now) else waiting).append(path)
        for name in set(self._seen) - present:
            del self._seen[name]
        for name in set(self._cut_short) - present:
            del self._cut_short[name]
        self._tracker.forget_all_but(present)
        self._skipped &= listed  # forget files that are gone (a long-running watcher must not grow)
        return ready, waiting

    def _is_ready(self, path: Path, st: os.stat_result, seen: _Seen, now: float) -> bool:
        """Whether a candidate is complete: closed by its writer (events) or unchanged (polls), and not cut short."""
        name = path.name
        age = now - st.st_mtime
        stable = seen.stable >= self.stable_polls * (10 if st.st_size == 0 else 1)
        state = self._tracker.state(name, signature_of(st)) if self._tracker.active else None
        if state == "closed":
            complete = True  # its writer closed it and it has not changed since
        elif state == "writing":  # a writer holds it: wait for its close, or for the retry time to pass
            complete = stable and age >= self.truncated_retry_s
        elif self._tracker.active and st.st_mtime >= self._events_since and age < EVENT_GRACE_S:
            complete = False  # changed while events run but none seen yet: its create event may still be on the way
        else:
            complete = stable  # no event seen (there before the watcher, or no events on this file system)
        if not complete or age >= self.truncated_retry_s or st.st_nlink > 1:
            return complete  # (a file with several names is refused unread by process_claimed)
        if self._cut_short.get(name) == seen.signature:
            return False
        try:
            head, tail, size = read_ends(path, 16, TAIL_BYTES)
        except (NotARegularFileError, FileNotFoundError):
            return True  # swapped or gone since the lstat: process_claimed (or the next scan) decides
        if looks_complete(head, tail, size) is False:
            self._cut_short[name] = seen.signature
            logger.info(
                "%s is cut short (%s); waiting until %s s after its last change before failing it",
                name,
                "empty" if size == 0 else f"{size:,} bytes so far",
                self.truncated_retry_s,
            )
            return False
        return True

    def _note_once(self, name: str, message: str) -> None:
        if name not in self._skipped:
            self._skipped.add(name)
            logger.info(message, name)

    def claim(self, path: Path) -> Path | None:
        """Atomically move ``path`` into ``processing/`` under a new run id; ``None`` if it vanished."""
        run_id = uuid.uuid4().hex
        target = self.processing_dir / f"{run_id}__{path.name}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        finally:
            self._seen.pop(path.name, None)
            self._cut_short.pop(path.name, None)
            self._tracker.forget(path.name)
        return target

    def process_claimed(self, claimed: Path) -> Outcome | None:
        """Inspect one claimed input and finish it (idempotent: safe to repeat after a crash).

        An entry that is no regular file with one name (a symbolic link, hard link, pipe, socket, device) is
        failed with code ``not_a_regular_file`` without being opened: the record, audit row and log say its kind,
        never what it or its target holds. An image cut short whose last change is younger than
        ``truncated_retry_s`` is put back where it was (its writer may go on) and ``None`` is returned.
        """
        (outcome,) = self._process([claimed])
        return outcome

    def process_batch(self, claimed: list[Path]) -> list[Outcome]:
        """Inspect several claimed inputs, the expert embedding them together; each finished as if alone.

        Returns the outcomes of the inputs that were finished (one put back because it is cut short has none).
        """
        return [outcome for outcome in self._process(claimed) if outcome is not None]

    def _process(self, claimed: list[Path]) -> list[Outcome | None]:
        """Read and check each input, inspect the readable ones in one call, then write, audit and move each."""
        outcomes: list[Outcome | None] = []
        pending: list[tuple[int, _Input]] = []
        for path in claimed:
            item = self._read_claimed(path)
            if isinstance(item, _Input):
                pending.append((len(outcomes), item))
                outcomes.append(None)
            else:
                outcomes.append(item)
        if not pending:
            return outcomes
        start = time.perf_counter()
        if len(pending) == 1:
            (_, item), results = pending[0], []
            try:
                results.append(self.pipeline.inspect(item.data, self.bank, self.options, image_name=item.name))
            except Exception as exc:  # noqa: BLE001 - recorded below, as each input's failure
                results.append(exc)
        else:
            images = [(item.data, item.name) for _, item in pending]
            results = self.pipeline.inspect_many(images, self.bank, self.options, batch_size=len(pending))
        # every image of a batch waited for the whole batch: that is its latency
        latency_ms = (time.perf_counter() - start) * 1000.0
        for (index, item), result in zip(pending, results, strict=True):
            outcomes[index] = self._complete(item, result, latency_ms)
        return outcomes

    def _read_claimed(self, claimed: Path) -> _Input | Outcome | None:
        """The input read and checked, or its outcome when it failed already (None: put back, cut short)."""
        match = _CLAIMED.match(claimed.name)
        if match is None:
            raise ValueError(f"{claimed} is not a claimed input")
        run_id, name = match.group("run"), match.group("name")
        attempts = self._count_attempt(run_id)
        try:
            data = read_regular_file(claimed, label=name)
        except NotARegularFileError as err:
            return self._fail(claimed, run_id, name, "", err.code, one_line(err), None)
        sha256 = image_sha256(data)
        if attempts > self.max_attempts:
            message = f"the process stopped {attempts - 1} times while inspecting this input"
            return self._fail(claimed, run_id, name, sha256, "crashed", message, None)
        item = _Input(claimed, run_id, name, data, sha256)
        start = time.perf_counter()
        try:
            check_image_pixels(data, max_pixels=self.max_pixels, name=name)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and the input kept in failed/
            return self._failure(item, exc, (time.perf_counter() - start) * 1000.0)
        return item

    def _complete(self, item: _Input, result: InspectionResult | BaseException, latency_ms: float) -> Outcome | None:
        claimed, run_id, name, data = item.claimed, item.run_id, item.name, item.data
        if isinstance(result, BaseException):
            return self._failure(item, result, latency_ms)
        try:
            picture = encode_png(annotated_image(result))
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and the input kept in failed/
            return self._failure(item, exc, latency_ms)
        stem = self._output_stem(name, run_id)
        record = {**result.model_dump(mode="json"), "run_id": run_id, "input_name": name}
        atomic.write_bytes(self.out_dir / f"{stem}.annotated.png", picture)
        atomic.write_bytes(self.out_dir / f"{stem}.json", json.dumps(record, indent=2).encode("utf-8"))
        audited = self.audit.record(result, source="watch", run_id=run_id, latency_ms=latency_ms)
        keep_inspected_image(getattr(self.pipeline, "settings", None), result.image_sha256, data)
        destination = self._move(claimed, self.done_dir, name, run_id)
        logger.info("%s: %s (score %.4g, tau %.4g) -> %s", name, result.verdict, result.score, result.tau, destination)
        return Outcome(name, run_id, "done", destination, self.out_dir / f"{stem}.json", audited)

    def _failure(self, item: _Input, exc: BaseException, latency_ms: float | None) -> Outcome | None:
        """Record why ``item`` failed (or put it back when it is cut short and its writer may go on)."""
        if isinstance(exc, TruncatedImageError) and self._put_back(item.claimed, item.name, item.run_id):
            return None
        info = describe(exc)
        if info is None:
            logger.error("unexpected error inspecting %s", item.name, exc_info=exc)
            info = ErrorInfo("internal_error", 500, f"unexpected error: {type(exc).__name__}: {one_line(exc)}")
        if isinstance(exc, TruncatedImageError) and self.truncated_retry_s > 0:
            waited = f"unchanged for {self.truncated_retry_s:g} s (EAGLE_SERVICE__WATCH_TRUNCATED_RETRY_S)"
            info = info._replace(message=f"{info.message}; {waited}")
        return self._fail(item.claimed, item.run_id, item.name, item.sha256, info.code, info.message, latency_ms)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _fail(
        self,
        claimed: Path,
        run_id: str,
        name: str,
        sha256: str,
        code: str,
        message: str,
        latency_ms: float | None,
    ) -> Outcome:
        stem = self._output_stem(name, run_id)
        record = {
            "run_id": run_id,
            "input_name": name,
            "image_sha256": sha256,
            "bank": self.bank,
            "time": utc_now(),
            "error": {"code": code, "message": message},
        }
        path = self.out_dir / f"{stem}.error.json"
        atomic.write_bytes(path, json.dumps(record, indent=2).encode("utf-8"))
        audited = self.audit.record_failure(
            run_id=run_id,
            source="watch",
            image_name=name,
            image_sha256=sha256,
            bank=self.bank,
            error_code=code,
            error_message=message,
            latency_ms=latency_ms,
        )
        destination = self._move(claimed, self.failed_dir, name, run_id)
        logger.warning("%s: failed (%s: %s) -> %s", name, code, message, destination)
        return Outcome(name, run_id, "failed", destination, path, audited, code)

    def _output_stem(self, name: str, run_id: str) -> str:
        """``name``'s stem, or ``stem.<run8>`` when an output of that stem belongs to another run."""
        stem = Path(name).stem
        for suffix in (".json", ".error.json"):
            existing = self.out_dir / f"{stem}{suffix}"
            if existing.exists() and _record_run_id(existing) != run_id:
                return f"{stem}.{run_id[:8]}"
        return stem

    def _put_back(self, claimed: Path, name: str, run_id: str) -> bool:
        """Return an image found cut short to the folder if it changed less than ``truncated_retry_s`` ago.

        ``link`` + ``unlink`` rather than ``rename``: a file of that name written meanwhile is never replaced
        (then the claimed one is failed). A writer that still holds the file writes on into the same inode.
        """
        try:
            age = time.time() - os.lstat(claimed).st_mtime
            if age >= self.truncated_retry_s:
                return False
            os.link(claimed, self.in_dir / name)
        except OSError:
            return False
        os.unlink(claimed)
        with contextlib.suppress(FileNotFoundError):
            (self.processing_dir / f".{run_id}.attempts").unlink()
        logger.info("%s is cut short; put back to wait for its writer (changed %.1f s ago)", name, age)
        return True

    def _move(self, claimed: Path, folder: Path, name: str, run_id: str) -> Path:
        destination = folder / name
        if os.path.lexists(destination):  # a link there counts too: rename would replace it
            destination = folder / f"{Path(name).stem}.{run_id[:8]}{Path(name).suffix}"
        os.rename(claimed, destination)
        atomic.fsync_dir(folder)
        with contextlib.suppress(FileNotFoundError):
            (self.processing_dir / f".{run_id}.attempts").unlink()
        return destination

    def _count_attempt(self, run_id: str) -> int:
        """Record one more start of ``run_id`` (a small sidecar in ``processing/``); returns the count."""
        path = self.processing_dir / f".{run_id}.attempts"
        try:
            count = int(path.read_text(encoding="ascii").strip() or 0) + 1
        except (FileNotFoundError, ValueError):
            count = 1
        atomic.write_bytes(path, str(count).encode("ascii"))
        return count


def _record_run_id(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
