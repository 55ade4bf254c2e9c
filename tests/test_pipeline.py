"""The pipeline end to end on the synthetic set: expert-only and with a tiny offline MLLM."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from eagle.bank_service import ReferenceImagesError
from eagle.images import ImageError, load_image
from eagle.models import MLLMUnavailableError
from eagle.pipeline import Pipeline
from eagle.records import InspectOptions
from eagle.settings import Settings
from tests.fixtures_pipeline import pipeline_settings, split_test_images


@pytest.fixture(scope="module")
def built(built_pipeline):
    b = built_pipeline
    return b.pipeline, b.summary, b.stages, b.references


_test_images = split_test_images


def test_build_reports_every_stage_and_summarises_the_bank(built):
    pipeline, summary, stages, references = built
    seen = [s for s, _ in stages]
    for stage in ("read", "embed", "coreset", "dbt", "save"):
        assert stage in seen
    assert all(0.0 <= f <= 1.0 for _, f in stages)
    assert summary.name == "widget"
    assert summary.n_references == len(references)
    assert summary.n_patches == len(references) * 784
    assert summary.coreset_size == int(summary.n_patches * 0.1)
    assert np.isfinite(summary.tau) and summary.s_max >= 0
    assert [s.name for s in pipeline.banks.list()] == ["widget"]


def test_expert_only_record_has_every_field(built, synthetic_root):
    pipeline, summary, _, references = built
    good, bad = _test_images(synthetic_root)
    for path in (bad[0], good[0]):
        result = pipeline.inspect(path, "widget")
        image = load_image(path, max_pixels=10**8)
        assert result.mode == "expert-only"
        assert result.image_name == path.name
        assert len(result.image_sha256) == 64
        assert result.image_size == (image.shape[1], image.shape[0])
        assert result.bank == "widget" and result.bank_id == summary.bank_id
        assert (result.tau, result.s_max) == pytest.approx((summary.tau, summary.s_max))
        anomalous = result.score >= result.tau
        assert result.expert_decision == ("anomalous" if anomalous else "normal")
        assert result.verdict == ("defect" if anomalous else "no_defect")
        assert result.low_confidence == (result.tau <= result.score <= result.s_max)
        if not anomalous:
            assert result.boxes == [] and result.images.boxed is None
        for box in result.boxes:
            assert 0 <= box.x0 < box.x1 <= image.shape[1] and 0 <= box.y0 < box.y1 <= image.shape[0]
        assert result.template in [p.name for p in references]
        assert result.images.heatmap_overlay.shape == image.shape
        assert result.images.template is not None and result.images.template.ndim == 3
        assert result.mllm_answer is None and result.caas_applied is False
        for stage in ("decode", "preprocess", "embed", "search", "map", "render", "total"):
            assert result.timings_ms[stage] >= 0
        as_json = result.model_dump(mode="json")
        assert "images" not in as_json and as_json["verdict"] == result.verdict


def test_defects_score_above_good_parts(built, synthetic_root):
    pipeline, *_ = built
    good, bad = _test_images(synthetic_root)
    good_scores = [pipeline.inspect(p, "widget").score for p in good]
    bad_scores = [pipeline.inspect(p, "widget").score for p in bad]
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score([0] * len(good_scores) + [1] * len(bad_scores), good_scores + bad_scores)
    assert auroc >= 0.9


def test_inputs_as_bytes_path_and_array_agree(built, synthetic_root):
    pipeline, *_ = built
    _, bad = _test_images(synthetic_root)
    path = bad[0]
    by_path = pipeline.inspect(path, "widget")
    by_bytes = pipeline.inspect(path.read_bytes(), "widget", image_name=path.name)
    by_array = pipeline.inspect(load_image(path, max_pixels=10**8), "widget")
    assert by_path.image_sha256 == by_bytes.image_sha256
    assert by_path.score == by_bytes.score == by_array.score


def test_concurrent_callers_get_the_serial_results(built, synthetic_root):
    pipeline, *_ = built
    good, bad = _test_images(synthetic_root)
    paths = (good[:2] + bad[:2]) * 2
    serial = [pipeline.inspect(p, "widget").score for p in paths]
    results: dict[int, float] = {}

    def work(i: int) -> None:
        results[i] = pipeline.inspect(paths[i], "widget").score

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(paths))] == pytest.approx(serial, rel=1e-5)


def test_bad_inputs_are_clear_errors(built, tmp_path):
    pipeline, *_ = built
    with pytest.raises(ImageError):
        pipeline.inspect(b"not an image", "widget", image_name="junk.png")
    with pytest.raises(FileNotFoundError, match="no bank named 'nope'"):
        pipeline.inspect(np.zeros((64, 64, 3), np.uint8), "nope")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = sorted(Path(p) for p in pipeline.banks.path("widget").glob("references/*.png"))
    with pytest.raises(ReferenceImagesError, match="broken.png"):
        pipeline.build_bank([*good[:3], bad], "other")
    assert not pipeline.banks.exists("other")


def test_mllm_disabled_means_expert_only_and_a_clear_error(built):
    pipeline, *_ = built
    assert not pipeline.mllm_enabled and pipeline.ready() == {"banks": True, "mllm": True}
    with pytest.raises(MLLMUnavailableError, match="disabled"):
        pipeline.load_mllm()


# --------------------------------------------------------------------------- with a tiny MLLM
@pytest.fixture(scope="module")
def with_mllm(built, tiny_qwen_dir):
    pipeline, *_ = built
    settings = pipeline_settings(
        pipeline.settings.data_dir,
        model_id=str(tiny_qwen_dir),
        max_new_tokens=4,
        explanation_max_new_tokens=12,
        max_pixels=112 * 112,  # every image pinned to 4×4 tokens: the tiny model stays fast on the CPU host
    )
    return Pipeline(settings)


def test_mllm_record_fields(with_mllm, synthetic_root):
    good, bad = _test_images(synthetic_root)
    result = with_mllm.inspect(bad[0], "widget", InspectOptions(prompt_setting="full", explain=True))
    assert result.mode == "expert+mllm"
    assert result.prompt_setting == "full"
    assert result.mllm_answer in {"yes", "no", "unknown"}
    assert result.verdict == {"yes": "defect", "no": "no_defect", "unknown": "unknown"}[result.mllm_answer]
    assert isinstance(result.mllm_raw, str)
    assert result.model_id == str(with_mllm.settings.mllm.model_id)
    assert isinstance(result.explanation, str)
    assert result.timings_ms["mllm_explain"] > 0
    assert with_mllm.mllm_loaded() and with_mllm.ready()["mllm"]


def test_expert_only_request_skips_the_model(with_mllm, synthetic_root):
    good, _ = _test_images(synthetic_root)
    result = with_mllm.inspect(good[0], "widget", InspectOptions(use_mllm=False))
    assert result.mode == "expert-only" and result.mllm_answer is None


def test_an_external_template_replaces_the_retrieved_one(with_mllm, synthetic_root, monkeypatch):
    """The evaluation hands MMAD's own template to ``finish``: the model sees it and the record names it."""
    from mllm.inspector import MLLMInspector

    good, _ = _test_images(synthetic_root)
    image = load_image(good[0], max_pixels=10**8)
    expert = with_mllm.run_expert(image, "widget")
    template = np.full((48, 64, 3), 7, np.uint8)
    seen = []
    real_ask = MLLMInspector.ask

    def spy(self, **kwargs):
        seen.append((np.asarray(kwargs["template"]).copy(), kwargs["query"].size))
        return real_ask(self, **kwargs)

    monkeypatch.setattr(MLLMInspector, "ask", spy)
    options = InspectOptions(prompt_setting="full", caas="off", explain=False)
    result = with_mllm.finish(image, expert, "widget", options, template=template, template_name="MMAD/x/good/000.png")
    assert result.template == "MMAD/x/good/000.png" and np.array_equal(result.images.template, template)
    assert np.array_equal(seen[0][0], template)
    retrieved = with_mllm.finish(image, expert, "widget", options)
    assert retrieved.template == with_mllm.banks.reference_name("widget", expert.template_index)
    assert not np.array_equal(seen[1][0], template)


@pytest.mark.parametrize(
    ("where", "policy", "expected"),
    [
        ("tau", "auto", True),
        ("s_max", "auto", True),
        ("below_tau", "auto", False),
        ("above_s_max", "auto", False),
        ("below_tau", "on", True),
        ("tau", "off", False),
    ],
)
def test_caas_gate_at_tau_and_s_max_exactly(with_mllm, synthetic_root, where, policy, expected):
    pipeline = with_mllm
    good, _ = _test_images(synthetic_root)
    image = load_image(good[0], max_pixels=10**8)
    expert = pipeline.run_expert(image, "widget")
    tau, s_max = 1.0, 2.0  # a band that exists, with exact float boundaries
    score = {
        "tau": tau,
        "s_max": s_max,
        "below_tau": np.nextafter(tau, -np.inf),
        "above_s_max": np.nextafter(s_max, np.inf),
    }[where]
    forced = dataclasses.replace(
        expert, score=float(score), tau=tau, s_max=s_max, anomalous=score >= tau, low_confidence=tau <= score <= s_max
    )
    result = pipeline.finish(image, forced, "widget", InspectOptions(caas=policy, alpha=0.6))
    assert result.caas_applied is expected
    assert result.caas_alpha == (0.6 if expected else None)
    assert result.low_confidence == (where in {"tau", "s_max"})


def test_loading_the_model_reports_progress_once(built, tiny_qwen_dir):
    pipeline, *_ = built
    fresh = Pipeline(pipeline_settings(pipeline.settings.data_dir, model_id=str(tiny_qwen_dir)))
    reports: list[tuple[str, float]] = []
    first = fresh.load_mllm(progress=lambda stage, fraction: reports.append((stage, fraction)))
    assert reports and all(isinstance(stage, str) for stage, _ in reports)
    fractions = [f for _, f in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert fresh.load_mllm() is first  # loaded once, reused
    assert "MLLM loaded" in fresh.mllm_status()


def test_a_missing_model_is_reported_with_a_clear_message(built, tmp_path):
    pipeline, *_ = built
    broken = Pipeline(pipeline_settings(pipeline.settings.data_dir, model_id=str(tmp_path / "no-such-model")))
    with pytest.raises(MLLMUnavailableError, match="no-such-model"):
        broken.load_mllm()
    assert "MLLM unavailable" in broken.mllm_status()
    assert broken.ready()["mllm"] is False


def test_query_views_keep_the_presets_pixel_budget(tmp_path):
    """A large query is decoded reduced, but never below what the MLLM preset's budget needs (512·28·28 px)."""
    qwen = Pipeline(Settings(data_dir=tmp_path, mllm={"enabled": True, "preset": "qwen2.5-vl-7b"}))
    assert qwen.inspector.view_limits()["min_pixels"] == 512 * 28 * 28
    pinned = Pipeline(Settings(data_dir=tmp_path, mllm={"enabled": True, "max_pixels": 256 * 28 * 28}))
    assert pinned.inspector.view_limits()["min_pixels"] == 256 * 28 * 28
    expert_only = Pipeline(Settings(data_dir=tmp_path, mllm={"enabled": False}))
    assert expert_only.inspector.view_limits()["min_pixels"] == 0


def test_one_request_uses_one_bank_version_even_if_a_new_one_lands_meanwhile(built, synthetic_root, monkeypatch):
    """A teach or rollback that makes a new version current mid-request cannot mix versions in one record."""
    pipeline, *_ = built
    good, _ = split_test_images(synthetic_root)
    real_load = pipeline.banks.load
    loads = []
    monkeypatch.setattr(pipeline.banks, "load", lambda name: loads.append(name) or real_load(name))
    result = pipeline.inspect(good[0], "widget")
    assert loads == ["widget"], "score, template and bank id must come from the one scorer loaded for the request"
    assert result.bank_id == real_load("widget").bank.meta.bank_id
