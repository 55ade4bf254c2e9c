"""Line health: the drift check's false-alarm rate, its delay to detect a shift, and its cost.

Simulated lines (the scores of good parts: log-normal, σ = 0.15, as in ``tests/test_line_health.py``):

* **False alarms**: ``--lines`` stable lines of ``--length`` inspections, the check run after every inspection
  (from ``min_inspections`` on) with the default :class:`expert.drift.DriftSettings`; reported per bank size
  (20 and 50 training scores): the share of checks that were not ``ok`` and the share of lines with any alarm.
* **Detection delay**: a line stable for 300 inspections whose scores then rise by ``1 + shift``: inspections
  after the step until the first ``watch`` and the first ``drifting`` (median over the lines; ``None`` when it
  never fired within the line).
* **Cost**: milliseconds per check (window 200, 50 training scores) and per audit query of the recent scores
  (:meth:`eagle.audit.AuditLog.recent_scores`) in a log of ``--audit-rows`` rows. The check runs on demand
  (``eagle bank health``, the API's health route, a metrics scrape), never inside an inspection, so it adds
  nothing to an inspection's latency.

Results go to ``bench/results/drift-<date>.json`` (``--out``).

Example:
    $ .venv/bin/python bench/bench_drift.py
    $ .venv/bin/python bench/bench_drift.py --lines 20 --length 500 --out /tmp/drift.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import machine as bench_machine  # noqa: E402

from eagle.audit import AuditLog  # noqa: E402
from expert.drift import DriftSettings, assess_drift  # noqa: E402

SHIFTS = (0.05, 0.10, 0.15, 0.20, 0.30)


def _train(rng: np.random.Generator, n_ref: int) -> tuple[np.ndarray, float]:
    train = rng.lognormal(0.0, 0.15, n_ref)
    return train, float(train.mean() + 3 * train.std())


def false_alarms(lines: int, length: int, n_ref: int, settings: DriftSettings, step: int) -> dict:
    """Stable lines judged every ``step`` inspections: the share of checks and of lines that were not ok."""
    checks = alarms = lines_with_alarm = 0
    for seed in range(lines):
        rng = np.random.default_rng(seed)
        train, tau = _train(rng, n_ref)
        stream = rng.lognormal(0.0, 0.15, length)
        states = [
            assess_drift(train, tau, stream[:i], settings).state
            for i in range(settings.min_inspections, length + 1, step)
        ]
        bad = sum(state != "ok" for state in states)
        checks, alarms, lines_with_alarm = checks + len(states), alarms + bad, lines_with_alarm + (bad > 0)
    return {
        "n_references": n_ref,
        "lines": lines,
        "inspections_per_line": length,
        "checks": checks,
        "checks_not_ok": alarms / checks,
        "lines_with_any_alarm": lines_with_alarm / lines,
    }


def detection_delay(lines: int, shift: float, settings: DriftSettings, after: int = 400) -> dict:
    """Inspections after a step of ``1 + shift`` until the first watch / drifting (median over ``lines``)."""
    delays: dict[str, list[int | None]] = {"watch": [], "drifting": []}
    for seed in range(lines):
        rng = np.random.default_rng(10_000 + seed)
        train, tau = _train(rng, 50)
        stream = np.concatenate([rng.lognormal(0.0, 0.15, 300), rng.lognormal(0.0, 0.15, after) * (1 + shift)])
        first: dict[str, int | None] = {"watch": None, "drifting": None}
        for i in range(1, after + 1):
            state = assess_drift(train, tau, stream[: 300 + i], settings).state
            if state in ("watch", "drifting") and first["watch"] is None:
                first["watch"] = i
            if state == "drifting":
                first["drifting"] = i
                break
        for key in delays:
            delays[key].append(first[key])

    def median(values: list[int | None]) -> float | None:
        found = [v for v in values if v is not None]
        return statistics.median(found) if len(found) * 2 > len(values) else None

    return {
        "shift": shift,
        "median_inspections_to_watch": median(delays["watch"]),
        "median_inspections_to_drifting": median(delays["drifting"]),
        "lines_reaching_drifting": sum(v is not None for v in delays["drifting"]) / lines,
    }


def cost(audit_rows: int, repeats: int) -> dict:
    """Milliseconds per check (window 200) and per audit query among ``audit_rows`` rows (median of ``repeats``)."""
    rng = np.random.default_rng(1)
    train, tau = _train(rng, 50)
    recent = rng.lognormal(0.0, 0.15, 200)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        assess_drift(train, tau, recent)
        times.append((time.perf_counter() - t0) * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        log = AuditLog(Path(tmp) / "audit.sqlite3")
        rows = [
            {
                "time": f"2026-12-07T00:00:{i % 60:02d}Z",
                "run_id": f"r{i}",
                "source": "api",
                "image_sha256": f"{i:064x}",
                "bank": "line",
                "bank_id": f"{i % 5:016x}",
                "score": float(rng.lognormal()),
                "status": "ok",
            }
            for i in range(audit_rows)
        ]
        with log._lock:  # a bulk load for the benchmark; the product writes row by row
            log._write(rows)
        query = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            log.recent_scores(f"{3:016x}", limit=200)
            query.append((time.perf_counter() - t0) * 1000)
        log.close()
    return {
        "check_ms_median": statistics.median(times),
        "audit_rows": audit_rows,
        "audit_query_ms_median": statistics.median(query),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100, help="Simulated lines per measurement (default 100).")
    parser.add_argument("--length", type=int, default=1000, help="Inspections per stable line (default 1000).")
    parser.add_argument("--step", type=int, default=1, help="Judge a stable line every STEP inspections (default 1).")
    parser.add_argument("--audit-rows", type=int, default=100_000, help="Rows in the audit log of the cost test.")
    parser.add_argument("--repeats", type=int, default=50, help="Repeats of each timed call (default 50).")
    parser.add_argument("--out", type=Path, default=None, help="Result file (default bench/results/drift-<date>.json).")
    args = parser.parse_args(argv)
    settings = DriftSettings()
    result = {
        "benchmark": "drift",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.model_dump(),
        "false_alarms": [false_alarms(args.lines, args.length, n, settings, args.step) for n in (20, 50)],
        "detection": [detection_delay(max(10, args.lines // 5), shift, settings) for shift in SHIFTS],
        "cost": cost(args.audit_rows, args.repeats),
        "machine": bench_machine.machine_info(["numpy", "scipy"]),
    }
    out = args.out or REPO / "bench" / "results" / f"drift-{result['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["false_alarms"]:
        print(
            f"stable, {row['n_references']} references: {100 * row['checks_not_ok']:.3f} % of {row['checks']} checks "
            f"not ok; {100 * row['lines_with_any_alarm']:.1f} % of lines with any alarm"
        )
    for row in result["detection"]:
        print(
            f"shift +{100 * row['shift']:.0f} %: watch after {row['median_inspections_to_watch']}, drifting after "
            f"{row['median_inspections_to_drifting']} inspections (median)"
        )
    print(
        f"cost: {result['cost']['check_ms_median']:.2f} ms per check, "
        f"{result['cost']['audit_query_ms_median']:.2f} ms per query"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
