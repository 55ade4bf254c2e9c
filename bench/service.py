"""Benchmark of the edge service in expert-only mode: sustained throughput, latency, and overload behaviour.

It runs the product as deployed: ``eagle serve`` in a subprocess (uvicorn, the real pipeline, expert-only,
random backbone weights — the speed is the same as with real ones) and a bank built from a synthetic
MVTec-like set at the configured input size (default: the paper's 224). The load generator is this process.

Phases:
1. ``sustained``: a closed loop of ``--clients`` clients (each sends its next request when the previous one
   answered) for ``--seconds`` seconds → requests/s, latency p50/p95/p99, errors.
2. ``overload``: ``--overload-clients`` clients that do NOT back off, for ``--overload-seconds`` → how many
   got 200 vs 429, the ``Retry-After`` values, the accepted requests' latency, and that no request failed
   otherwise (no 5xx, no connection errors).

Usage:
    .venv/bin/python bench/service.py                      # ~4 minutes on 2 cores, writes bench/results/
    .venv/bin/python bench/service.py --crop 64 --seconds 20 --overload-seconds 10   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `tests.synthetic`, and this checkout's packages
TOKEN = "bench-token-0123456789abcdef"


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(data_dir: Path, crop: int, queue_size: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAGLE_")}
    env.update(
        {
            "EAGLE_DATA_DIR": str(data_dir),
            "EAGLE_MLLM__ENABLED": "false",
            "EAGLE_EXPERT__WEIGHTS": "random",
            "EAGLE_EXPERT__RESIZE": str(max(crop, round(crop * 256 / 224))),
            "EAGLE_EXPERT__CROP": str(crop),
            "EAGLE_EXPERT__MIN_REFERENCES": "2",
            "EAGLE_EXPERT__RECOMMENDED_REFERENCES": "2",
            "EAGLE_SERVICE__HOST": "127.0.0.1",
            "EAGLE_SERVICE__PORT": str(port),
            "EAGLE_SERVICE__TOKEN": TOKEN,
            "EAGLE_SERVICE__QUEUE_SIZE": str(queue_size),
            "EAGLE_LOG_LEVEL": "WARNING",
        }
    )
    return env


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"eagle serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the service did not become ready")


def build_bank(client: httpx.Client, train: list[Path]) -> dict:
    buffer = Path(tempfile.mkdtemp()) / "good.zip"
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in train:
            archive.write(path, f"good/{path.name}")
    with open(buffer, "rb") as handle:
        response = client.post("/v1/banks", data={"name": "bench", "overwrite": "true"}, files={"archive": handle})
    response.raise_for_status()
    job_id = response.json()["id"]
    started = time.perf_counter()
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            break
        time.sleep(1.0)
    if job["state"] != "succeeded":
        raise RuntimeError(f"bank build failed: {job['error']}")
    job["wall_s"] = time.perf_counter() - started
    return job


def load_phase(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    """Closed-loop load without back-off; returns counts, latencies and Retry-After values."""
    lock = threading.Lock()
    latencies_ok: list[float] = []
    statuses: dict[str, int] = {}
    retry_after: list[int] = []
    stop_at = time.perf_counter() + seconds

    def loop(k: int) -> None:
        i = k
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as client:
            while time.perf_counter() < stop_at:
                data = images[i % len(images)]
                i += clients
                start = time.perf_counter()
                try:
                    response = client.post("/v1/inspect", files={"image": ("q.png", data)}, data={"bank": "bench"})
                    key = str(response.status_code)
                except httpx.HTTPError as err:
                    key = type(err).__name__
                    response = None
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[key] = statuses.get(key, 0) + 1
                    if key == "200":
                        latencies_ok.append(elapsed)
                    elif key == "429" and response is not None:
                        retry_after.append(int(response.headers["retry-after"]))

    wall = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    ok = statuses.get("200", 0)
    total = sum(statuses.values())
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": total,
        "statuses": statuses,
        "accepted_per_s": round(ok / wall, 3),
        "latency_ms": {
            "p50": _ms(percentile(latencies_ok, 50)),
            "p95": _ms(percentile(latencies_ok, 95)),
            "p99": _ms(percentile(latencies_ok, 99)),
            "mean": _ms(statistics.fmean(latencies_ok) if latencies_ok else None),
        },
        "rejected_429_share": round(statuses.get("429", 0) / total, 4) if total else None,
        "retry_after_s": {"min": min(retry_after), "max": max(retry_after)} if retry_after else None,
        "errors_other_than_429": total - ok - statuses.get("429", 0),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def scrape_stage_means(client: httpx.Client) -> dict[str, float]:
    """Mean duration per pipeline stage (ms) from the service's own histogram."""
    sums, counts = {}, {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("eagle_stage_duration_seconds_sum") or line.startswith("eagle_stage_duration_seconds_count"):
            name, value = line.rsplit(" ", 1)
            stage = name.split('stage="', 1)[1].split('"', 1)[0]
            (sums if "_sum" in name else counts)[stage] = float(value)
    return {stage: round(1000 * sums[stage] / counts[stage], 2) for stage in sums if counts.get(stage)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=224, help="Expert input size (the paper: 224).")
    parser.add_argument("--clients", type=int, default=2, help="Concurrent clients in the sustained phase.")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--overload-clients", type=int, default=24)
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "service_expert_only_cpu.json")
    args = parser.parse_args()

    from tests.synthetic import make_mvtec_like

    work = Path(tempfile.mkdtemp(prefix="eagle-bench-"))
    root = make_mvtec_like(work / "mvtec", n_train=12, n_test_good=6, n_test_bad_per_type=2)
    train = sorted((root / "widget" / "train" / "good").glob("*.png"))
    queries = sorted((root / "widget" / "test").rglob("*.png"))
    images = [p.read_bytes() for p in queries]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = service_env(work / "data", args.crop, args.queue_size, port)
    log = open(work / "serve.log", "wb")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "-m", "eagle", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    load_before = os.getloadavg()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
            time.sleep(0.3)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as client:
            print(f"building the bank ({len(train)} references, crop {args.crop}) ...", flush=True)
            job = build_bank(client, train)
            print(f"  built in {job['wall_s']:.1f} s", flush=True)
            wait_ready(url, process)
            for data in images[:3]:  # warm-up: sessions loaded, caches filled
                client.post("/v1/inspect", files={"image": ("w.png", data)}, data={"bank": "bench"}).raise_for_status()
            print(f"sustained: {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
            sustained = load_phase(url, images, args.clients, args.seconds)
            stages = scrape_stage_means(client)
            print(
                f"  {sustained['accepted_per_s']} req/s, p50 {sustained['latency_ms']['p50']} ms, "
                f"p95 {sustained['latency_ms']['p95']} ms",
                flush=True,
            )
            print(f"overload: {args.overload_clients} clients for {args.overload_seconds:.0f} s ...", flush=True)
            overload = load_phase(url, images, args.overload_clients, args.overload_seconds)
            print(f"  statuses {overload['statuses']}, Retry-After {overload['retry_after_s']}", flush=True)
            audited = sustained["statuses"].get("200", 0) + overload["statuses"].get("200", 0) + 3
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
        log.close()
    audit_bytes = sum(p.stat().st_size for p in (work / "data").glob("audit.sqlite3*"))  # WAL merged at close
    result = {
        "benchmark": "edge service, expert-only, CPU",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in load_before],
            "note": "shared development machine: other jobs ran at the same time (see load average)",
        },
        "settings": {
            "crop": args.crop,
            "runtime": "onnx",
            "weights": "random (same compute as the real weights)",
            "queue_size": args.queue_size,
            "bank": {k: job["result"][k] for k in ("n_references", "n_patches", "coreset_size")},
            "bank_build_s": round(job["wall_s"], 1),
        },
        "sustained": sustained,
        "stage_mean_ms": stages,
        "overload": overload,
        "audit_bytes_per_inspection": round(audit_bytes / max(audited, 1), 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
