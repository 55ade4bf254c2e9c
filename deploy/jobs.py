"""Bank builds from an uploaded zip of normal images, run as background jobs with a pollable status.

A build takes seconds on a GPU and minutes on a CPU (the coreset), far longer than an HTTP request should
wait, so ``POST /v1/banks`` only validates the archive (its directory: names, sizes, image count) and queues
a job; ``GET /v1/jobs/{id}`` reports ``queued → running (stage, progress) → succeeded (bank summary) |
failed (error code and message)``.

Jobs run one at a time on their own thread (builds are long; inspections keep their own worker and the
pipeline serialises model use). Each job's status is written atomically to ``<jobs_dir>/<id>.json`` at every
state or stage change, so a status survives a restart; a job that was queued or running when the service
stopped is reported as failed with code ``interrupted``. Uploaded archives and extracted images are deleted
when their job ends; the bank itself is the pipeline's business.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from common import atomic
from deploy.archive import scan_archive
from deploy.errors import BankBusy, BankExists, QueueFull, ShuttingDown
from eagle.archives import ArchiveError, ArchiveLimits, extract_zip
from eagle.bank_records import BankSummary
from eagle.errors import describe
from eagle.images import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from eagle.pipeline import InspectionPipeline

logger = logging.getLogger(__name__)

JobState = Literal["queued", "running", "succeeded", "failed"]
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


class JobError(BaseModel):
    """Why a job failed: a stable code and one line."""

    code: str = Field(description="Stable error code, e.g. invalid_archive, interrupted, internal_error.")
    message: str = Field(description="One line for people.")


class JobStatus(BaseModel):
    """What ``GET /v1/jobs/{id}`` returns."""

    id: str = Field(description="The job id (32 hex digits).")
    bank: str = Field(description="The bank being built.")
    state: JobState = Field(description="queued → running → succeeded | failed.")
    stage: str | None = Field(None, description="Current build stage (extract, embed, coreset, dbt, save).")
    progress: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the current stage done.")
    overwrite: bool = Field(False, description="Whether the build replaces an existing bank.")
    n_images: int = Field(0, description="Images in the uploaded archive.")
    created: str = Field(description="When the job was queued, ISO 8601 in UTC.")
    started: str | None = Field(None, description="When it started running.")
    finished: str | None = Field(None, description="When it succeeded or failed.")
    result: BankSummary | None = Field(None, description="The bank summary once the build succeeded.")
    error: JobError | None = None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class BankBuildJobs:
    """Queue and run bank builds.

    Args:
        pipeline: an ``eagle.pipeline.Pipeline`` (uses ``build_bank`` and ``banks.exists``).
        jobs_dir: where uploads are staged and statuses persisted (one sub-folder and one JSON per job).
        limits: zip caps (see :class:`~eagle.archives.ArchiveLimits`).
        min_references: fewest images a build accepts (checked at upload, before queueing).
        max_pending: most jobs waiting to run; one more is refused with ``429``.
    """

    def __init__(
        self,
        pipeline: InspectionPipeline,
        jobs_dir: Path,
        *,
        limits: ArchiveLimits,
        min_references: int = 2,
        max_pending: int = 4,
    ) -> None:
        self.pipeline = pipeline
        self.jobs_dir = Path(jobs_dir)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.min_references = min_references
        self.max_pending = max_pending
        self._lock = threading.Condition()
        self._jobs: dict[str, JobStatus] = {}
        self._pending: collections.deque[str] = collections.deque()
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._recover()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the job thread (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._accepting = True
            self._thread = threading.Thread(target=self._run, name="eagle-bank-jobs", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting jobs and finish the accepted ones; ``True`` if all finished within ``timeout``."""
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- API -------------------------------------------------------------------------------------------------
    def staging_path(self) -> tuple[str, Path]:
        """A fresh job id and the file to which its upload is to be written."""
        job_id = uuid.uuid4().hex
        folder = self.jobs_dir / job_id
        folder.mkdir(parents=True)
        return job_id, folder / "upload.zip"

    def discard(self, job_id: str) -> None:
        """Remove a staged upload that never became a job."""
        shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)

    def submit(self, job_id: str, name: str, *, overwrite: bool = False) -> JobStatus:
        """Validate the staged archive of ``job_id`` and queue the build of bank ``name``.

        Raises:
            ArchiveError | ArchiveTooLargeError: the archive is unsafe, unreadable, or holds too few images.
            BankExists: ``name`` exists and ``overwrite`` is false.
            BankBusy: a job for ``name`` is queued or running.
            QueueFull: ``max_pending`` jobs already wait.
            ShuttingDown: the service is stopping.
        """
        archive = self.jobs_dir / job_id / "upload.zip"
        try:
            entries = scan_archive(archive, self.limits)
            if len(entries) < self.min_references:
                raise ArchiveError(
                    f"the archive holds {len(entries)} image(s); a bank needs at least {self.min_references}"
                )
            if not overwrite and self.pipeline.banks.exists(name):
                raise BankExists(f"bank {name!r} exists; send overwrite=true to rebuild it")
            with self._lock:
                if not self._accepting:
                    raise ShuttingDown("the service is shutting down and accepts no new bank builds")
                if self._active_for_locked(name):
                    raise BankBusy(f"bank {name!r} is already being built")
                if len(self._pending) >= self.max_pending:
                    raise QueueFull(f"{self.max_pending} bank builds are already waiting", retry_after=60)
                status = JobStatus(
                    id=job_id, bank=name, state="queued", overwrite=overwrite, n_images=len(entries), created=_now()
                )
                self._jobs[job_id] = status
                self._pending.append(job_id)
                self._persist(status)
                self._lock.notify_all()
                return status.model_copy()
        except BaseException:
            self.discard(job_id)
            raise

    def get(self, job_id: str) -> JobStatus | None:
        """The status of one job, or ``None``."""
        with self._lock:
            status = self._jobs.get(job_id)
            return status.model_copy() if status is not None else None

    def list(self) -> list[JobStatus]:
        """All known jobs, newest first."""
        with self._lock:
            return sorted((s.model_copy() for s in self._jobs.values()), key=lambda s: s.created, reverse=True)

    def active_for(self, name: str) -> bool:
        """Whether a job for bank ``name`` is queued or running."""
        with self._lock:
            return self._active_for_locked(name)

    def states(self) -> dict[str, int]:
        """Number of jobs per state (for metrics)."""
        counts = dict.fromkeys(("queued", "running", "succeeded", "failed"), 0)
        with self._lock:
            for status in self._jobs.values():
                counts[status.state] += 1
        return counts

    # -- internals -------------------------------------------------------------------------------------------
    def _active_for_locked(self, name: str) -> bool:
        return any(s.bank == name and s.state in ("queued", "running") for s in self._jobs.values())

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and self._accepting:
                    self._lock.wait()
                if not self._pending:
                    return
                job_id = self._pending.popleft()
            self._execute(job_id)

    def _execute(self, job_id: str) -> None:
        self._update(job_id, state="running", started=_now(), stage="extract", progress=0.0)
        folder = self.jobs_dir / job_id
        status = self.get(job_id)
        assert status is not None
        try:
            paths = extract_zip(folder / "upload.zip", folder / "images", self.limits, suffixes=set(IMAGE_EXTENSIONS))
            self._update(job_id, progress=1.0)
            names = [path.relative_to(folder / "images").as_posix() for path in paths]  # unique, unlike base names
            masks = [folder / m for m in ("mask.png", "mask.json") if (folder / m).is_file()]  # staged by the API
            summary = self.pipeline.build_bank(
                paths,
                status.bank,
                names=names,
                progress=lambda stage, fraction: self._progress(job_id, stage, fraction),
                **({"mask": masks[0]} if masks else {}),
            )
            result = BankSummary.model_validate(summary, from_attributes=True)
            self._update(job_id, state="succeeded", finished=_now(), progress=1.0, result=result)
            logger.info("bank %r built by job %s", status.bank, job_id)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's status
            info = describe(exc)
            if info is None:
                logger.exception("bank build job %s for %r failed unexpectedly", job_id, status.bank)
                error = JobError(code="internal_error", message="the build failed unexpectedly; see the service log")
            else:
                error = JobError(code=info.code, message=info.message)
                logger.warning("bank build job %s for %r failed: %s", job_id, status.bank, error.message)
            self._update(job_id, state="failed", finished=_now(), error=error)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _progress(self, job_id: str, stage: str, fraction: float) -> None:
        with self._lock:
            status = self._jobs[job_id]
            new_stage = stage != status.stage
            status.stage = str(stage)
            status.progress = min(1.0, max(0.0, float(fraction)))
            if new_stage:
                self._persist(status)

    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            status = self._jobs[job_id]
            for key, value in changes.items():
                setattr(status, key, value)
            self._persist(status)

    def _persist(self, status: JobStatus) -> None:
        target = self.jobs_dir / f"{status.id}.json"
        atomic.write_text(target, status.model_dump_json(indent=2))

    def _recover(self) -> None:
        for path in sorted(self.jobs_dir.glob("*.json")):
            try:
                status = JobStatus.model_validate_json(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.warning("ignoring unreadable job status %s", path)
                continue
            if status.state in ("queued", "running"):
                status.state = "failed"
                status.finished = _now()
                status.error = JobError(
                    code="interrupted", message="the service stopped before this build finished; upload the zip again"
                )
                self._persist(status)
            self._jobs[status.id] = status
        for folder in self.jobs_dir.iterdir():
            if folder.is_dir() and JOB_ID_PATTERN.fullmatch(folder.name):
                shutil.rmtree(folder, ignore_errors=True)
