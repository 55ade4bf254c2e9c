"""Benchmark: how much memory one LOADED bank costs a process (the service, the app, the watcher).

The service keeps at most ``EAGLE_MAX_LOADED_BANKS`` banks loaded (least recently used dropped); this script
measures what each of them costs, so the limit can be sized to the RAM given to the service.

How, for each reference count N (default 25 and 200, the default settings: 224 crop, 10 % coreset):

1. A child process builds one bank from N synthetic references (``tests/synthetic.py``, random-weight
   WideResNet-50-2: the same graph and array sizes as the real weights) through ``Pipeline.build_bank``, and
   copies that version under ``--copies`` more names (``BankStore.write_version``): identical banks, each loaded
   on its own, as different banks would be.
2. A FRESH child process creates the pipeline with ``max_loaded_banks`` = the number of banks and loads them one
   after the other through ``BankStore.load`` (the service's path: validation, an ONNX session of the bank's own
   graph, the faiss index, the test inspection); after each load (``gc.collect()``) it reads its RSS. The first
   load also pays one-time costs (onnxruntime and faiss initialisation); the cost per bank is the median RSS step
   of the following loads.
3. A third fresh child loads every bank with ``max_loaded_banks=2`` and reports the RSS at the end and how many
   banks stayed loaded: the bound at work.

Array bytes are counted from the loaded objects: the bank's tensors (memory bank [M, 1024] float32, training
scores, coreset image ids, retrieval descriptors, mask), the faiss ``IndexFlatL2`` copy of the memory bank
(M × 1024 × 4 bytes) and the ONNX graph file that each session loads.

Usage:
    .venv/bin/python bench/bench_bank_memory.py                   # N = 25 and 200: ~5 minutes on 2 cores
    .venv/bin/python bench/bench_bank_memory.py --refs 4 --copies 2 --quick   # a smoke run, under a minute

Results: ``bench/results/bank-memory-<date>.json`` (``-quick`` appended for ``--quick``) with the machine info.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))  # this checkout's packages, whatever the environment has installed
import machine as bench_machine  # noqa: E402

MB = 2**20


def _settings_env(data_dir: Path, crop: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAGLE_")}
    env.update(
        {
            "EAGLE_DATA_DIR": str(data_dir),
            "EAGLE_MLLM__ENABLED": "false",
            "EAGLE_EXPERT__WEIGHTS": "random",
            "EAGLE_EXPERT__MIN_REFERENCES": "2",
            "EAGLE_EXPERT__RECOMMENDED_REFERENCES": "2",
            "EAGLE_EXPERT__CROP": str(crop),
            "EAGLE_EXPERT__RESIZE": str(round(crop * 256 / 224)),
            "EAGLE_LOG_LEVEL": "WARNING",
            "OMP_NUM_THREADS": str(os.cpu_count() or 1),
        }
    )
    return env


def _bank_names(copies: int) -> list[str]:
    return [f"bench-{i}" for i in range(1, copies + 2)]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ children
def child_build(refs: int, copies: int, image_size: tuple[int, int]) -> dict:
    """Build ``bench-1`` from ``refs`` synthetic references and copy it to the other names."""
    from eagle.pipeline import Pipeline
    from eagle.settings import Settings
    from tests.synthetic import make_mvtec_like

    settings = Settings()
    root = make_mvtec_like(
        settings.data_dir / "synthetic", n_train=refs, n_test_good=0, n_test_bad_per_type=0, sizes=(image_size,)
    )
    pipeline = Pipeline(settings)
    started = time.perf_counter()
    names = _bank_names(copies)
    pipeline.build_bank(sorted((root / "widget" / "train" / "good").glob("*.png")), names[0])
    build_s = time.perf_counter() - started
    source = pipeline.banks.path(names[0]).resolve()
    for name in names[1:]:
        pipeline.banks.write_version(
            name, lambda d: shutil.copytree(source, d, dirs_exist_ok=True, symlinks=False), action="import"
        )
    return {"build_s": round(build_s, 1), "bank_dir_mb": round(_dir_bytes(source) / MB, 2)}


def _malloc_trim() -> bool:
    """Give the C heap's free memory back to the kernel (glibc ``malloc_trim``); False where there is none."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def child_load(copies: int, max_loaded: int | None, *, trim: bool, rounds: int) -> dict:
    """Load every bank (``rounds`` times, in order) in this fresh process; RSS after each load, array bytes.

    ``trim``: call ``malloc_trim`` after each load, so the RSS is what the loaded objects hold, without the freed
    heap that glibc keeps for reuse.
    """
    import gc
    import weakref

    import faiss  # noqa: F401 - imported before the baseline: only what a load itself allocates is counted
    import onnxruntime  # noqa: F401

    import expert.scorer  # noqa: F401
    from eagle.pipeline import Pipeline
    from eagle.settings import Settings
    from expert.bank_schema import ONNX_FILE

    names = _bank_names(copies)
    settings = Settings(max_loaded_banks=max_loaded or len(names))
    pipeline = Pipeline(settings)
    gc.collect()
    if trim:
        _malloc_trim()
    rss = [_rss_mb()]
    seconds = []
    arrays = {}
    loaded_objects = []
    for name in names * rounds:
        started = time.perf_counter()
        scorer = pipeline.banks.load(name)
        seconds.append(time.perf_counter() - started)
        loaded_objects.append(weakref.ref(scorer))
        if not arrays:
            tensors = scorer.bank.tensors()
            arrays = {
                "memory_bank_shape": list(scorer.bank.memory_bank.shape),
                "bank_tensors_mb": round(sum(a.nbytes for a in tensors.values()) / MB, 2),
                "tensors_mb": {k: round(a.nbytes / MB, 3) for k, a in tensors.items()},
                "faiss_index_mb": round(scorer.index.size * scorer.index.dim * 4 / MB, 2),
                "onnx_graph_file_mb": round((scorer.bank.directory / ONNX_FILE).stat().st_size / MB, 1),
                "references": len(scorer.bank.meta.references),
            }
        del scorer
        gc.collect()
        if trim:
            _malloc_trim()
        rss.append(_rss_mb())
    steps = [rss[i + 1] - rss[i] for i in range(len(rss) - 1)]
    first_round = steps[: len(names)]
    return {
        "max_loaded_banks": settings.max_loaded_banks,
        "malloc_trim_after_each_load": trim,
        "loads": len(steps),
        "banks_loaded_at_end": len(pipeline.banks.loaded()),
        "experts_alive_at_end": sum(ref() is not None for ref in loaded_objects),
        "rss_before_loading_mb": round(rss[0], 1),
        "rss_after_each_load_mb": [round(r, 1) for r in rss[1:]],
        "rss_step_per_load_mb": [round(s, 1) for s in steps],
        "first_load_mb": round(first_round[0], 1),
        "per_bank_mb": round(statistics.median(first_round[1:]), 1) if len(first_round) > 1 else None,
        "load_s": [round(s, 2) for s in seconds],
        **arrays,
    }


def _child(args: list[str], data_dir: Path, crop: int) -> dict:
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, cwd=REPO, env=_settings_env(data_dir, crop), capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()
        raise RuntimeError(f"child {args[:2]} failed (rc {done.returncode}): {tail[-1] if tail else ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(refs: int, copies: int, image_size: tuple[int, int], crop: int) -> dict:
    """Build, then measure in fresh processes, for one reference count."""
    with tempfile.TemporaryDirectory(prefix="eagle-bench-bankmem-") as scratch:
        data = Path(scratch) / "data"
        size = f"{image_size[0]}x{image_size[1]}"
        built = _child(
            ["--child", "build", "--refs", str(refs), "--copies", str(copies), "--image-size", size], data, crop
        )
        load = ["--child", "load", "--copies", str(copies)]
        loaded = _child(load, data, crop)
        held = _child([*load, "--trim"], data, crop)
        bounded = _child([*load, "--max-loaded", "2", "--rounds", "2"], data, crop)
    return {
        "references": refs,
        "crop": crop,
        "image_size_hw": list(image_size),
        **built,
        "all_loaded": loaded,
        "all_loaded_trimmed": held,
        "bounded_2": bounded,
    }


# ------------------------------------------------------------------------------------------------ main
def _size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def main() -> None:
    """Parse arguments; run as the parent (measure every N, save) or as one child."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", nargs="+", type=int, default=[25, 200], help="reference counts (one bank each)")
    parser.add_argument("--copies", type=int, default=3, help="extra copies of each bank loaded after the first")
    parser.add_argument("--crop", type=int, default=224, help="network input size (patches per image: (crop/8)²)")
    parser.add_argument("--image-size", type=_size, default=(256, 256), help="reference image size HxW")
    parser.add_argument("--quick", action="store_true", help="mark the result file as a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="result file (default bench/results/...)")
    parser.add_argument("--child", choices=("build", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--max-loaded", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        print(json.dumps(child_build(args.refs[0], args.copies, args.image_size)))
        return
    if args.child == "load":
        print(json.dumps(child_load(args.copies, args.max_loaded, trim=args.trim, rounds=args.rounds)))
        return

    load_before = os.getloadavg()
    runs = []
    for refs in args.refs:
        run = measure(refs, args.copies, args.image_size, args.crop)
        runs.append(run)
        print(json.dumps(run), flush=True)
    record = {
        "benchmark": "bank-memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/bench_bank_memory.py " + " ".join(sys.argv[1:]),
        "machine": bench_machine.machine_info(["numpy", "onnxruntime", "faiss-cpu", "torch", "safetensors"]),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "weights": "random (same graph and array sizes as the ImageNet weights)",
        "runs": runs,
        "summary": {
            str(r["references"]): {
                "per_bank_rss_mb": r["all_loaded"]["per_bank_mb"],
                "per_bank_held_mb": r["all_loaded_trimmed"]["per_bank_mb"],
                "first_bank_rss_mb": r["all_loaded"]["first_load_mb"],
                "rss_bounded_2_after_all_loads_mb": r["bounded_2"]["rss_after_each_load_mb"][-1],
                "rss_all_loaded_mb": r["all_loaded"]["rss_after_each_load_mb"][-1],
                "arrays_mb": round(r["all_loaded"]["bank_tensors_mb"] + r["all_loaded"]["faiss_index_mb"], 1),
                "bank_dir_on_disk_mb": r["bank_dir_mb"],
            }
            for r in runs
        },
    }
    suffix = "-quick" if args.quick else ""
    out = args.out or RESULTS / f"bank-memory-{dt.date.today().isoformat()}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"], indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
