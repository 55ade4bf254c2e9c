"""The audit log: one SQLite row per inspection (or per input that could not be inspected), in WAL mode.

WAL lets the service, the watched-folder runner and ``eagle audit`` read and write the same file at once
(readers never block the writer; writers from several processes wait up to ``busy_timeout``). Each row is
keyed by ``(image_sha256, image_name, run_id)`` and inserted with ``INSERT OR IGNORE``: replaying the same
run after a crash never counts an inspection twice, while the same picture inspected again (a new run id)
is a new row.

Columns: ``time`` (UTC ISO 8601), ``run_id``, ``source`` (``api``/``watch``/``app``), ``image_name``,
``image_sha256``, ``bank``, ``bank_id``, ``score``, ``tau``, ``s_max``, ``decision`` (the expert's
``anomalous``/``normal``), ``low_confidence``, ``caas_applied``, ``mllm_answer``, ``verdict``, ``model_id``,
``latency_ms``, ``status`` (``ok``/``error``), ``error_code``, ``error_message``.

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
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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
    UNIQUE (image_sha256, image_name, run_id)
);
CREATE INDEX IF NOT EXISTS inspections_time ON inspections (time);
CREATE INDEX IF NOT EXISTS inspections_bank_time ON inspections (bank, time);
"""

SOURCES = ("api", "watch", "app")


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
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"could not switch the audit log {self.path} to WAL mode (got {mode!r})")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            self._conn.executescript(_SCHEMA)
            self._conn.commit()

    def close(self) -> None:
        """Close the connection (further calls fail)."""
        with self._lock:
            self._conn.close()

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
            "score": float(result.score),
            "tau": float(result.tau),
            "s_max": float(result.s_max),
            "decision": result.expert_decision,
            "low_confidence": int(bool(result.low_confidence)),
            "caas_applied": int(bool(result.caas_applied)),
            "mllm_answer": result.mllm_answer,
            "verdict": result.verdict,
            "model_id": result.model_id,
            "latency_ms": None if latency_ms is None else float(latency_ms),
            "status": "ok",
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

    def _insert(self, row: dict[str, Any]) -> bool:
        names = ", ".join(row)
        marks = ", ".join(f":{name}" for name in row)
        with self._lock:
            cursor = self._conn.execute(f"INSERT OR IGNORE INTO inspections ({names}) VALUES ({marks})", row)
            self._conn.commit()
            return cursor.rowcount == 1

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
        decision = row["decision"] or ("error" if row["status"] == "error" else "")
        verdict = row["verdict"] or (row["error_code"] or "")
        yield (
            f"{row['time'][:26]:<26} {row['source']:<6} {_clip(row['image_name'], 28):<28} "
            f"{_clip(row['bank'] or '', 16):<16} {score:>8} {tau:>8} {decision:<10} {verdict:<10} {latency:>7}"
        )


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown audit source {source!r}; expected one of {', '.join(SOURCES)}")
    return source
