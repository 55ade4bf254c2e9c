"""The prepared GPU check (``bench/device_check.py``) proven on the CPU: its dry run, end to end, in a subprocess.

The dry run is the same code path as the GPU run with the tiny test models (4-bit NF4 replaced by fp32), so a
broken stage shows up here, in CI, and not during the few minutes a GPU is lent. The subprocess also proves that
the check imports nothing the GPU image lacks (no ``eagle``/``app``/``deploy``, gradio, pydantic-settings).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CAAS_MODES = ("off", "logit", "weight", "weight_raw")
MLLM_STAGES = ("mllm_7b_4bit", "mllm_3b_4bit", "mllm_7b_bf16")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("device-check") / "device.json"
    done = subprocess.run(
        [sys.executable, "bench/device_check.py", "--dry-run", "--repeats", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout
    return json.loads(out.read_text(encoding="utf-8"))


def test_dry_run_runs_every_stage_without_error(dry_run: dict):
    assert dry_run["dry_run"] is True
    stages = dry_run["stages"]
    assert list(stages) == ["environment", "mllm_7b_4bit", "explanation_7b_4bit", "expert", *MLLM_STAGES[1:]]
    assert [name for name, stage in stages.items() if "error" in stage] == []
    assert dry_run["forbidden_modules_imported"] == []


def test_dry_run_says_what_it_substituted_for_4bit(dry_run: dict):
    for name in ("mllm_7b_4bit", "mllm_3b_4bit"):
        stage = dry_run["stages"][name]
        assert (stage["requested_quantization"], stage["quantization"]) == ("4bit", "fp32")
        assert "NF4 replaced by fp32" in stage["substitution"]
    bf16 = dry_run["stages"]["mllm_7b_bf16"]
    assert (bf16["quantization"], bf16["substitution"]) == ("bf16", None)


def test_dry_run_times_one_full_query_per_caas_mode(dry_run: dict):
    stage = dry_run["stages"]["mllm_7b_4bit"]
    assert set(stage["modes"]) == set(CAAS_MODES)
    for mode in CAAS_MODES:
        timing = stage["modes"][mode]
        assert timing["latency_ms_median"] > 0
        assert timing["n_new_tokens"] == 8
        assert len(timing["image_tokens"]) == 3  # template, query and boxed query
        assert timing["caas_applied"] is (mode != "off")
    assert stage["modes"]["off"]["overhead_vs_off_pct"] == 0.0


def test_dry_run_measures_the_stream_and_the_expert(dry_run: dict):
    stream = dry_run["stages"]["explanation_7b_4bit"]
    assert stream["time_to_first_chunk_s"] > 0 and stream["tokens_per_s"] > 0
    expert = dry_run["stages"]["expert"]
    assert expert["torch"]["build_s"] > 0 and expert["torch"]["inspection_ms_median"] > 0
    assert expert["memory_bank"][1] > 0


def test_the_gpu_script_pins_the_wheels_it_carries_from_the_requirements():
    script = (REPO / "bench" / "device_check.sh").read_text(encoding="utf-8")
    pinned = (REPO / "requirements-base.txt").read_text(encoding="utf-8") + (REPO / "requirements.txt").read_text(
        encoding="utf-8"
    )
    for package in re.findall(r'"([a-z-]+)==\$\(pin [a-z-]+\)"', script):
        assert re.search(rf"^{package}==\S+$", pinned, flags=re.MULTILINE), f"{package} has no pin to carry"
    assert 'LIMIT="${EAGLE_DEVICE_CHECK_LIMIT_S:-360}"' in script  # the 6-minute hard limit of a lent GPU
