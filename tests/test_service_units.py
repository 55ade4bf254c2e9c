"""Unit tests of the service's parts: auth rules, archive checks, metrics format, worker queue, audit log."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import sqlite3
import threading
import zipfile

import pytest
from pydantic import SecretStr

from deploy.archive import scan_archive
from deploy.auth import BearerAuth, InsecureBindError, check_bind, is_loopback
from deploy.errors import (
    ImageTooLarge,
    QueueFull,
    ShuttingDown,
)
from deploy.limits import check_image_pixels
from deploy.metrics import Registry, ServiceMetrics
from deploy.worker import InferenceWorker
from eagle.archives import ArchiveError, ArchiveLimits, ArchiveTooLargeError
from eagle.audit import AuditFilter, AuditLog, parse_time, write_csv
from eagle.banks import BankNameError, validate_bank_name
from eagle.errors import as_eagle_error
from eagle.records import InspectionResult
from tests.service_helpers import parse_metrics, png_bytes, zip_bytes


# -- auth ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("eagle.local", False),
        ("", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_check_bind_refuses_exposed_service_without_a_strong_token():
    check_bind("127.0.0.1", None)  # loopback: fine without a token
    for token in (None, "", "   ", SecretStr("")):
        with pytest.raises(InsecureBindError, match="without a token"):
            check_bind("0.0.0.0", token)
    with pytest.raises(InsecureBindError, match="at least 16"):
        check_bind("0.0.0.0", "short")
    check_bind("0.0.0.0", SecretStr("x" * 16))


def test_bearer_auth_disabled_without_token():
    assert not BearerAuth(None).enabled and not BearerAuth(SecretStr("  ")).enabled
    assert BearerAuth("t" * 20).enabled


# -- limits ------------------------------------------------------------------------------------------------------------
def test_pixel_limit_reads_the_header_only():
    data = png_bytes(50, 40)
    assert check_image_pixels(data, max_pixels=2000).pixels == 2000
    with pytest.raises(ImageTooLarge, match="2000 pixels \\(50x40\\); the limit is 1999"):
        check_image_pixels(data, max_pixels=1999, name="a.png")
    truncated = data[:100]  # header intact, pixels missing: the size is still known
    with pytest.raises(ImageTooLarge):
        check_image_pixels(truncated, max_pixels=10)
    assert check_image_pixels(b"not an image", max_pixels=10) is None  # left to the decoder


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "a\\b", "-lead", "x" * 65, "sp ace", "é", None, 5, "a..b", "bolts\n"]
)
def test_bad_bank_names(name):
    """The service checks names with eagle.banks' one rule (fullmatch: no trailing newline; no '..')."""
    with pytest.raises(BankNameError):
        validate_bank_name(name)


def test_good_bank_names():
    for name in ("a", "Bolts-2025_v1.2", "x" * 64):
        assert validate_bank_name(name) == name


# -- archives ----------------------------------------------------------------------------------------------------------
def _zip_path(tmp_path, files, **kw):
    path = tmp_path / "a.zip"
    path.write_bytes(zip_bytes(files, **kw) if kw else zip_bytes(files))
    return path


@pytest.mark.parametrize("bad", ["../x.png", "a/../../x.png", "/etc/x.png", "C:/x.png", "a\\..\\x.png"])
def test_archive_path_traversal_is_refused(tmp_path, bad):
    with pytest.raises(ArchiveError, match="unsafe entry name"):
        scan_archive(_zip_path(tmp_path, {"ok.png": b"1", bad: b"2"}), ArchiveLimits())


def test_archive_symlink_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = 0o120777 << 16  # S_IFLNK
        archive.writestr(info, "/etc/passwd")
    path = tmp_path / "l.zip"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ArchiveError, match="symbolic link"):
        scan_archive(path, ArchiveLimits())


def test_archive_bomb_and_count_limits(tmp_path):
    with pytest.raises(ArchiveTooLargeError, match="zip-bomb"):
        scan_archive(_zip_path(tmp_path, {"z.png": b"\0" * (4 * 1024 * 1024)}), ArchiveLimits())
    with pytest.raises(ArchiveTooLargeError, match="entries"):
        scan_archive(_zip_path(tmp_path, {f"{i}.png": b"x" for i in range(6)}), ArchiveLimits(max_entries=5))
    with pytest.raises(ArchiveTooLargeError, match="expands to 12 bytes in 2 entries .*; the limit is 10 bytes"):
        scan_archive(_zip_path(tmp_path, {"a.png": b"123456", "b.png": b"123456"}), ArchiveLimits(max_total_bytes=10))
    with pytest.raises(ArchiveError, match="not a readable zip"):
        (tmp_path / "t.zip").write_bytes(b"PK\x03\x04 broken")
        scan_archive(tmp_path / "t.zip", ArchiveLimits())


def test_archive_lists_images_only_sorted(tmp_path):
    files = {
        "z/b.PNG": b"1",
        "a.jpg": b"2",
        "__MACOSX/._a.jpg": b"3",
        ".hidden/c.png": b"4",
        "doc.txt": b"5",
        "sub/": b"",
    }
    entries = scan_archive(_zip_path(tmp_path, files), ArchiveLimits())
    assert [e.filename for e in entries] == ["a.jpg", "z/b.PNG"]
    with pytest.raises(ArchiveError, match="no images"):
        scan_archive(_zip_path(tmp_path, {"doc.txt": b"5"}), ArchiveLimits())


def test_archive_errors_map_to_service_errors(tmp_path):
    # the entry limit is eagle.archives' rule; the adapter only turns it into a 413
    with pytest.raises(ArchiveTooLargeError, match="'b.png' unpacks to 6 bytes; the limit is 5") as err:
        scan_archive(_zip_path(tmp_path, {"a.png": b"1", "b.png": b"123456"}), ArchiveLimits(max_entry_bytes=5))
    assert (err.value.http_status, err.value.code) == (413, "archive_too_large")
    # the same mapping serves a job whose extraction fails
    too_large, invalid = as_eagle_error(ArchiveTooLargeError("x")), as_eagle_error(ArchiveError("x"))
    assert (too_large.http_status, too_large.code) == (413, "archive_too_large")
    assert (invalid.http_status, invalid.code) == (422, "invalid_archive")


# -- metrics -----------------------------------------------------------------------------------------------------------
def test_histogram_buckets_are_cumulative_and_match_observations():
    registry = Registry()
    hist = registry.histogram("t_seconds", "T.", ["stage"], buckets=(0.1, 1.0, 10.0))
    values = [0.05, 0.1, 0.5, 2.0, 50.0]
    for v in values:
        hist.observe(v, stage="embed")
    samples = parse_metrics(registry.render())

    def bucket(le):
        return samples[("t_seconds_bucket", (("le", le), ("stage", "embed")))]

    for le in ("0.1", "1.0", "10.0"):
        assert bucket(le) == sum(v <= float(le) for v in values)  # le is inclusive, counts cumulative
    assert bucket("+Inf") == len(values) == samples[("t_seconds_count", (("stage", "embed"),))]
    assert samples[("t_seconds_sum", (("stage", "embed"),))] == pytest.approx(sum(values))


def test_label_values_are_escaped():
    registry = Registry()
    counter = registry.counter("t_total", "T.", ["bank"])
    counter.inc(bank='a"b\\c\nd')
    text = registry.render()
    assert 't_total{bank="a\\"b\\\\c\\nd"} 1.0' in text
    assert parse_metrics(text)[("t_total", (("bank", 'a\\"b\\\\c\\nd'),))] == 1.0


def test_service_metrics_gauges_and_special_values():
    metrics = ServiceMetrics(queue_state=lambda: (3, 8, True), job_states=lambda: {"running": 1})
    metrics.observe_inspection("bolts", "defect", {"embed": 12.0, "bad": math.nan, "neg": -1.0})
    samples = parse_metrics(metrics.render())
    assert samples[("eagle_queue_depth", ())] == 3 and samples[("eagle_queue_capacity", ())] == 8
    assert samples[("eagle_worker_busy", ())] == 1
    assert samples[("eagle_bank_jobs", (("state", "running"),))] == 1
    assert samples[("eagle_inspections_total", (("bank", "bolts"), ("verdict", "defect")))] == 1
    assert samples[("eagle_stage_duration_seconds_sum", (("stage", "embed"),))] == pytest.approx(0.012)
    assert not any(name.startswith("eagle_stage") and ("stage", "bad") in labels for name, labels in samples)
    assert not any(name.startswith("eagle_gpu") for name, _ in samples)  # no CUDA here


# -- worker ------------------------------------------------------------------------------------------------------------
def test_worker_runs_in_order_and_refuses_when_full():
    gate = threading.Event()
    started = threading.Event()
    order: list[int] = []

    def task(i):
        if i == 0:
            started.set()
            gate.wait(10)
        order.append(i)
        return i * 10

    worker = InferenceWorker(capacity=2, min_retry_after_s=5)
    worker.start()
    futures = [worker.submit(task, 0)]
    assert started.wait(10)
    futures += [worker.submit(task, 1), worker.submit(task, 2)]
    assert worker.depth == 2 and worker.busy
    with pytest.raises(QueueFull) as refused:
        worker.submit(task, 3)
    assert refused.value.retry_after >= 5 and refused.value.headers["Retry-After"] == str(refused.value.retry_after)
    assert worker.rejected == 1
    gate.set()
    assert [f.result(10) for f in futures] == [0, 10, 20] and order == [0, 1, 2]
    assert worker.shutdown(10)
    with pytest.raises(ShuttingDown):
        worker.submit(task, 4)


def test_worker_admits_one_running_plus_capacity_even_before_the_first_is_picked_up():
    gate = threading.Event()
    worker = InferenceWorker(capacity=2)
    worker.start()
    with worker._cond:  # three requests arrive together: the thread cannot pick up the first one yet
        futures = [worker.submit(gate.wait, 10) for _ in range(3)]
        assert worker.depth == 3 and not worker.busy
        with pytest.raises(QueueFull, match="2 waiting"):
            worker.submit(gate.wait, 10)
        assert worker.refusal() is not None
    gate.set()
    assert all(f.result(10) for f in futures)
    assert worker.rejected == 1 and worker.refusal() is None
    assert worker.shutdown(10)


def test_worker_shutdown_drains_accepted_tasks_and_propagates_errors():
    gate = threading.Event()
    worker = InferenceWorker(capacity=6)
    worker.start()
    futures = [worker.submit(gate.wait, 10)] + [worker.submit(lambda i=i: i) for i in range(4)]
    failing = worker.submit(lambda: 1 / 0)
    stopper = threading.Thread(target=worker.shutdown)
    stopper.start()
    gate.set()
    stopper.join(10)
    assert [f.result(0) for f in futures[1:]] == [0, 1, 2, 3]
    with pytest.raises(ZeroDivisionError):
        failing.result(0)
    assert not worker.alive and worker.completed == 6


def test_retry_after_follows_the_measured_task_time():
    worker = InferenceWorker(capacity=4, min_retry_after_s=1)
    worker._mean_task_s = 2.5
    worker._tasks.extend([None, None, None])  # three waiting (inspection only, never run)
    assert worker.retry_after() == math.ceil(4 * 2.5)


# -- audit -------------------------------------------------------------------------------------------------------------
def _result(name="a.png", score=0.7, sha="ab" * 32, bank="bolts", decision="anomalous") -> InspectionResult:
    return InspectionResult(
        image_name=name,
        image_sha256=sha,
        image_size=(10, 10),
        bank=bank,
        bank_id="id1",
        score=score,
        tau=0.5,
        s_max=0.9,
        expert_decision=decision,
        low_confidence=0.5 <= score <= 0.9,
        boxes=[],
        inspected_region=(0, 0, 10, 10),
        mode="expert-only",
        verdict="defect" if decision == "anomalous" else "no_defect",
    )


def test_audit_log_is_wal_and_deduplicates_runs(tmp_path):
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path) as log:
        assert log.record(_result(), source="api", run_id="r1", latency_ms=12.5)
        assert not log.record(_result(), source="api", run_id="r1", latency_ms=99.0)  # replay: ignored
        assert log.record(_result(), source="api", run_id="r2")  # same image, new run: a new row
        assert log.count() == 2 and log.has_run("r1") and not log.has_run("r3")
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        row = raw.execute("SELECT score, tau, latency_ms, decision, verdict FROM inspections WHERE run_id='r1'")
        assert row.fetchone() == (0.7, 0.5, 12.5, "anomalous", "defect")
    with pytest.raises(ValueError, match="unknown audit source"):
        AuditLog(path).record(_result(), source="ftp", run_id="x")


def test_audit_concurrent_writers_from_threads(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite3")
    threads = [
        threading.Thread(
            target=lambda t=t: [
                log.record(_result(name=f"{t}-{i}.png"), source="watch", run_id=f"{t}") for i in range(25)
            ]
        )
        for t in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert log.count() == 100


def test_audit_filters_limit_and_csv(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite3")
    for i in range(6):
        decision = "anomalous" if i % 2 else "normal"
        log.record(
            _result(name=f"{i}.png", bank="a" if i < 4 else "b", decision=decision), source="api", run_id=f"r{i}"
        )
    log.record_failure(
        run_id="f",
        source="watch",
        image_name="bad.png",
        image_sha256="00" * 32,
        bank="a",
        error_code="invalid_image",
        error_message="not an image",
    )
    assert [r["image_name"] for r in log.query(AuditFilter(bank="a", decision="anomalous"))] == ["1.png", "3.png"]
    assert [r["image_name"] for r in log.query(AuditFilter(limit=2))] == ["5.png", "bad.png"]  # newest, oldest first
    assert [r["error_code"] for r in log.query(AuditFilter(status="error"))] == ["invalid_image"]
    assert log.query(AuditFilter(since=parse_time("1h"))) == log.query()
    assert log.query(AuditFilter(until=parse_time("1h"))) == []
    buffer = io.StringIO()
    assert write_csv(log.query(), buffer) == 7
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert len(rows) == 7 and rows[0]["image_name"] == "0.png" and float(rows[0]["score"]) == 0.7
    assert rows[-1]["status"] == "error" and rows[-1]["score"] == ""


def test_parse_time_forms():
    now = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
    assert parse_time("30m", now=now) == "2025-03-01T11:30:00.000000+00:00"
    assert parse_time("7d", now=now) == "2025-02-22T12:00:00.000000+00:00"
    assert parse_time("2025-01-31T08:00+02:00") == "2025-01-31T06:00:00.000000+00:00"
    naive = parse_time("2025-01-31T08:00")  # local time
    expected = dt.datetime(2025, 1, 31, 8, 0).astimezone().astimezone(dt.timezone.utc)
    assert naive == expected.isoformat(timespec="microseconds")
    with pytest.raises(ValueError, match="unreadable time"):
        parse_time("yesterday")


# -- eagle audit (the command) and job recovery ------------------------------------------------------------------
def _run_cli(argv, settings):
    from eagle.cli import build_parser

    args = build_parser(["eagle.cli_audit"]).parser.parse_args(argv)
    return args.func(args, settings)


def test_eagle_audit_filters_and_exports_csv(tmp_path, capsys):
    from eagle.errors import CommandError
    from eagle.settings import Settings

    settings = Settings(data_dir=tmp_path)
    with AuditLog(tmp_path / "audit.sqlite3") as log:
        for i in range(4):
            log.record(
                _result(name=f"{i}.png", bank="a" if i < 3 else "b", decision="anomalous" if i % 2 else "normal"),
                source="watch",
                run_id=f"r{i}",
                latency_ms=10.0 * i,
            )
    out = tmp_path / "x.csv"
    assert _run_cli(["audit", "--bank", "a", "--decision", "anomalous", "--csv", str(out)], settings) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["image_name"] for r in rows] == ["1.png"] and rows[0]["latency_ms"] == "10.0"
    assert _run_cli(["audit", "--since", "1h", "--limit", "2"], settings) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and "2.png" in table[1] and "3.png" in table[2]
    with pytest.raises(CommandError, match="unreadable time"):
        _run_cli(["audit", "--since", "last tuesday"], settings)
    with pytest.raises(CommandError, match="no audit log"):
        _run_cli(["audit"], Settings(data_dir=tmp_path / "empty"))


def test_jobs_interrupted_by_a_restart_are_reported_failed(tmp_path):
    from deploy.jobs import BankBuildJobs, JobStatus

    jobs_dir = tmp_path / "jobs"
    (jobs_dir / ("a" * 32)).mkdir(parents=True)  # a staged upload left behind
    running = JobStatus(id="b" * 32, bank="bolts", state="running", created="2025-01-01T00:00:00+00:00")
    done = JobStatus(id="c" * 32, bank="nuts", state="succeeded", created="2025-01-01T00:00:00+00:00")
    for status in (running, done):
        (jobs_dir / f"{status.id}.json").write_text(status.model_dump_json())
    jobs = BankBuildJobs(object(), jobs_dir, limits=ArchiveLimits())
    assert jobs.get("b" * 32).state == "failed" and jobs.get("b" * 32).error.code == "interrupted"
    assert jobs.get("c" * 32).state == "succeeded"
    assert not (jobs_dir / ("a" * 32)).exists()
    assert json.loads((jobs_dir / f"{'b' * 32}.json").read_text())["state"] == "failed"  # persisted


def test_gpu_memory_gauges_read_torch_only_when_cuda_is_in_use(monkeypatch):
    import sys
    import types

    allocated = {0: 1_000_000.0, 1: 2_500_000.0}
    fake_cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 2,
        memory_allocated=lambda i: allocated[i],
        memory_reserved=lambda i: 2 * allocated[i],
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    samples = parse_metrics(ServiceMetrics().render())
    assert samples[("eagle_gpu_memory_allocated_bytes", (("device", "cuda:1"),))] == 2_500_000.0
    assert samples[("eagle_gpu_memory_reserved_bytes", (("device", "cuda:0"),))] == 2_000_000.0
    fake_cuda.is_initialized = lambda: False  # torch present, CUDA never used: no gauge, no initialisation
    assert not any(name.startswith("eagle_gpu") for name, _ in parse_metrics(ServiceMetrics().render()))
