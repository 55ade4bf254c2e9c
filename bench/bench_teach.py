"""Benchmark "teach the bank": the rebuild of a 50-reference bank with the cached ONNX backbone.

Not a test. The product's path, ``Pipeline.add_references`` (random-weight WideResNet-50-2: the same compute as real
weights), on the synthetic MVTec-like set (tests/synthetic.py): a fresh data dir, a bank built from ``--refs - 1``
(49) references (this first build loads the weights and exports the graph into the ONNX cache), then one image is
taught: the bank is rebuilt from its 49 stored references plus the new one (50) as version 2. The teach is timed
end to end (read the stored references, embed, coreset, DBT, save, swap, score the taught image before and after).
Goal: seconds on a GPU, well under a minute on 2 cores.

Results with machine info go to ``bench/results/teach-<date>.json``.

Usage::

    .venv/bin/python bench/bench_teach.py              # 49 + 1 references
    .venv/bin/python bench/bench_teach.py --refs 10    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import machine as bench_machine  # noqa: E402


def run(refs: int, out: Path | None) -> dict:
    """Build a bank of ``refs - 1`` references, teach one more, and return the timings."""
    from eagle.pipeline import Pipeline
    from eagle.settings import Settings
    from tests.synthetic import make_mvtec_like

    with tempfile.TemporaryDirectory(prefix="eagle-bench-teach-") as tmp:
        root = Path(tmp)
        category = make_mvtec_like(root / "mvtec", n_train=refs, n_test_good=1, n_test_bad_per_type=1) / "widget"
        train = sorted((category / "train" / "good").glob("*.png"))
        pipeline = Pipeline(Settings(data_dir=root / "data", expert={"weights": "random"}, mllm={"enabled": False}))
        t0 = time.perf_counter()
        built = pipeline.build_bank(train[:-1], "bench")
        build_s = time.perf_counter() - t0
        stages: dict[str, float] = {}
        last = {"stage": None, "t": time.perf_counter()}

        def progress(stage: str, fraction: float) -> None:
            now = time.perf_counter()
            if last["stage"] is not None:
                stages[last["stage"]] = stages.get(last["stage"], 0.0) + now - last["t"]
            last.update(stage=stage, t=now)

        t0 = time.perf_counter()
        result = pipeline.add_references([train[-1]], "bench", progress=progress)
        teach_s = time.perf_counter() - t0
        progress("end", 1.0)
    report = {
        "benchmark": "teach",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": bench_machine.machine_info(["torch", "onnxruntime", "faiss-cpu", "numpy"]),
        "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count()},
        "load_average": os.getloadavg(),
        "backbone": "wide_resnet50_2 (random weights), crop 224",
        "references_before": result.references_before,
        "references_after": result.references_after,
        "first_build_s": round(build_s, 2),
        "first_build_note": f"{built.n_references} references, includes the weights load and the ONNX export",
        "teach_s": round(teach_s, 2),
        "teach_stages_s": {k: round(v, 2) for k, v in stages.items()},
        "tau": [result.tau_before, result.tau_after],
        "taught_passes_now": [t.passes_now for t in result.taught],
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main() -> int:
    """Command line: ``--refs`` (50), ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=int, default=50, help="References after the teach (default 50).")
    parser.add_argument("--out", type=Path, default=None, help="Result JSON (default bench/results/teach-<date>.json).")
    args = parser.parse_args()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = args.out or RESULTS_DIR / f"teach-{date}.json"
    report = run(args.refs, out)
    print(json.dumps(report, indent=2))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
