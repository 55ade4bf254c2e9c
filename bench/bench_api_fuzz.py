"""A longer schema-driven fuzz of the service API than the test suite's (tests/test_api_schema_property.py).

Same app (fake pipeline, one bank, the token), same checks, more examples per operation and mode; prints each
distinct failure and writes a JSON summary. Exit status 1 when anything failed.

Example:
    .venv/bin/python bench/bench_api_fuzz.py --examples 500   # -> bench/results/api-fuzz-<date>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz; 0 when no operation disagreed with the schema."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=300, help="Hypothesis examples per operation and mode")
    parser.add_argument("--out", type=Path, default=None, help="JSON summary (default bench/results/api-fuzz-...)")
    args = parser.parse_args(argv)

    from schemathesis.python import asgi

    from deploy.api import create_app
    from tests.fake_pipeline import FakePipeline
    from tests.test_api_schema_property import fuzz
    from tests.test_service_api import make_settings

    with tempfile.TemporaryDirectory(prefix="eagle-api-fuzz-") as tmp:
        app = create_app(FakePipeline(banks=["widget"]), make_settings(Path(tmp)))
        start = time.perf_counter()
        try:
            failures = fuzz(app, args.examples)
        finally:
            asgi.shutdown_lifespans()
        elapsed = time.perf_counter() - start
    for failure in failures:
        print(failure, end="\n\n")
    summary = {"examples_per_operation_and_mode": args.examples, "seconds": round(elapsed, 1), "failures": failures}
    out = args.out or REPO / "bench" / "results" / f"api-fuzz-{date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"{len(failures)} distinct failure(s) in {elapsed:.0f} s; summary in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
