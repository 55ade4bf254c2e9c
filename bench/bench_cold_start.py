"""Cold start of the ``eagle`` command line: wall time of fresh processes and the heavy libraries they import.

Each measured command (``eagle --version``, ``eagle --help``, ``eagle score --help``) runs ``--runs`` times
(default 7) as a new ``python -m eagle ...`` process; the table shows the median, min and max wall time
(``time.perf_counter`` around ``subprocess.run``, interpreter start included). One more run per command with
``python -X importtime`` counts the modules imported and names the heavy libraries among them (torch,
gradio, ...).

The results are merged into ``bench/results/cold-start-<date>.json`` under ``--label`` (for example ``before``
and ``after`` a change), so one file holds both sides of a comparison.

Example:
    $ .venv/bin/python bench/bench_cold_start.py --label after
    $ .venv/bin/python bench/bench_cold_start.py --label before --runs 11 --out /tmp/cold.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_OUT = RESULTS_DIR / "cold-start-2026-12-06.json"

sys.path.insert(0, str(REPO / "bench"))
import machine as bench_machine  # noqa: E402

#: The commands measured, as ``eagle`` arguments.
COMMANDS: tuple[tuple[str, ...], ...] = (("--version",), ("--help",), ("score", "--help"))

#: Libraries whose import a cold start should avoid (top-level module names).
HEAVY: tuple[str, ...] = (
    "torch",
    "timm",
    "numpy",
    "scipy",
    "sklearn",
    "pandas",
    "onnxruntime",
    "faiss",
    "transformers",
    "gradio",
    "fastapi",
    "uvicorn",
    "ray",
    "PIL",
    "pydantic",
)


def _eagle(args: tuple[str, ...], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-m", "eagle", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def wall_times(args: tuple[str, ...], runs: int) -> list[float]:
    """Seconds each of ``runs`` fresh ``python -m eagle ARGS`` processes took, start to exit.

    Raises:
        RuntimeError: a run exited non-zero.
    """
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = _eagle(args)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"eagle {' '.join(args)} exited {done.returncode}: {done.stderr[-500:]}")
    return times


def imported_modules(args: tuple[str, ...]) -> list[str]:
    """The modules a fresh ``python -X importtime -m eagle ARGS`` imported, in import order."""
    done = _eagle(args, "-X", "importtime")
    names = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.append(name)
    return names


def measure(runs: int) -> list[dict]:
    """One row per command: wall-time statistics, module count and the heavy libraries imported."""
    rows = []
    for args in COMMANDS:
        times = wall_times(args, runs)
        modules = imported_modules(args)
        top_level = {name.split(".")[0] for name in modules}
        rows.append(
            {
                "command": "eagle " + " ".join(args),
                "runs": runs,
                "median_s": round(statistics.median(times), 3),
                "min_s": round(min(times), 3),
                "max_s": round(max(times), 3),
                "times_s": [round(t, 3) for t in times],
                "modules_imported": len(modules),
                "heavy_imported": [name for name in HEAVY if name in top_level],
            }
        )
    return rows


def print_table(label: str, rows: list[dict]) -> None:
    """The rows as a fixed-width table on stdout."""
    print(f"cold start ({label})")
    print(f"{'command':<22} {'median s':>9} {'min s':>7} {'max s':>7} {'modules':>8}  heavy imports")
    for row in rows:
        heavy = ", ".join(row["heavy_imported"]) or "-"
        print(
            f"{row['command']:<22} {row['median_s']:>9.3f} {row['min_s']:>7.3f} {row['max_s']:>7.3f} "
            f"{row['modules_imported']:>8}  {heavy}"
        )


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and merge the result into the JSON file; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="Fresh processes per command (default 7).")
    parser.add_argument("--label", default="after", help="Key of this measurement in the JSON file (default after).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT.name}).")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = measure(args.runs)
    print_table(args.label, rows)
    report = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {"benchmark": "cold-start"}
    report.setdefault("results", {})[args.label] = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": bench_machine.machine_info(["torch", "pydantic", "pydantic-settings"]),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
