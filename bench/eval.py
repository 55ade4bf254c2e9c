"""Benchmark: images per second for the expert part of an evaluation, and the share of time per stage.

Runs ``eagle eval``'s loop (expert only: the MLLM disabled) on the synthetic MVTec-like set with a
random-weight backbone — the same network shape and cost as the real WideResNet-50-2 — after building the
bank once (the build is timed separately). Per-stage times come from the records the run writes: image
load, the expert's own stages (preprocess, embed, search, map, boxes, retrieval) and the pixel-metric map
saving; what is left of the wall time per image is reported as ``overhead``.

Usage:
    .venv/bin/python bench/eval.py [--n-test-good 10] [--n-bad-per-type 4] [--runtime onnx] [--threads 2]

Writes ``bench/results/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=8, help="reference images for the bank")
    parser.add_argument("--n-test-good", type=int, default=10)
    parser.add_argument("--n-bad-per-type", type=int, default=4, help="defective test images per defect type (3)")
    parser.add_argument("--runtime", choices=["onnx", "torch"], default="onnx")
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime intra-op threads")
    parser.add_argument("--pixel-size", type=int, default=256, help="0 = mask resolution")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from eagle.evaluation.aggregate import build_report
    from eagle.evaluation.bankcache import BankCache
    from eagle.evaluation.records import RECORDS_FILE, read_records
    from eagle.evaluation.runner import EvalConfig, EvalRunner, bank_root
    from eagle.pipeline import Pipeline
    from eagle.settings import Settings
    from tests.synthetic import make_mvtec_like

    work = Path(tempfile.mkdtemp(prefix="eagle-bench-eval-"))
    data = make_mvtec_like(
        work / "data", n_train=args.n_train, n_test_good=args.n_test_good, n_test_bad_per_type=args.n_bad_per_type
    )
    config = EvalConfig(
        dataset="mvtec", root=data, out=work / "out", progress=False, plots=False, pixel_size=args.pixel_size or None
    )
    settings = Settings(
        data_dir=bank_root(config),
        expert={
            "weights": "random",
            "runtime": args.runtime,
            "min_references": 2,
            "recommended_references": 2,
        },
        mllm={"enabled": False},
    )
    pipeline = Pipeline(settings)
    runner = EvalRunner(pipeline, settings, config)

    t0 = time.perf_counter()
    BankCache(pipeline, settings.expert, progress=False).get(
        "widget", runner.dataset.train["widget"], root=runner.dataset.root
    )
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    pipeline.banks.load(next(iter(s.name for s in pipeline.banks.list())))  # load the expert outside the loop
    load_expert_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    runner.run(report=False)
    eval_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    build_report([config.out])
    report_s = time.perf_counter() - t0

    experts = [r for r in read_records(config.out / RECORDS_FILE) if r.kind == "expert"]
    n = len(experts)
    stage_ms: dict[str, float] = defaultdict(float)
    for record in experts:
        for key, value in record.timings_ms.items():
            if key != "expert":  # the expert's wall time is the sum of its expert_* stages (+ a little)
                stage_ms[key] += value
    per_image_ms = 1000 * eval_s / n
    measured = sum(stage_ms.values()) / n
    stages = {k: v / n for k, v in sorted(stage_ms.items())}
    stages["overhead"] = max(0.0, per_image_ms - measured)
    result = {
        "benchmark": "eval-expert",
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "setup": {
            "backbone": settings.expert.backbone,
            "weights": "random (same shape and cost as the real weights)",
            "runtime": args.runtime,
            "n_train": args.n_train,
            "n_test": n,
            "pixel_size": args.pixel_size or "mask resolution",
            "image_sizes": "224x224, 240x320, 300x200 (synthetic)",
        },
        "bank_build_s": round(build_s, 2),
        "expert_load_s": round(load_expert_s, 2),
        "eval_s": round(eval_s, 2),
        "report_s": round(report_s, 3),
        "images_per_second": round(n / eval_s, 3),
        "ms_per_image": round(per_image_ms, 1),
        "stage_ms_per_image": {k: round(v, 2) for k, v in stages.items()},
        "stage_share": {k: round(v / per_image_ms, 4) for k, v in stages.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
