"""Helpers for the service tests: a real uvicorn on 127.0.0.1, images, zips, metrics parsing, a real bank.

The pipeline the service tests use is :class:`tests.fake_pipeline.FakePipeline`: the real
:class:`eagle.pipeline.Pipeline` with a tiny bank store, scorer, builder and MLLM injected.
"""

from __future__ import annotations

import io
import re
import socket
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image

TOKEN = "test-token-0123456789abcdef"


def png_bytes(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    """A small random RGB PNG."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A zip archive holding ``files`` (name → content)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


class LiveServer:
    """A real uvicorn serving ``app`` on 127.0.0.1 (a pre-bound free port) in a background thread."""

    def __init__(self, app: Any, *, graceful_timeout: int = 30) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_timeout, limit_concurrency=256
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()

    def client(self, token: str | None = TOKEN, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    """The response is a JSON error with this status and code, and no traceback."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text exposition strictly: ``{(name, sorted labels): value}``; asserts HELP/TYPE order."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    typed: set[str] = set()
    line_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        match = line_re.match(line)
        assert match, f"malformed sample line: {line!r}"
        name, _, label_text, value = match.groups()
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or base in typed, f"sample before its TYPE: {line!r}"
        labels = tuple(sorted(label_re.findall(label_text or "")))
        samples[(name, labels)] = float(value.replace("+Inf", "inf"))
    return samples


# -- the real pipeline (random-weight expert, tiny input size) ---------------------------------------------------------
REAL_EXPERT = {
    "weights": "random",
    "resize": 32,
    "crop": 32,
    "min_unsampled_patches": 4,
    "min_references": 2,
    "recommended_references": 2,
}
"""A random-weight expert at 32×32 input (4×4 patches): the whole real code path, fast enough for tests."""


def real_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for an ``eagle`` subprocess using the same settings as :func:`real_settings` (and ONNX cache)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("EAGLE_") or k == "EAGLE_ONNX_CACHE_DIR"}
    env.update({f"EAGLE_EXPERT__{k.upper()}": str(v) for k, v in REAL_EXPERT.items()})
    env.update({"EAGLE_DATA_DIR": str(data_dir), "EAGLE_MLLM__ENABLED": "false", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def real_settings(data_dir: Path, *, mllm: dict | None = None, **service: Any):
    from eagle.settings import Settings

    return Settings(
        data_dir=data_dir,
        expert=REAL_EXPERT,
        mllm=mllm or {"enabled": False},
        service={"token": TOKEN, **service},
    )


@dataclass
class RealBank:
    """A bank built ONCE per test process through ``POST /v1/banks`` with the real pipeline."""

    data_dir: Path
    bank: str
    job: dict
    good: list[Path]
    defective: list[Path]


_REAL_BANK: RealBank | None = None
_REAL_BANK_LOCK = threading.Lock()


def real_bank() -> RealBank:
    """Build (first call) or return the shared real bank: synthetic references zipped and uploaded to a live
    service backed by a real expert-only :class:`eagle.pipeline.Pipeline` (ONNX export included)."""
    global _REAL_BANK
    with _REAL_BANK_LOCK:
        if _REAL_BANK is None:
            _REAL_BANK = _build_real_bank()
        return _REAL_BANK


def _build_real_bank() -> RealBank:
    import atexit
    import shutil
    import tempfile

    from deploy.api import create_app
    from eagle.pipeline import Pipeline
    from tests.synthetic import make_mvtec_like

    root = Path(tempfile.mkdtemp(prefix="eagle-service-test-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    synthetic = make_mvtec_like(root / "mvtec", n_train=6, n_test_good=3, n_test_bad_per_type=2)
    train = sorted((synthetic / "widget" / "train" / "good").glob("*.png"))
    settings = real_settings(root / "data")
    app = create_app(Pipeline(settings), settings)
    server = LiveServer(app).start()
    try:
        with server.client() as client:
            archive = zip_bytes({f"good/{p.name}": p.read_bytes() for p in train})
            response = client.post("/v1/banks", data={"name": "widget"}, files={"archive": ("good.zip", archive)})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            deadline = time.monotonic() + 600
            while True:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in ("succeeded", "failed") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    finally:
        server.stop()
    assert job["state"] == "succeeded", job
    test = synthetic / "widget" / "test"
    good = sorted((test / "good").glob("*.png"))
    defective = sorted(p for d in sorted(test.iterdir()) if d.name != "good" for p in sorted(d.glob("*.png")))
    return RealBank(root / "data", "widget", job, good, defective)
