"""Benchmark the expert: bank build time and per-image inference, against anomalib's PatchCore.

Not a test. For each reference count N (``--sizes``, default 50 and 200) on the synthetic MVTec-like set
(tests/synthetic.py) at the 224 input, with the same seeded random-weight WideResNet-50-2 on both sides:

* ours: build split into embedding (onnxruntime, with the ONNX graph from a cache that a separate ``warm``
  run filled first, as ``eagle warm-cache`` does; ``--cold-export`` exports inside each run instead), coreset,
  DBT and save (atomic write); per-image inference: torch vs ONNX embedding (batch 1), faiss search, and the
  whole ``ExpertScorer.score``;
* anomalib ``PatchcoreModel`` (its torch model, no Lightning trainer): fit = feature extraction + its
  k-center-greedy coreset (10 %); per-image ``forward`` (features + k-NN + anomaly map);
* image AUROC of both on the synthetic test set, and each run's peak RSS.

Each (implementation, N) runs in its own subprocess so peak RSS is per run; a run whose RSS passes
``--max-rss-gb`` (12) is killed and reported as such (the machine is shared).

Memory note: anomalib's ``KCenterGreedy`` allocates an [N·784, d] temporary per greedy step, interleaved with
small long-lived tensors; under glibc's default *dynamic* mmap threshold the freed blocks end up on the
heap, fragmented, and the RSS grows by that temporary at every step (measured: 18.8 GB at N = 20; N = 200
would need terabytes). The runs therefore get ``MALLOC_MMAP_THRESHOLD_=1048576`` (large blocks always
mmap'ed and returned on free), both implementations alike; ``--glibc-default-malloc`` turns it off.

Results are printed as a table and saved with machine info (CPU, cores, RAM, library versions, load
average before and after) to ``bench/results/expert-<date>.json``. Timings on a shared machine are noisy:
the load average is recorded.

anomalib is NOT a dependency of EAGLE. Install it for the benchmark only, into ``.bench-deps`` (never
another torch: ``--no-deps`` and the list below; the bench appends ``.bench-deps`` to ``sys.path`` AFTER
the virtualenv, so the venv's torch, timm, numpy win)::

    .venv/bin/pip install --no-deps --target .bench-deps anomalib==2.7.0 lightning==2.6.6 \
        pytorch-lightning==2.6.6 lightning-utilities==0.15.3 torchmetrics==1.9.0 kornia==0.9.0 kornia-rs==0.2.0 \
        freia==0.2 einops==0.8.2 "jsonargparse[signatures]==4.46.0" typeshed-client docstring-parser==0.18.0 \
        omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 rich-argparse==1.8.0 platformdirs scikit-image==0.26.0 \
        tifffile imagecodecs lazy-loader==0.6 imageio

Usage::

    .venv/bin/python bench/bench_expert.py                 # sizes 50,200; ~15-25 min on 2 idle cores
    .venv/bin/python bench/bench_expert.py --quick         # N=20, few images: a 3-minute smoke run
    .venv/bin/python bench/bench_expert.py --sizes 50 --no-anomalib
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DEPS = REPO / ".bench-deps"
RESULTS_DIR = REPO / "bench" / "results"
SEED = 0
MMAP_THRESHOLD = 1 << 20

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import machine as bench_machine  # noqa: E402


# ----------------------------------------------------------------------------------------------- data
def make_data(root: Path, n_train: int, n_test_good: int, n_bad_per_type: int) -> Path:
    from tests.synthetic import make_mvtec_like

    return (
        make_mvtec_like(root, n_train=n_train, n_test_good=n_test_good, n_test_bad_per_type=n_bad_per_type, seed=SEED)
        / "widget"
    )


def read_split(category: Path, n_refs: int):
    from eagle.images import list_images, load_image

    train = list_images(category / "train" / "good")[:n_refs]
    test = list_images(category / "test")
    refs = [load_image(p, max_pixels=10**8) for p in train]
    queries = [load_image(p, max_pixels=10**8) for p in test]
    labels = [p.parent.name != "good" for p in test]
    return refs, [p.name for p in train], queries, labels


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values), "mean_ms": statistics.fmean(values), "n": len(values)}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


# ----------------------------------------------------------------------------------------------- ours
def worker_warm(cache_dir: Path) -> dict:
    """Export the graph into ``cache_dir`` (what ``eagle warm-cache`` does), in a process of its own."""
    from eagle.settings import ExpertSettings
    from expert.onnx_cache import ExportKey, OnnxCache
    from expert.weights import load_backbone

    settings = ExpertSettings(weights="random", seed=SEED)
    t0 = time.perf_counter()
    backbone, info = load_backbone(settings)
    OnnxCache(cache_dir).get(ExportKey.create(settings.backbone, info.checksum, crop=settings.crop), backbone)
    return {"impl": "warm-cache", "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def worker_ours(category: Path, n_refs: int, repeats: int, onnx_cache: Path | None = None) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from eagle.settings import ExpertSettings
    from expert.backbone import build_patch_embedder
    from expert.build import build_bank
    from expert.embedder import OnnxEmbedder, TorchEmbedder
    from expert.preprocess import preprocess
    from expert.scorer import load_expert
    from expert.weights import load_backbone

    refs, names, queries, labels = read_split(category, n_refs)
    settings = ExpertSettings(weights="random", seed=SEED)
    backbone, info = load_backbone(settings)
    if onnx_cache is not None:
        # As the pipeline does: the graph comes from the (warm) cache, the weights were needed only for their
        # checksum and are not held during the build; the loader runs only if the graph must be exported.
        del backbone
        backbone = lambda: load_backbone(settings)[0]  # noqa: E731
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def progress(stage: str, fraction: float) -> None:
        started.setdefault(stage, time.perf_counter())
        if fraction >= 1.0:
            seconds[stage] = time.perf_counter() - started[stage]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bank = build_bank(
            refs,
            names,
            settings=settings,
            backbone=backbone,
            weights_info=info,
            out_dir=Path(tmp) / "b",
            name="bench",
            progress=progress,
            onnx_cache=onnx_cache,
        )
        seconds["total_with_save"] = time.perf_counter() - t0
        seconds["build"] = seconds["embed"] + seconds["coreset"] + seconds["dbt"]
        rss_build = peak_rss_mb()
        if not isinstance(backbone, torch.nn.Module):
            backbone = backbone()  # for the torch-vs-ONNX embedding comparison below (after the build's RSS)
        scorer = load_expert(bank.directory, settings)  # ONNX runtime
        scores, per_stage = [], {}
        full = []
        for image in queries:
            t1 = time.perf_counter()
            result = scorer.score(image)
            full.append((time.perf_counter() - t1) * 1000.0)
            scores.append(result.score)
            for stage, ms in result.timings_ms.items():
                per_stage.setdefault(stage, []).append(ms)
        tensor = preprocess(queries[0])[0][None]
        onnx = scorer.embedder if isinstance(scorer.embedder, OnnxEmbedder) else OnnxEmbedder(bank.onnx_path)
        torch_embedder = TorchEmbedder(build_patch_embedder(backbone))
        features = onnx(tensor)[0]
        inference = {
            "score_onnx": summary(full),
            "embed_torch": summary(timed(lambda: torch_embedder(tensor), repeats)),
            "embed_onnx": summary(timed(lambda: onnx(tensor), repeats)),
            "faiss_search": summary(timed(lambda: scorer.index.search(features), repeats)),
            "score_stages_median_ms": {k: statistics.median(v) for k, v in per_stage.items()},
        }
    return {
        "impl": "eagle",
        "n_refs": n_refs,
        "n_test": len(queries),
        "memory_bank": list(bank.memory_bank.shape),
        # what a faster build must leave unchanged (compare two runs' values): the coreset and the threshold
        "memory_bank_sha256": hashlib.sha256(np.ascontiguousarray(bank.memory_bank).tobytes()).hexdigest(),
        "tau": bank.meta.threshold.tau,
        "s_max": bank.meta.threshold.s_max,
        "build_s": seconds,
        "inference": inference,
        "auroc": float(roc_auc_score(labels, np.asarray(scores))),
        "peak_rss_mb": {"after_build": rss_build, "end": peak_rss_mb()},
    }


# ----------------------------------------------------------------------------------------------- anomalib
def import_anomalib():
    if not BENCH_DEPS.is_dir():
        raise SystemExit(f"anomalib not installed: {BENCH_DEPS} missing (see this file's docstring)")
    sys.path.append(str(BENCH_DEPS))  # after the venv: the venv's torch/timm/numpy take precedence
    import torch
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    if str(BENCH_DEPS) in torch.__file__:
        raise SystemExit("a torch inside .bench-deps shadows the venv's: remove it (install anomalib with --no-deps)")
    return PatchcoreModel, metadata.version("anomalib")


def worker_anomalib(category: Path, n_refs: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from eagle.settings import ExpertSettings
    from expert.preprocess import preprocess
    from expert.weights import load_backbone

    patchcore_model, version = import_anomalib()
    refs, _, queries, labels = read_split(category, n_refs)
    ours, _ = load_backbone(ExpertSettings(weights="random", seed=SEED))
    torch.manual_seed(SEED)
    model = patchcore_model(layers=["layer2", "layer3"], backbone="wide_resnet50_2", pre_trained=False)
    # The same random weights as ours (same timm architecture and state-dict keys).
    model.feature_extractor.feature_extractor.load_state_dict(ours.state_dict())
    batch = 8
    seconds = {}
    t0 = time.perf_counter()
    inputs = [torch.from_numpy(preprocess(image)[0]) for image in refs]
    model.train()
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            model(torch.stack(inputs[start : start + batch]))
    seconds["embed"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.subsample_embedding(0.1)
    seconds["coreset"] = time.perf_counter() - t1
    seconds["build"] = seconds["embed"] + seconds["coreset"]
    rss_build = peak_rss_mb()
    model.eval()
    scores, full = [], []
    with torch.no_grad():
        for image in queries:
            t2 = time.perf_counter()
            x = torch.from_numpy(preprocess(image)[0])[None]
            out = model(x)
            full.append((time.perf_counter() - t2) * 1000.0)
            scores.append(float(out.pred_score.reshape(-1)[0]))
        x = torch.from_numpy(preprocess(queries[0])[0])[None]
        embed = timed(lambda: model.feature_extractor(x), repeats)
    return {
        "impl": "anomalib",
        "version": version,
        "n_refs": n_refs,
        "n_test": len(queries),
        "memory_bank": list(model.memory_bank.shape),
        "build_s": seconds,
        "inference": {"score": summary(full), "backbone_only": summary(embed)},
        "auroc": float(roc_auc_score(labels, np.asarray(scores))),
        "peak_rss_mb": {"after_build": rss_build, "end": peak_rss_mb()},
    }


# ----------------------------------------------------------------------------------------------- driver
def _bench_deps_version(name: str) -> str:
    found = list(BENCH_DEPS.glob(f"{name.replace('-', '_')}-*.dist-info")) if BENCH_DEPS.is_dir() else []
    return found[0].name.removesuffix(".dist-info").split("-")[1] if found else "not installed"


def machine_info() -> dict:
    return bench_machine.machine_info(
        ("torch", "timm", "onnxruntime", "faiss-cpu", "numpy", "scikit-learn", "anomalib"), fallback=_bench_deps_version
    )


def run_worker(
    kind: str,
    category: Path,
    n_refs: int,
    repeats: int,
    *,
    max_rss_gb: float,
    env: dict,
    onnx_cache: Path | None = None,
) -> dict:
    """Run one (implementation, N) in its own process; kill it if its RSS passes ``max_rss_gb``."""
    import psutil

    command = [sys.executable, __file__, "--worker", kind, "--data", str(category), "--n", str(n_refs)]
    command += ["--repeats", str(repeats)] + (["--onnx-cache", str(onnx_cache)] if onnx_cache else [])
    print(f"--- {kind}, N={n_refs} ...", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, env={**os.environ, **env}, text=True)
        watched, peak_seen, killed = psutil.Process(proc.pid), 0, False
        while proc.poll() is None:
            try:
                peak_seen = max(peak_seen, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            if peak_seen > max_rss_gb * 2**30:
                proc.kill()
                killed = True
            time.sleep(0.2)
        proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed:
        message = f"killed: RSS passed --max-rss-gb {max_rss_gb:g} GB after {time.perf_counter() - t0:.0f} s"
        print(f"    {message}", flush=True)
        return {"impl": kind, "n_refs": n_refs, "error": message}
    if proc.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        print(f"    failed ({proc.returncode}): {tail}", flush=True)
        return {"impl": kind, "n_refs": n_refs, "error": tail}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    print(f"    done in {result['wall_s']:.0f} s", flush=True)
    return result


def ratios(ours: dict, theirs: dict) -> dict:
    if "error" in ours or "error" in theirs:
        return {}
    return {
        "build_speedup": theirs["build_s"]["build"] / ours["build_s"]["build"],
        "inference_speedup": theirs["inference"]["score"]["median_ms"] / ours["inference"]["score_onnx"]["median_ms"],
        "auroc_diff": ours["auroc"] - theirs["auroc"],
        "peak_rss_ratio": ours["peak_rss_mb"]["after_build"] / theirs["peak_rss_mb"]["after_build"],
    }


def print_table(report: dict) -> None:
    print()
    header = f"{'impl':<9}{'N':>5}{'embed s':>9}{'coreset s':>10}{'dbt s':>7}{'build s':>9}{'save s':>8}"
    header += f"{'score ms':>10}{'emb torch':>10}{'emb onnx':>10}{'search':>8}{'AUROC':>7}{'RSS MB':>8}"
    print(header)
    for row in report["runs"]:
        if row.get("impl") == "warm-cache" and "error" not in row:
            print(f"{'(warm-cache: ONNX export ' + format(row['seconds'], '.1f') + ' s, once, own process)':<40}")
            continue
        if "error" in row:
            print(f"{row['impl']:<9}{row['n_refs']:>5}  failed: {row['error']}")
            continue
        b, inf = row["build_s"], row["inference"]
        score = inf.get("score_onnx", inf.get("score"))["median_ms"]
        emb_t = inf.get("embed_torch", inf.get("backbone_only", {})).get("median_ms", float("nan"))
        emb_o = inf.get("embed_onnx", {}).get("median_ms", float("nan"))
        search = inf.get("faiss_search", {}).get("median_ms", float("nan"))
        print(
            f"{row['impl']:<9}{row['n_refs']:>5}{b['embed']:>9.1f}{b['coreset']:>10.1f}{b.get('dbt', 0):>7.1f}"
            f"{b['build']:>9.1f}{b.get('save', 0):>8.1f}{score:>10.0f}{emb_t:>10.0f}{emb_o:>10.0f}{search:>8.1f}"
            f"{row['auroc']:>7.3f}{row['peak_rss_mb']['end']:>8.0f}"
        )
    for n, r in report["ratios"].items():
        if r:
            print(
                f"N={n}: build {r['build_speedup']:.2f}x faster (goal >= 2), inference {r['inference_speedup']:.2f}x "
                f"(goal >= 1.5), AUROC diff {r['auroc_diff']:+.3f} (goal >= 0), RSS ratio {r['peak_rss_ratio']:.2f}"
            )
    print("(anomalib 'emb torch' column: its backbone forward only; 'build' = embed + coreset [+ dbt for EAGLE])")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="Comma-separated reference counts (default 50,200).")
    parser.add_argument("--quick", action="store_true", help="N=20 and a small test set: a smoke run.")
    parser.add_argument("--no-anomalib", action="store_true", help="Benchmark EAGLE only.")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="Directory for the JSON results.")
    parser.add_argument(
        "--max-rss-gb", type=float, default=12.0, help="Kill a run whose resident memory passes this (default 12)."
    )
    parser.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help=f"Do not set MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} for the runs (see the module docstring).",
    )
    parser.add_argument(
        "--cold-export",
        action="store_true",
        help="Export the ONNX graph inside each EAGLE run (no cache) instead of taking it from a cache warmed first.",
    )
    parser.add_argument("--worker", choices=["eagle", "anomalib", "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--onnx-cache", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        import torch

        torch.manual_seed(SEED)
        if args.worker == "warm":
            print(json.dumps(worker_warm(args.onnx_cache)))
        elif args.worker == "eagle":
            print(json.dumps(worker_ours(args.data, args.n, args.repeats, args.onnx_cache)))
        else:
            print(json.dumps(worker_anomalib(args.data, args.n, args.repeats)))
        return 0

    sizes = [int(s) for s in (args.sizes or ("20" if args.quick else "50,200")).split(",")]
    n_good, n_bad, repeats = (4, 2, 3) if args.quick else (10, 5, 10)
    env = {} if args.glibc_default_malloc else {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    load_before = os.getloadavg()
    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        category = make_data(Path(tmp), max(sizes), n_good, n_bad)
        runs, pairs = [], {}
        cache = None if args.cold_export else Path(tmp) / "onnx-cache"
        if cache is not None:  # as `eagle warm-cache` / the app's start-up do: the graph is exported once
            runs.append(run_worker("warm", category, 0, 0, max_rss_gb=args.max_rss_gb, env=env, onnx_cache=cache))
        for n in sizes:
            ours = run_worker("eagle", category, n, repeats, max_rss_gb=args.max_rss_gb, env=env, onnx_cache=cache)
            runs.append(ours)
            if not args.no_anomalib:
                theirs = run_worker("anomalib", category, n, repeats, max_rss_gb=args.max_rss_gb, env=env)
                runs.append(theirs)
                pairs[str(n)] = ratios(ours, theirs)
    report = {
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "2-core machine shared with other jobs: timings are noisy (see load averages)",
        "worker_env": env,
        "settings": {
            "input": 224,
            "coreset_ratio": 0.1,
            "weights": "random (seed 0), same on both sides",
            "test_images": {"good": n_good, "defective": 3 * n_bad},
            "quick": args.quick,
            "onnx_graph": "exported in each EAGLE run" if args.cold_export else "from a cache warmed once beforehand",
        },
        "runs": runs,
        "ratios": pairs,
    }
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"expert-{started.date().isoformat()}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
