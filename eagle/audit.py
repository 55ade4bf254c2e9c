"""The audit log: one SQLite row per inspection (or per input that could not be inspected), in WAL mode.

It lives in ``eagle`` (not in a front end) because every front end writes it: the service (source ``api``), the
watched folder (``watch``) and the app (``app``). Operator feedback (confirm or overrule a verdict) goes into a
separate ``feedback`` table linked by run id (:meth:`AuditLog.record_feedback`); an inspection row is never
edited. :func:`line_stats` turns both into per-bank, per-period line statistics (``eagle audit stats``).

WAL lets the service, the watched-folder runner and ``eagle audit`` read and write the same file at once
(readers never block the writer; writers from several processes wait up to ``busy_timeout``). Each row is
keyed by ``(image_sha256, image_name, run_id)`` and inserted with ``INSERT OR IGNORE``: replaying the same
run after a crash never counts an inspection twice, while the same picture inspected again (a new run id)
is a new row.

Columns: ``time`` (UTC ISO 8601), ``run_id``, ``source`` (``api``/``watch``/``app``), ``image_name``,
``image_sha256``, ``bank``, ``bank_id``, ``score``, ``tau``, ``s_max``, ``decision`` (the expert's
``anomalous``/``normal``), ``low_confidence``, ``caas_applied``, ``mllm_answer``, ``verdict``, ``model_id``,
``latency_ms``, ``status`` (``ok``/``error``), ``error_code``, ``error_message``, ``mode`` (who decided:
``expert-only``, ``expert+mllm`` or ``mllm-only-0shot``, a line declared before its bank exists, where ``score``,
``tau``, ``s_max`` and ``decision`` are empty; empty on rows written before the column existed).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> log = AuditLog(Path(tempfile.mkdtemp()) / "audit.sqlite3")
    >>> log.record_failure(run_id="r1", source="watch", image_name="a.png", image_sha256="00" * 32,
    ...                    bank="screws", error_code="invalid_image", error_message="not an image")
    True
    >>> [row["status"] for row in log.query()]
    ['error']
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, get_args

from eagle.errors import EagleError, is_disk_full
from eagle.records import OPERATOR_VERDICTS


class InspectionNotFoundError(EagleError, LookupError):
    """Feedback for a run id the audit log has no successful inspection of."""

    code, http_status = "inspection_not_found", 404


class FeedbackError(EagleError, ValueError):
    """Feedback that contradicts itself (e.g. confirming a verdict while giving another one)."""

    code, http_status = "invalid_feedback", 422


COLUMNS: tuple[str, ...] = (
    "id",
    "time",
    "run_id",
    "source",
    "image_name",
    "image_sha256",
    "bank",
    "bank_id",
    "score",
    "tau",
    "s_max",
    "decision",
    "low_confidence",
    "caas_applied",
    "mllm_answer",
    "verdict",
    "model_id",
    "latency_ms",
    "status",
    "error_code",
    "error_message",
    "mode",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inspections (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          TEXT    NOT NULL,
    run_id        TEXT    NOT NULL,
    source        TEXT    NOT NULL,
    image_name    TEXT    NOT NULL DEFAULT '',
    image_sha256  TEXT    NOT NULL,
    bank          TEXT,
    bank_id       TEXT,
    score         REAL,
    tau           REAL,
    s_max         REAL,
    decision      TEXT,
    low_confidence INTEGER,
    caas_applied  INTEGER,
    mllm_answer   TEXT,
    verdict       TEXT,
    model_id      TEXT,
    latency_ms    REAL,
    status        TEXT    NOT NULL,
    error_code    TEXT,
    error_message TEXT,
    mode          TEXT,
    UNIQUE (image_sha256, image_name, run_id)
);
CREATE INDEX IF NOT EXISTS inspections_time ON inspections (time);
CREATE INDEX IF NOT EXISTS inspections_bank_time ON inspections (bank, time);
CREATE INDEX IF NOT EXISTS inspections_bank_id ON inspections (bank_id, id);
CREATE TABLE IF NOT EXISTS feedback (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    time           TEXT    NOT NULL,
    run_id         TEXT    NOT NULL,
    inspection_id  INTEGER NOT NULL REFERENCES inspections (id),
    feedback       TEXT    NOT NULL,
    correct_verdict TEXT,
    operator       TEXT,
    note           TEXT,
    source         TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_run ON feedback (run_id);
CREATE INDEX IF NOT EXISTS feedback_inspection ON feedback (inspection_id);
"""

FEEDBACK_COLUMNS: tuple[str, ...] = (
    "id",
    "time",
    "run_id",
    "inspection_id",
    "feedback",
    "correct_verdict",
    "operator",
    "note",
    "source",
)
"""Columns of the ``feedback`` table: ``feedback`` is ``confirmed``/``overruled``; ``correct_verdict`` the operator's
verdict (``defect``/``no_defect``; the ground truth of :func:`line_stats`), ``None`` when an ``unknown`` verdict was
confirmed."""

FeedbackKind = Literal["confirmed", "overruled"]
"""An operator's feedback on one inspection's verdict."""

FEEDBACK_KINDS: tuple[FeedbackKind, ...] = get_args(FeedbackKind)
VERDICTS = OPERATOR_VERDICTS
"""The verdicts an operator can give as the right one (:data:`eagle.records.OPERATOR_VERDICTS`)."""
MAX_FEEDBACK_TEXT = 1000
"""Longest operator name or note kept (longer ones are refused)."""

AuditSource = Literal["api", "watch", "app"]
"""Which front end an audited inspection came through."""

SOURCES: tuple[AuditSource, ...] = get_args(AuditSource)


def default_audit_path(settings: Any) -> Path:
    """Where the audit log lives: ``settings.service.audit_path`` or ``<data_dir>/audit.sqlite3``."""
    configured = settings.service.audit_path
    return Path(configured) if configured is not None else Path(settings.data_dir) / "audit.sqlite3"


def utc_now() -> str:
    """The current time as UTC ISO 8601 with microseconds (sorts lexically = chronologically)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: dt.datetime | None = None) -> str:
    """Turn a user's time into the log's UTC ISO form.

    Accepts ISO 8601 dates or datetimes (``2025-01-31``, ``2025-01-31T08:00``, with or without an offset; naive
    values are local time) and relative ages (``30m``, ``24h``, ``7d``, ``2w``: that long before ``now``).

    Raises:
        ValueError: with a one-line message naming the accepted forms.

    Example:
        >>> parse_time("2h", now=dt.datetime(2025, 1, 1, 12, tzinfo=dt.timezone.utc))
        '2025-01-01T10:00:00.000000+00:00'
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    match = _RELATIVE.match(text)
    if match:
        moment = now - dt.timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    else:
        try:
            moment = dt.datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(
                f"unreadable time {text!r}: use ISO 8601 (2025-01-31, 2025-01-31T08:00, ...+02:00) or an age "
                "such as 30m, 24h, 7d"
            ) from None
        if moment.tzinfo is None:
            moment = moment.astimezone()  # naive: local time
    return moment.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class AuditFilter:
    """Which rows :meth:`AuditLog.query` returns (all fields optional; ``since``/``until`` in UTC ISO form)."""

    since: str | None = None
    until: str | None = None
    bank: str | None = None
    decision: str | None = None
    verdict: str | None = None
    source: str | None = None
    status: str | None = None
    limit: int | None = None


MAX_PENDING_ROWS = 10_000
"""Rows held in memory at most while the disk is full (then each further one is logged as lost)."""

_log = logging.getLogger(__name__)


class AuditLog:
    """Append-only inspection log in one SQLite file (WAL mode), safe to share between threads and processes.

    Args:
        path: the database file; parent folders are created.
        busy_timeout_ms: how long a writer waits for another process's write lock.
    """

    def __init__(self, path: Path, *, busy_timeout_ms: int = 15_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []  # rows a full disk refused, written with the next insert
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"could not switch the audit log {self.path} to WAL mode (got {mode!r})")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            self._conn.executescript(_SCHEMA)
            present = {row[1] for row in self._conn.execute("PRAGMA table_info(inspections)").fetchall()}
            if "mode" not in present:  # a log written before the column existed: rows stay, their mode is empty
                self._conn.execute("ALTER TABLE inspections ADD COLUMN mode TEXT")
            self._conn.commit()

    def close(self) -> None:
        """Close the connection (further calls fail); rows a full disk held back are tried once more first."""
        with self._lock:
            if self._pending:
                try:
                    self._write([])
                except sqlite3.Error as err:
                    runs = ", ".join(str(r["run_id"]) for r in self._pending)
                    _log.error(
                        "audit log: %d row(s) could not be written (%s); lost runs: %s", len(self._pending), err, runs
                    )
            self._conn.close()

    @property
    def pending(self) -> int:
        """Rows held in memory because the disk was full (written with the next insert once space returns)."""
        with self._lock:
            return len(self._pending)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------------------
    def record(self, result: Any, *, source: str, run_id: str, latency_ms: float | None = None) -> bool:
        """Append one inspection (an ``eagle.records.InspectionResult``).

        Args:
            result: the pipeline's result record.
            source: ``api``, ``watch`` or ``app``.
            run_id: identifies this inspection run; replaying the same run id for the same image is a no-op.
            latency_ms: wall time of the inspection as the caller saw it (queue wait excluded).

        Returns:
            ``True`` if a row was added, ``False`` if this run was already logged.
        """
        row = {
            "time": utc_now(),
            "run_id": run_id,
            "source": _check_source(source),
            "image_name": result.image_name or "",
            "image_sha256": result.image_sha256,
            "bank": result.bank,
            "bank_id": result.bank_id,
            "score": _number(result.score),
            "tau": _number(result.tau),
            "s_max": _number(result.s_max),
            "decision": result.expert_decision,
            "low_confidence": int(bool(result.low_confidence)),
            "caas_applied": int(bool(result.caas_applied)),
            "mllm_answer": result.mllm_answer,
            "verdict": result.verdict,
            "model_id": result.model_id,
            "latency_ms": None if latency_ms is None else float(latency_ms),
            "status": "ok",
            "mode": getattr(result, "mode", None),
        }
        return self._insert(row)

    def record_failure(
        self,
        *,
        run_id: str,
        source: str,
        image_name: str | None,
        image_sha256: str,
        bank: str | None,
        error_code: str,
        error_message: str,
        latency_ms: float | None = None,
    ) -> bool:
        """Append an input that could not be inspected (e.g. an unreadable file in the watched folder).

        Returns:
            ``True`` if a row was added, ``False`` if this run was already logged.
        """
        row = {
            "time": utc_now(),
            "run_id": run_id,
            "source": _check_source(source),
            "image_name": image_name or "",
            "image_sha256": image_sha256,
            "bank": bank,
            "latency_ms": latency_ms,
            "status": "error",
            "error_code": error_code,
            "error_message": error_message,
        }
        return self._insert(row)

    def record_feedback(
        self,
        run_id: str,
        feedback: str,
        *,
        correct_verdict: str | None = None,
        operator: str | None = None,
        note: str | None = None,
        source: str = "api",
    ) -> dict[str, Any]:
        """Add an operator's feedback on inspection ``run_id`` as a new ``feedback`` row (the inspection is untouched).

        Several feedbacks on one run are kept; statistics use the latest.

        Args:
            run_id: the run id of a successful inspection (the API's ``request_id``, the app's run id).
            feedback: ``confirmed`` or ``overruled``.
            correct_verdict: the right verdict (``defect``/``no_defect``); for ``overruled`` it defaults to the
                opposite of a ``defect``/``no_defect`` verdict and is required for an ``unknown`` one.
            operator: who gave the feedback.
            note: free text.
            source: ``api``, ``watch`` or ``app``.

        Returns:
            The stored feedback row, with the inspection's ``bank``, original ``verdict``, ``image_sha256``,
            ``image_name`` and ``mode`` (what collecting a declared line's good parts needs).

        Raises:
            InspectionNotFoundError: no ``ok`` inspection carries ``run_id``.
            FeedbackError: an unknown kind or verdict, a contradiction, or an over-long text.
        """
        if feedback not in FEEDBACK_KINDS:
            raise FeedbackError(f"feedback must be one of {', '.join(FEEDBACK_KINDS)}, not {feedback!r}")
        if correct_verdict is not None and correct_verdict not in VERDICTS:
            raise FeedbackError(f"correct verdict must be one of {', '.join(VERDICTS)}, not {correct_verdict!r}")
        for label, text in (("operator", operator), ("note", note)):
            if text is not None and len(text) > MAX_FEEDBACK_TEXT:
                raise FeedbackError(f"{label} is longer than {MAX_FEEDBACK_TEXT} characters")
        with self._lock:
            found = self._conn.execute(
                "SELECT id, bank, verdict, image_sha256, image_name, mode FROM inspections "
                "WHERE run_id = ? AND status = 'ok' ORDER BY id DESC LIMIT 1",
                (run_id,),
            ).fetchone()
        if found is None:
            raise InspectionNotFoundError(f"no inspection with run id {run_id[:80]!r} in the audit log")
        original = found["verdict"]
        correct = _correct_verdict(original, feedback, correct_verdict)
        row = {
            "time": utc_now(),
            "run_id": run_id,
            "inspection_id": int(found["id"]),
            "feedback": feedback,
            "correct_verdict": correct,
            "operator": operator or None,
            "note": note or None,
            "source": _check_source(source),
        }
        names = ", ".join(row)
        marks = ", ".join(f":{name}" for name in row)
        with self._lock:
            cursor = self._conn.execute(f"INSERT INTO feedback ({names}) VALUES ({marks})", row)
            self._conn.commit()
        return {
            "id": cursor.lastrowid,
            **row,
            "bank": found["bank"],
            "verdict": original,
            "image_sha256": found["image_sha256"],
            "image_name": found["image_name"] or None,
            "mode": found["mode"],
        }

    def feedback(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Feedback rows (all, or those of ``run_id``), oldest first."""
        sql = f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback"
        params: tuple[Any, ...] = ()
        if run_id is not None:
            sql += " WHERE run_id = ?"
            params = (run_id,)
        with self._lock:
            return [dict(row) for row in self._conn.execute(sql + " ORDER BY id", params).fetchall()]

    def latest_feedback(self) -> dict[int, dict[str, Any]]:
        """The latest feedback row per inspection row id."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback WHERE id IN "
                "(SELECT MAX(id) FROM feedback GROUP BY inspection_id)"
            ).fetchall()
        return {int(row["inspection_id"]): dict(row) for row in rows}

    def recent_scores(self, bank_id: str, *, limit: int) -> list[tuple[str, float]]:
        """``(time, score)`` of the ``limit`` latest inspections of one bank version that no operator marked defective.

        The scores the line-health check compares with the bank's own (:mod:`eagle.line_health`): successful
        inspections of bank id ``bank_id`` (one version; every audited source), leaving out each row whose latest
        feedback gives ``defect`` as the correct verdict. Oldest first.
        """
        sql = (
            "SELECT i.time, i.score FROM inspections AS i WHERE i.bank_id = ? AND i.status = 'ok' "
            "AND i.score IS NOT NULL AND COALESCE((SELECT f.correct_verdict FROM feedback AS f "
            "WHERE f.inspection_id = i.id ORDER BY f.id DESC LIMIT 1), '') != 'defect' ORDER BY i.id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._conn.execute(sql, (bank_id, int(limit))).fetchall()
        return [(str(row["time"]), float(row["score"])) for row in reversed(rows)]

    def stats(self, where: AuditFilter | None = None, *, per: str = "all") -> list[dict[str, Any]]:
        """:func:`line_stats` of the rows matching ``where`` with their latest feedback."""
        return line_stats(self.query(where), self.latest_feedback(), per=per)

    def _insert(self, row: dict[str, Any]) -> bool:
        """Insert ``row`` (after any rows a full disk held back); a full disk keeps it in memory and logs an error.

        Returns:
            ``True`` if the row was added (or is held until space returns), ``False`` if its run was already logged.
        """
        with self._lock:
            try:
                return self._write([row])
            except sqlite3.Error as err:
                if not is_disk_full(err):
                    raise
                if len(self._pending) >= MAX_PENDING_ROWS:
                    _log.error(
                        "audit log: the disk is full and %d rows wait; run %s is lost", MAX_PENDING_ROWS, row["run_id"]
                    )
                    return False
                self._pending.append(row)
                _log.error(
                    "audit log: the disk is full; run %s (%s) is held in memory and written when space returns "
                    "(%d waiting)",
                    row["run_id"],
                    row.get("error_code") or row.get("status"),
                    len(self._pending),
                )
                return True

    def _write(self, rows: list[dict[str, Any]]) -> bool:
        """Insert the held-back rows, then ``rows``, in one transaction (all or none); holding ``_lock``."""
        added = False
        try:
            for item in [*self._pending, *rows]:
                names = ", ".join(item)
                marks = ", ".join(f":{name}" for name in item)
                cursor = self._conn.execute(f"INSERT OR IGNORE INTO inspections ({names}) VALUES ({marks})", item)
                added = cursor.rowcount == 1
            self._conn.commit()
        except BaseException:
            self._conn.rollback()
            raise
        if self._pending:
            _log.warning("audit log: space is back; %d held row(s) written", len(self._pending))
            self._pending.clear()
        return added

    # -- reading ---------------------------------------------------------------------------------------------
    def query(self, where: AuditFilter | None = None) -> list[dict[str, Any]]:
        """Rows matching ``where``, oldest first (with ``limit``: the most recent ``limit`` rows, oldest first)."""
        where = where or AuditFilter()
        clauses: list[str] = []
        params: list[Any] = []
        for column, op, value in (
            ("time", ">=", where.since),
            ("time", "<", where.until),
            ("bank", "=", where.bank),
            ("decision", "=", where.decision),
            ("verdict", "=", where.verdict),
            ("source", "=", where.source),
            ("status", "=", where.status),
        ):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(value)
        sql = f"SELECT {', '.join(COLUMNS)} FROM inspections"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        if where.limit is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id"
            params.append(int(where.limit))
        else:
            sql += " ORDER BY id"
        with self._lock:
            return [dict(row) for row in self._conn.execute(sql, params).fetchall()]

    def count(self) -> int:
        """Number of rows."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM inspections").fetchone()[0])

    def has_run(self, run_id: str) -> bool:
        """Whether any row carries ``run_id``."""
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM inspections WHERE run_id = ? LIMIT 1", (run_id,)).fetchone()
        return row is not None


def _correct_verdict(original: str | None, feedback: str, given: str | None) -> str | None:
    """The ground truth an operator's feedback sets (see :meth:`AuditLog.record_feedback`)."""
    if feedback == "confirmed":
        if given is not None and given != original:
            raise FeedbackError(
                f"confirming verdict {original!r} contradicts the correct verdict {given!r}; send 'overruled'"
            )
        return original if original in VERDICTS else None
    if given is None:
        if original not in VERDICTS:
            raise FeedbackError(f"overruling verdict {original!r} needs the correct verdict (defect or no_defect)")
        return "no_defect" if original == "defect" else "defect"
    if given == original:
        raise FeedbackError(f"overruling verdict {original!r} with the same verdict; send 'confirmed'")
    return given


STATS_COLUMNS: tuple[str, ...] = (
    "bank",
    "period",
    "inspections",
    "errors",
    "defects",
    "defect_rate",
    "feedback",
    "overruled",
    "overrule_rate",
    "true_positives",
    "false_positives",
    "false_negatives",
    "precision",
    "recall",
    "mllm_asked",
    "expert_mllm_disagreements",
    "expert_mllm_disagreement_rate",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
)
"""The columns of :func:`line_stats` (and of ``eagle audit stats --csv``)."""

PERIODS = ("all", "day", "week", "month")


def _period(time: str, per: str) -> str:
    if per == "all":
        return "all"
    day = dt.date.fromisoformat(time[:10])
    if per == "day":
        return day.isoformat()
    if per == "week":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    if per == "month":
        return day.isoformat()[:7]
    raise ValueError(f"unknown period {per!r}; expected one of {', '.join(PERIODS)}")


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default); None if empty.

    Example:
        >>> percentile([10.0, 20.0, 30.0, 40.0], 50)
        25.0
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def line_stats(
    rows: list[dict[str, Any]], feedback: dict[int, dict[str, Any]], *, per: str = "all"
) -> list[dict[str, Any]]:
    """Line statistics per bank and period, in :data:`STATS_COLUMNS`.

    Definitions (``ok`` rows only, except ``errors``):

    * ``defect_rate``: verdict ``defect`` / inspections;
    * ``overrule_rate``: inspections whose latest feedback is ``overruled`` / inspections with feedback;
    * ``precision``/``recall``: the verdict ``defect`` against the operator's correct verdict (the ground truth)
      on inspections with feedback that sets one; a verdict ``unknown`` counts as not flagged;
    * ``expert_mllm_disagreement_rate``: among inspections where the MLLM answered (``mllm_answer`` set, verdict
      not ``unknown``), those where the expert's decision (``anomalous``) and the verdict (``defect``) differ;
    * latency percentiles: linear interpolation (:func:`percentile`) over the rows that carry a latency.

    Rates are ``None`` when their denominator is 0. Groups are sorted by bank, then period.

    Args:
        rows: audit rows (:meth:`AuditLog.query`).
        feedback: latest feedback per inspection row id (:meth:`AuditLog.latest_feedback`).
        per: ``all`` (one group per bank), ``day``, ``week`` (ISO) or ``month`` (by UTC time).
    """
    if per not in PERIODS:
        raise ValueError(f"unknown period {per!r}; expected one of {', '.join(PERIODS)}")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["bank"] or "", _period(row["time"], per)), []).append(row)
    out = []
    for (bank, period), members in sorted(groups.items()):
        ok = [r for r in members if r["status"] == "ok"]
        defects = sum(1 for r in ok if r["verdict"] == "defect")
        reviewed = [(r, feedback[r["id"]]) for r in ok if r["id"] in feedback]
        overruled = sum(1 for _, f in reviewed if f["feedback"] == "overruled")
        truth = [
            (r["verdict"] == "defect", f["correct_verdict"] == "defect") for r, f in reviewed if f["correct_verdict"]
        ]
        tp = sum(1 for flagged, real in truth if flagged and real)
        fp = sum(1 for flagged, real in truth if flagged and not real)
        fn = sum(1 for flagged, real in truth if not flagged and real)
        asked = [r for r in ok if r["mllm_answer"] is not None and r["verdict"] in VERDICTS]
        with_expert = [r for r in asked if r["decision"] is not None]  # an MLLM-only row has no expert to differ from
        disagree = sum(1 for r in with_expert if (r["decision"] == "anomalous") != (r["verdict"] == "defect"))
        latencies = [float(r["latency_ms"]) for r in ok if r["latency_ms"] is not None]
        out.append(
            {
                "bank": bank,
                "period": period,
                "inspections": len(ok),
                "errors": len(members) - len(ok),
                "defects": defects,
                "defect_rate": _ratio(defects, len(ok)),
                "feedback": len(reviewed),
                "overruled": overruled,
                "overrule_rate": _ratio(overruled, len(reviewed)),
                "true_positives": tp,
                "false_positives": fp,
                "false_negatives": fn,
                "precision": _ratio(tp, tp + fp),
                "recall": _ratio(tp, tp + fn),
                "mllm_asked": len(asked),
                "expert_mllm_disagreements": disagree,
                "expert_mllm_disagreement_rate": _ratio(disagree, len(with_expert)),
                "latency_p50_ms": percentile(latencies, 50),
                "latency_p90_ms": percentile(latencies, 90),
                "latency_p99_ms": percentile(latencies, 99),
            }
        )
    return out


def write_stats_csv(stats: list[dict[str, Any]], stream: IO[str]) -> int:
    """Write :func:`line_stats` groups as CSV (header :data:`STATS_COLUMNS`; empty cells for ``None``)."""
    writer = csv.DictWriter(stream, fieldnames=list(STATS_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for group in stats:
        writer.writerow({k: "" if group[k] is None else group[k] for k in STATS_COLUMNS})
    return len(stats)


def format_stats(stats: list[dict[str, Any]]) -> Iterator[str]:
    """Human-readable lines: one per bank and period."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    yield (
        f"{'bank':<16} {'period':<10} {'insp':>6} {'defect':>7} {'fb':>5} {'overrl':>7} {'prec':>7} {'recall':>7} "
        f"{'disagr':>7} {'p50ms':>7} {'p90ms':>7} {'p99ms':>7}"
    )
    for g in stats:
        yield (
            f"{_clip(g['bank'], 16):<16} {g['period']:<10} {g['inspections']:>6} {pct(g['defect_rate']):>7} "
            f"{g['feedback']:>5} {pct(g['overrule_rate']):>7} {pct(g['precision']):>7} {pct(g['recall']):>7} "
            f"{pct(g['expert_mllm_disagreement_rate']):>7} {ms(g['latency_p50_ms']):>7} "
            f"{ms(g['latency_p90_ms']):>7} {ms(g['latency_p99_ms']):>7}"
        )


def write_csv(rows: list[dict[str, Any]], stream: IO[str]) -> int:
    """Write rows as CSV with a header of :data:`COLUMNS`; returns the number of data rows."""
    writer = csv.DictWriter(stream, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return len(rows)


def format_table(rows: list[dict[str, Any]]) -> Iterator[str]:
    """Human-readable lines for a terminal: time, source, image, bank, score/τ, decision, verdict, latency."""
    yield (
        f"{'time (UTC)':<26} {'source':<6} {'image':<28} {'bank':<16} {'score':>8} {'tau':>8} {'decision':<10} "
        f"{'verdict':<10} {'ms':>7}"
    )
    for row in rows:
        score = "" if row["score"] is None else f"{row['score']:.4g}"
        tau = "" if row["tau"] is None else f"{row['tau']:.4g}"
        latency = "" if row["latency_ms"] is None else f"{row['latency_ms']:.0f}"
        mode_word = _MODE_WORDS.get(str(row.get("mode") or ""), "")
        decision = row["decision"] or ("error" if row["status"] == "error" else mode_word)
        verdict = row["verdict"] or (row["error_code"] or "")
        yield (
            f"{row['time'][:26]:<26} {row['source']:<6} {_clip(row['image_name'], 28):<28} "
            f"{_clip(row['bank'] or '', 16):<16} {score:>8} {tau:>8} {decision:<10} {verdict:<10} {latency:>7}"
        )


_MODE_WORDS = {"mllm-only-0shot": "mllm-0shot"}
"""What the table's decision column says when no expert decided (a declared line's MLLM-only inspection)."""


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown audit source {source!r}; expected one of {', '.join(SOURCES)}")
    return source
