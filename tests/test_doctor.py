"""``eagle doctor``'s checks, its exit codes, ``/readyz``'s gating and the start-up warm-up skip.

The environment is the test's: an empty (or hand-filled) Hugging Face cache under ``tmp_path`` through ``HF_HOME``,
``HF_HUB_OFFLINE=1`` or a hub endpoint on loopback that answers or never does, and no GPU (or a stated one).
Nothing is downloaded: a test that would reach the network fails through :func:`no_network`.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from packaging.specifiers import SpecifierSet

from app import capabilities, explain
from app.launch import start_onnx_warm_up
from deploy.api import create_app
from eagle import doctor
from eagle.cli_doctor import EXIT_NOT_RUNNABLE
from eagle.records import InspectionResult
from eagle.settings import Settings
from tests.cli_helpers import run_cli
from tests.fake_pipeline import FakePipeline

BACKBONE_REPO = "timm/wide_resnet50_2.tv_in1k"
MLLM_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, not offline, with a hub endpoint that refuses connections at once."""
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(doctor, "_gpu", lambda: None)  # no GPU, whatever the host has
    return home


@pytest.fixture
def offline(hf_home, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the check contacted the network")

    monkeypatch.setattr(doctor.urllib.request, "urlopen", refuse)


def cache_file(home: Path, repo: str, filename: str, content: bytes = b"x") -> Path:
    """Put ``filename`` into the hub cache layout (refs/main → snapshot), as huggingface_hub writes it."""
    folder = home / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    path = folder / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def settings(tmp_path: Path, **kwargs) -> Settings:
    kwargs.setdefault("mllm", {"enabled": False})
    return Settings(data_dir=tmp_path / "data", **kwargs)


# -- expert weights --------------------------------------------------------------------------------------------------
def test_offline_with_an_empty_cache_the_expert_weights_are_missing_with_the_download_command(
    offline, tmp_path, no_network
):
    report = doctor.run_checks(settings(tmp_path))
    check = report.get("expert_weights")
    assert (check.status, check.needed, check.blocking) == ("missing", True, True)
    assert "offline mode" in check.detail and str(offline / "hub") in check.detail
    assert f"hf download {BACKBONE_REPO} model.safetensors" in check.fix
    assert "EAGLE_EXPERT__WEIGHTS=random" in check.fix and "EAGLE_EXPERT__WEIGHTS=file" in check.fix
    assert report.get("hub").status == "ok" and "offline mode" in report.get("hub").detail
    assert not report.runnable and "Expert weights" in report.summary()


def test_cached_backbone_weights_are_found_where_timm_looks(offline, tmp_path, no_network):
    cache_file(offline, BACKBONE_REPO, "model.safetensors")
    report = doctor.run_checks(settings(tmp_path))
    assert report.get("expert_weights").status == "ok" and BACKBONE_REPO in report.get("expert_weights").detail
    assert report.runnable


def test_random_weights_are_a_warning_that_never_blocks(offline, tmp_path, no_network):
    report = doctor.run_checks(settings(tmp_path, expert={"weights": "random"}))
    check = report.get("expert_weights")
    assert (check.status, check.needed) == ("warning", True) and report.runnable


def test_a_weights_file_must_exist_and_be_safetensors(offline, tmp_path):
    missing = settings(tmp_path, expert={"weights": "file", "weights_path": tmp_path / "nope.safetensors"})
    assert doctor.expert_weights_check(missing, doctor.hub_state()).status == "missing"
    (tmp_path / "w.safetensors").write_bytes(b"x")
    present = settings(tmp_path, expert={"weights": "file", "weights_path": tmp_path / "w.safetensors"})
    assert doctor.expert_weights_check(present, doctor.hub_state()).status == "ok"


# -- the hub ---------------------------------------------------------------------------------------------------------
def test_an_unreachable_hub_is_found_fast_and_weights_that_are_not_cached_are_missing(hf_home, tmp_path):
    start = time.monotonic()
    report = doctor.run_checks(settings(tmp_path))
    assert time.monotonic() - start < 10
    hub = report.get("hub")
    assert hub.status == "warning" and "unreachable" in hub.detail and "HF_HUB_OFFLINE=1" in hub.fix
    assert report.get("expert_weights").status == "missing" and "hub unreachable" in report.get("expert_weights").detail


def test_a_hub_that_never_answers_costs_the_probe_timeout_only(hf_home, monkeypatch):
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        start = time.monotonic()
        state = doctor.hub_state(timeout_s=0.5)
        elapsed = time.monotonic() - start
    finally:
        silent.close()
    assert not state.reachable and not state.offline and elapsed < 3


def test_a_reachable_hub_turns_missing_weights_into_a_first_use_download(hf_home, tmp_path, monkeypatch):
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the http.server API
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        report = doctor.run_checks(settings(tmp_path))
    finally:
        server.shutdown()
    assert report.get("hub").status == "ok" and "reachable" in report.get("hub").detail
    weights = report.get("expert_weights")
    assert weights.status == "warning" and "downloads it" in weights.detail and report.runnable


# -- the MLLM --------------------------------------------------------------------------------------------------------
def test_mllm_weights_are_needed_only_when_the_mllm_is_enabled(offline, tmp_path, no_network):
    disabled = doctor.run_checks(settings(tmp_path, expert={"weights": "random"}))
    assert disabled.get("mllm_weights").needed is False and disabled.runnable
    enabled = doctor.run_checks(settings(tmp_path, expert={"weights": "random"}, mllm={"enabled": True}))
    check = enabled.get("mllm_weights")
    assert (check.status, check.needed) == ("missing", True) and f"hf download {MLLM_REPO}" in check.fix
    assert "EAGLE_MLLM__ENABLED=false" in check.fix and not enabled.runnable


def test_sharded_mllm_weights_count_only_when_every_shard_is_cached(offline, tmp_path, no_network):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"weight_map": {"a": shards[0], "b": shards[1]}}
    cache_file(offline, MLLM_REPO, "config.json", b"{}")
    cache_file(offline, MLLM_REPO, "model.safetensors.index.json", json.dumps(index).encode())
    cache_file(offline, MLLM_REPO, shards[0])
    mllm_on = settings(tmp_path, expert={"weights": "random"}, mllm={"enabled": True})
    partial = doctor.mllm_weights_check(mllm_on, doctor.hub_state())
    assert partial.status == "missing" and "1 of 2 weight shards" in partial.detail
    cache_file(offline, MLLM_REPO, shards[1])
    assert doctor.mllm_weights_check(mllm_on, doctor.hub_state()).status == "ok"


def test_a_local_mllm_folder_is_used_as_is(offline, tmp_path):
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    local = settings(tmp_path, mllm={"enabled": True, "model_id": str(folder)})
    assert doctor.mllm_weights_check(local, doctor.hub_state()).status == "ok"
    wrong = settings(tmp_path, mllm={"enabled": True, "model_id": str(tmp_path / "absent")})
    assert doctor.mllm_weights_check(wrong, doctor.hub_state()).status == "missing"


# -- GPU and bitsandbytes --------------------------------------------------------------------------------------------
def test_no_gpu_blocks_only_an_explicit_cuda_device(tmp_path):
    assert doctor.gpu_check(settings(tmp_path), None, probe=False).status == "ok"
    auto = doctor.gpu_check(settings(tmp_path, mllm={"enabled": True}), None, probe=False)
    assert (auto.status, auto.needed) == ("warning", False)
    cuda = doctor.gpu_check(settings(tmp_path, mllm={"enabled": True, "device": "cuda"}), None, probe=False)
    assert (cuda.status, cuda.needed, cuda.blocking) == ("missing", True, True)


def test_a_small_gpu_warns_with_the_quantisation_fix(tmp_path):
    small = doctor._Gpu("Tiny GPU", total_gib=8.0, free_gib=6.0)
    bf16 = settings(tmp_path, mllm={"enabled": True, "quantization": "bf16"})  # 7B in bf16: ≈ 16 GiB
    check = doctor.gpu_check(bf16, small, probe=False)
    assert check.status == "warning" and "EAGLE_MLLM__QUANTIZATION=4bit" in check.fix and "Tiny GPU" in check.detail
    four_bit = settings(tmp_path, mllm={"enabled": True})  # auto on a GPU: 4-bit, ≈ 6.9 GiB: fits 79 GiB free
    assert doctor.gpu_check(four_bit, doctor._Gpu("Big", 80.0, 79.0), probe=False).status == "ok"


def test_bitsandbytes_is_needed_for_4bit_on_a_gpu_and_its_fix_names_the_pinned_range(tmp_path, monkeypatch):
    real_find_spec = doctor.importlib.util.find_spec
    monkeypatch.setattr(
        doctor.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name)
    )
    gpu = doctor._Gpu("GPU", 24.0, 23.0)
    needed = doctor.bitsandbytes_check(settings(tmp_path, mllm={"enabled": True}), gpu)
    assert (needed.status, needed.needed) == ("missing", True)
    assert needed.fix.startswith('pip install "bitsandbytes') and "EAGLE_MLLM__QUANTIZATION=bf16" in needed.fix
    pinned = needed.fix.split('"')[1][len("bitsandbytes") :]  # the range this package declares (pyproject)
    assert SpecifierSet(pinned).contains(importlib.metadata.version("bitsandbytes"))  # the pinned version fits it
    on_cpu = doctor.bitsandbytes_check(settings(tmp_path, mllm={"enabled": True}), None)  # auto on CPU: fp32
    assert (on_cpu.status, on_cpu.needed) == ("ok", False)


# -- disk ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("free_mb", "status"), [(10, "missing"), (1000, "warning"), (50_000, "ok")])
def test_free_disk_under_the_data_folder(tmp_path, monkeypatch, free_mb, status):
    usage = type("Usage", (), {"free": free_mb * 2**20, "total": 10**12, "used": 0})
    seen = []
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: seen.append(Path(path)) or usage)
    check = doctor.disk_check(settings(tmp_path))  # data/ does not exist yet: its parent is measured
    assert check.status == status and check.needed and seen == [tmp_path]
    if status != "ok":
        assert "EAGLE_DATA_DIR" in check.fix


# -- eagle doctor ----------------------------------------------------------------------------------------------------
def test_eagle_doctor_json_exits_4_when_the_configured_setup_cannot_run(offline, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("EAGLE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EAGLE_MLLM__ENABLED", "false")
    monkeypatch.setenv("EAGLE_EXPERT__WEIGHTS", "hub")
    code, out, _ = run_cli(["doctor", "--json"])
    body = json.loads(out)
    assert code == EXIT_NOT_RUNNABLE == 4 and body["runnable"] is False
    rows = {row["name"]: row for row in body["checks"]}
    assert rows["expert_weights"]["status"] == "missing" and rows["disk"]["status"] in ("ok", "warning")

    monkeypatch.setenv("EAGLE_EXPERT__WEIGHTS", "random")
    code, out, _ = run_cli(["doctor"])
    assert code == 0 and "OK: ready" in out and "Expert weights" in out and "random weights" in out


# -- /readyz ---------------------------------------------------------------------------------------------------------
def test_readyz_is_gated_only_by_what_the_configured_setup_needs(offline, tmp_path, no_network):
    hub_weights = settings(tmp_path)  # the default hub weights: not cached, offline
    with TestClient(create_app(FakePipeline(banks=["widget"]), hub_weights)) as client:
        response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 503 and body["error"]["code"] == "not_ready"
    assert body["checks"]["expert_weights"] is False and body["checks"]["banks"] is True
    assert "missing: Expert weights" in body["error"]["message"] and "hf download" in body["error"]["message"]
    assert {row["name"] for row in body["capabilities"]} >= {"gpu", "bitsandbytes", "hub", "mllm_weights"}

    random = settings(tmp_path, expert={"weights": "random"})
    with TestClient(create_app(FakePipeline(banks=["widget"]), random)) as client:
        response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 200 and body["ready"] is True
    # Not needed by an expert-only box: reported, never gating.
    assert not {"gpu", "bitsandbytes", "hub", "mllm_weights"} & set(body["checks"])
    assert {row["name"]: row["needed"] for row in body["capabilities"]}["gpu"] is False


def test_the_report_cache_recomputes_after_its_ttl(offline, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(doctor, "run_checks", lambda s, **kw: calls.append(1) or doctor.Report(()))
    cache = doctor.ReportCache(settings(tmp_path), ttl_s=0.2)
    cache.get(), cache.get()
    assert len(calls) == 1
    time.sleep(0.25)
    cache.get()
    assert len(calls) == 2


# -- the start-up warm-up --------------------------------------------------------------------------------------------
class _WarmPipeline:
    def __init__(self) -> None:
        self.called = threading.Event()

    def warm_onnx_cache(self):
        self.called.set()
        return Path("graph.onnx")


def test_the_warm_up_is_skipped_at_once_offline_with_nothing_cached(offline, tmp_path, caplog, no_network):
    report = doctor.run_checks(settings(tmp_path))
    pipeline = _WarmPipeline()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="app.launch"):
        thread = start_onnx_warm_up(pipeline, report)
    assert thread is None and time.monotonic() - start < 1 and not pipeline.called.is_set()
    assert "ONNX warm-up skipped at start-up" in caplog.text and "offline mode" in caplog.text
    assert doctor.warm_up_skip_reason(settings(tmp_path)) is not None


def test_the_warm_up_runs_when_the_weights_are_there(offline, tmp_path, no_network):
    cache_file(offline, BACKBONE_REPO, "model.safetensors")
    pipeline = _WarmPipeline()
    thread = start_onnx_warm_up(pipeline, doctor.run_checks(settings(tmp_path)))
    assert thread is not None
    thread.join(10)
    assert pipeline.called.is_set()
    assert doctor.warm_up_skip_reason(settings(tmp_path)) is None
    assert doctor.warm_up_skip_reason(settings(tmp_path, expert={"weights": "random"})) is None


# -- the app: what is disabled, and the numbers in words -------------------------------------------------------------
def test_the_app_disables_building_and_hides_the_model_options_with_the_reasons(offline, tmp_path, no_network):
    report = doctor.run_checks(settings(tmp_path))
    gates = capabilities.app_gates(report, mllm_enabled=False)
    assert gates.build_reason and "hf download" in gates.build_reason and gates.expert_only
    assert "expert-only mode" in gates.mllm_reason
    line = capabilities.status_markdown(report, gates)
    assert "Bank building is unavailable" in line and "Expert-only mode" in line
    details = capabilities.details_markdown(report)
    assert "EAGLE\\_EXPERT\\_\\_WEIGHTS=random" in details  # escaped: Markdown would make __…__ bold
    ready = doctor.run_checks(settings(tmp_path, expert={"weights": "random"}))
    assert capabilities.app_gates(ready, mllm_enabled=False).build_reason is None


def _result(score: float, **fields) -> InspectionResult:
    base = dict(
        image_sha256="0" * 64,
        image_size=(32, 32),
        bank="widget",
        bank_id="b",
        score=score,
        tau=0.5,
        s_max=0.7,
        expert_decision="anomalous" if score > 0.5 else "normal",
        low_confidence=0.5 <= score <= 0.7,
        boxes=[],
        inspected_region=(0, 0, 32, 32),
        mode="expert-only",
        verdict="defect" if score > 0.5 else "no_defect",
    )
    return InspectionResult(**{**base, **fields})


def test_the_verdict_says_why_in_words():
    assert explain.verdict_reason(_result(0.2)).startswith("The expert is sure: the score 0.2 is below τ 0.5")
    assert "above τ" in explain.verdict_reason(_result(0.9))
    unsure = explain.verdict_reason(
        _result(0.6, mode="expert+mllm", caas_applied=True, caas_alpha=0.6, mllm_answer="no", verdict="no_defect")
    )
    assert unsure.startswith("The expert is unsure") and "so the model looked closer with CAAS (α = 0.6)" in unsure
    assert unsure.endswith("it overruled the expert.")


def test_timings_are_a_table_with_the_total():
    table = explain.timings_markdown({"decode": 1.25, "embed": 10.0, "total": 12.5})
    assert table.splitlines() == [
        "| stage | ms |",
        "|---|---:|",
        "| decode | 1.2 |",
        "| embed | 10.0 |",
        "| **total** | **12.5** |",
    ]
    assert explain.timings_markdown({"a": 1.0, "b": 2.0}).endswith("| **total** | **3.0** |")


def test_an_enabled_mllm_without_weights_disables_its_options_with_the_fix(offline, tmp_path, no_network):
    report = doctor.run_checks(settings(tmp_path, expert={"weights": "random"}, mllm={"enabled": True}))
    gates = capabilities.app_gates(report, mllm_enabled=True)
    assert not gates.expert_only and gates.build_reason is None
    assert gates.mllm_reason.startswith("the multimodal model cannot load here") and "hf download" in gates.mllm_reason
    assert "The multimodal model is unavailable" in capabilities.status_markdown(report, gates)


def test_build_ui_disables_build_and_teach_when_the_weights_are_missing(offline, tmp_path, no_network):
    from app.ui import build_ui
    from eagle.pipeline import Pipeline

    config = settings(tmp_path)
    demo = build_ui(Pipeline(config), doctor.run_checks(config))
    props = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"] if c["props"].get("elem_id")}
    assert props["build-bank"]["interactive"] is False and "unavailable" in props["build-bank"]["value"]
    assert props["teach-bank"]["interactive"] is False and props["ref-files"]["interactive"] is False
    assert "Build bank is unavailable" in props["build-unavailable"]["value"]
    assert "Bank building is unavailable" in props["capability-status"]["value"]
