"""Benchmark bank builds: first vs second build (ONNX export cache), and the peak memory of a build.

Not a test. The goal: "a bank is ready in seconds". Every measurement runs the product's path,
``Pipeline.build_bank`` (random-weight WideResNet-50-2, the same compute as real weights), on the synthetic
MVTec-like set (tests/synthetic.py), each scenario in its own process so its peak RSS is its own:

* ``repeat``: a fresh data dir (empty ONNX cache), one pipeline building the same ``--refs`` (12) references
  twice. The first build loads the weights and exports the graph; the second takes the graph from the cache.
  Goal: second ≤ 0.3 × first.
* ``rss-warm`` / ``rss-cold``: a fresh process building ``--rss-refs`` (50) references with the graph already
  cached (as after ``eagle warm-cache`` or the app's start-up warm-up) / with an empty cache (export in the
  same process). Peak RSS (``ru_maxrss``) of the whole process, imports included.
* ``first-verdict``: what a person does in the app, through the pipeline the app calls (no browser: see
  ``bench/bench_app.py`` for the page's own overhead, ~0.5 s): a fresh data dir, the start-up warm-up
  (``Pipeline.warm_onnx_cache``, timed apart: it runs in the background at app start-up), then build a bank
  from ``--refs`` (12) reference files and inspect one query file → its verdict. Goal: ≤ 10 s on 2 cores.
* ``--anomalib``: anomalib's PatchCore fit on the same ``--rss-refs`` references, through
  ``bench/bench_expert.py``'s worker (needs ``.bench-deps``, see bench/README.md). Goal: our peak RSS ≤ theirs.

Runs get ``MALLOC_MMAP_THRESHOLD_=1048576`` like bench_expert.py (both sides alike). Results with machine info and
load averages go to ``bench/results/build-<date>.json``.

Usage::

    .venv/bin/python bench/bench_build.py                  # repeat (12 refs) + rss-warm/rss-cold (50 refs)
    .venv/bin/python bench/bench_build.py --anomalib       # ... and anomalib's fit on the same 50 references
    .venv/bin/python bench/bench_build.py --quick          # 4 and 8 references: a smoke run (~1-2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
MMAP_THRESHOLD = 1 << 20

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import bench_expert  # noqa: E402
import machine as bench_machine  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _settings(data_dir: Path):
    from eagle.settings import Settings

    return Settings(
        data_dir=data_dir,
        onnx_cache_dir=None,  # the cache under the fresh data dir, whatever EAGLE_ONNX_CACHE_DIR says: cold first
        mllm={"enabled": False},
        expert={"weights": "random", "seed": 0, "min_references": 2, "recommended_references": 2},
    )


def _references(category: Path, n: int) -> list[Path]:
    return sorted((category / "train" / "good").glob("*.png"))[:n]


def _timed_build(pipeline, references: list[Path], name: str) -> dict:
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def progress(stage: str, fraction: float) -> None:
        started.setdefault(stage, time.perf_counter())
        if fraction >= 1.0:
            seconds[stage] = round(time.perf_counter() - started[stage], 2)

    t0 = time.perf_counter()
    pipeline.build_bank(references, name, progress=progress)
    return {"total_s": round(time.perf_counter() - t0, 2), "stages_s": seconds}


def worker(kind: str, category: Path, data_dir: Path, n: int) -> dict:
    from eagle.pipeline import Pipeline

    pipeline = Pipeline(_settings(data_dir))
    references = _references(category, n)
    if kind == "repeat":
        first = _timed_build(pipeline, references, "first")
        second = _timed_build(pipeline, references, "second")
        return {
            "kind": kind,
            "refs": len(references),
            "first": first,
            "second": second,
            "second_over_first": round(second["total_s"] / first["total_s"], 3),
            "peak_rss_mb": peak_rss_mb(),
        }
    if kind == "first-verdict":
        t0 = time.perf_counter()
        pipeline.warm_onnx_cache()
        warm_up_s = time.perf_counter() - t0
        query = sorted(p for p in (category / "test").rglob("*.png") if p.parent.name != "good")[0]
        t1 = time.perf_counter()
        build = _timed_build(pipeline, references, "bank")
        t2 = time.perf_counter()
        result = pipeline.inspect(query, "bank")
        t3 = time.perf_counter()
        return {
            "kind": kind,
            "refs": len(references),
            "start_up_warm_up_s": round(warm_up_s, 2),
            "build": build,
            "first_inspection_s": round(t3 - t2, 2),
            "first_inspection_stages_ms": {k: round(v, 1) for k, v in result.timings_ms.items()},
            "references_to_first_verdict_s": round(t3 - t1, 2),
            "verdict": result.verdict,
            "peak_rss_mb": peak_rss_mb(),
        }
    build = _timed_build(pipeline, references, "bank")
    return {"kind": kind, "refs": len(references), "build": build, "peak_rss_mb": peak_rss_mb()}


def run(command: list[str], env: dict) -> dict:
    done = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", type=int, default=None, help="References of the repeat scenario (default 12).")
    parser.add_argument("--rss-refs", type=int, default=None, help="References of the RSS scenarios (default 50).")
    parser.add_argument("--quick", action="store_true", help="4 and 8 references: a smoke run.")
    parser.add_argument("--anomalib", action="store_true", help="Also run anomalib's fit (bench_expert.py worker).")
    parser.add_argument("--out", type=Path, default=None, help="Result file (default bench/results/build-<date>.json).")
    parser.add_argument("--worker", choices=["repeat", "rss-warm", "rss-cold", "first-verdict"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--only",
        default=None,
        help="Comma-separated scenarios to run (repeat, rss-warm, rss-cold, first-verdict); rss-warm uses the "
        "cache that repeat filled (alone it exports first).",
    )
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.data_dir, args.n)))
        return 0

    refs = args.refs or (4 if args.quick else 12)
    rss_refs = args.rss_refs or (8 if args.quick else 50)
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "EAGLE_LOG_LEVEL": "WARNING"}
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    report: dict = {
        "benchmark": "bank builds: first vs second (ONNX export cache) and peak RSS",
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": bench_machine.machine_info(
            ("torch", "onnxruntime", "onnxscript", "faiss-cpu", "numpy", "anomalib"),
            fallback=bench_expert._bench_deps_version,  # anomalib lives in .bench-deps, outside the venv
        ),
        "note": "shared 2-core machine: timings are noisy, compare ratios measured in the same run",
        "worker_env": env,
        "settings": {"refs": refs, "rss_refs": rss_refs, "weights": "random (seed 0)", "crop": 224},
        "load_average_before": load_before,
    }
    from tests.synthetic import make_mvtec_like

    with tempfile.TemporaryDirectory(prefix="eagle-bench-build-") as tmp:
        root = Path(tmp)
        category = make_mvtec_like(root / "mvtec", n_train=max(refs, rss_refs), n_test_good=1, n_test_bad_per_type=1)
        category = category / "widget"
        base = [sys.executable, __file__, "--data", str(category)]
        scenarios = [("repeat", root / "d-repeat", refs), ("rss-warm", root / "d-repeat", rss_refs)]
        scenarios += [("rss-cold", root / "d-cold", rss_refs), ("first-verdict", root / "d-first", refs)]
        only = set(args.only.split(",")) if args.only else None
        for kind, data_dir, n in scenarios:  # rss-warm reuses the repeat run's data dir: its cache is warm
            if only is not None and kind not in only:
                continue
            print(f"--- {kind}, {n} references ...", flush=True)
            result = run([*base, "--worker", kind, "--data-dir", str(data_dir), "--n", str(n)], env)
            report[kind] = result
            print(f"    {json.dumps(result)}", flush=True)
        if args.anomalib:
            print(f"--- anomalib, {rss_refs} references ...", flush=True)
            theirs = bench_expert.run_worker("anomalib", category, rss_refs, 3, max_rss_gb=12.0, env=env)
            report["anomalib"] = {k: theirs.get(k) for k in ("version", "n_refs", "build_s", "peak_rss_mb", "error")}
    report["load_average_after"] = os.getloadavg()
    goals = {}
    if "second_over_first" in report.get("repeat", {}):
        goals["second_build_ratio"] = {"value": report["repeat"]["second_over_first"], "goal": "<= 0.3"}
    anomalib_rss = ((report.get("anomalib") or {}).get("peak_rss_mb") or {}).get("after_build")
    for kind in ("rss-warm", "rss-cold"):
        if anomalib_rss and "peak_rss_mb" in report.get(kind, {}):
            goals[f"{kind}_over_anomalib"] = {
                "value": round(report[kind]["peak_rss_mb"] / anomalib_rss, 3),
                "goal": "<= 1.0",
            }
    first = report.get("first-verdict", {})
    if "references_to_first_verdict_s" in first:
        goals["references_to_first_verdict_s"] = {
            "value": first["references_to_first_verdict_s"],
            "goal": "<= 10 (pipeline only; the app page adds ~0.5 s)",
        }
    report["goals"] = goals
    out = args.out or RESULTS_DIR / f"build-{started.date().isoformat()}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(goals, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
