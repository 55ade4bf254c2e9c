"""The real pipeline and the one fake the tests use satisfy the same protocol.

``InspectionPipeline`` is ``runtime_checkable``, but ``isinstance`` only checks that the members exist; the
signatures are compared here too, so the fake cannot drift from what the front ends call.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from eagle.banks import BankNotFoundError, BankStore
from eagle.images import image_sha256
from eagle.models import MLLMUnavailableError
from eagle.pipeline import BankCatalog, InspectionPipeline, Pipeline
from eagle.records import InspectOptions
from eagle.settings import Settings
from tests.fake_pipeline import FakeBankStore, FakePipeline
from tests.service_helpers import png_bytes


def _members(protocol: type) -> dict[str, object]:
    """The protocol's own members (methods and properties), by name."""
    return {
        name: value
        for name, value in vars(protocol).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


def _assert_compatible(implementation: type, protocol: type) -> None:
    """Every protocol member exists on ``implementation``; each method accepts every call the protocol allows."""
    for name, member in _members(protocol).items():
        if isinstance(member, property):
            continue  # a property or an instance attribute (Pipeline.banks): checked on instances by isinstance
        assert hasattr(implementation, name), f"{implementation.__name__} lacks {name}"
        wanted = inspect.signature(member).parameters
        given = inspect.signature(getattr(implementation, name)).parameters
        for param in wanted.values():
            assert param.name in given, f"{implementation.__name__}.{name} lacks parameter {param.name}"
            actual = given[param.name]
            assert actual.kind == param.kind, f"{implementation.__name__}.{name}({param.name}): {actual.kind}"
            if param.default is not inspect.Parameter.empty:
                assert actual.default is not inspect.Parameter.empty, f"{implementation.__name__}.{name}({param.name})"
        for extra in set(given) - set(wanted):
            assert given[extra].default is not inspect.Parameter.empty or given[extra].kind in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            ), f"{implementation.__name__}.{name} requires {extra}, which the protocol does not pass"


def _front_end(pipeline: InspectionPipeline) -> InspectionPipeline:
    """Annotated to take the protocol: a static type checker checks both pipelines passed to it below."""
    return pipeline


@pytest.mark.parametrize("implementation", [Pipeline, FakePipeline])
def test_both_pipelines_have_the_protocols_signatures(implementation):
    _assert_compatible(implementation, InspectionPipeline)


@pytest.mark.parametrize("store", [BankStore, FakeBankStore])
def test_both_bank_stores_have_the_catalogs_signatures(store):
    _assert_compatible(store, BankCatalog)


def test_the_real_and_the_fake_pipeline_are_inspection_pipelines(tmp_path):
    real = Pipeline(Settings(data_dir=tmp_path, mllm={"enabled": False}))
    fake = FakePipeline(tmp_path / "fake")
    for pipeline in (real, fake):
        assert isinstance(_front_end(pipeline), InspectionPipeline)
    assert not isinstance(object(), InspectionPipeline)


def test_inspect_is_decode_then_run_expert_then_finish():
    pipeline = FakePipeline(banks=["widget"])
    data = png_bytes(40, 30, seed=3)
    result = pipeline.inspect(data, "widget", image_name="a.png")

    decoded = pipeline.decode(data, image_name="a.png")
    expert = pipeline.run_expert(decoded, "widget")
    staged = pipeline.finish(decoded, expert, "widget", image_name="a.png", image_sha256=image_sha256(decoded))
    assert len(pipeline.expert_calls) == len(pipeline.finish_calls) == 2  # inspect went through both stages
    ignore = {"timings_ms", "images"}
    assert result.model_dump(exclude=ignore) == staged.model_dump(exclude=ignore)
    assert result.image_sha256 == image_sha256(data) and result.image_size == (40, 30)
    assert result.score == pytest.approx(decoded.pixels.mean() / 255) and result.mode == "expert-only"
    assert {"decode", "embed", "total"} <= set(result.timings_ms)


def test_a_built_bank_scores_like_the_evaluation_and_answers_per_setting(tmp_path):
    references = []
    for i in range(3):
        path = tmp_path / f"ref{i}.png"
        path.write_bytes(png_bytes(16, 16, seed=i))
        references.append(path)
    stages: list[str] = []
    pipeline = FakePipeline(tmp_path / "data", mllm_enabled=True)
    summary = pipeline.build_bank(references, "bolts", progress=lambda stage, _fraction: stages.append(stage))
    assert summary.n_references == 3 and pipeline.builds == ["bolts"] and stages[0] == "read"
    assert pipeline.banks.reference_name("bolts", 0) == "ref0.png"
    assert FakePipeline(tmp_path / "data").banks.exists("bolts")  # on disk: seen by another instance

    black = np.zeros((16, 16, 3), np.uint8)
    expert = pipeline.run_expert(black, "bolts")
    assert expert.anomalous and expert.boxes  # far from the references' grey level
    full = pipeline.finish(black, expert, "bolts", InspectOptions(prompt_setting="full"), image_name="x.png")
    assert (full.mode, full.mllm_answer, full.verdict, full.template) == ("expert+mllm", "yes", "defect", "ref0.png")
    off = pipeline.finish(black, expert, "bolts", InspectOptions(use_mllm=False))
    assert off.mode == "expert-only" and off.verdict == "defect"


def test_hooks_and_mllm_contract():
    pipeline = FakePipeline(banks=["widget"], fail_with=KeyboardInterrupt(), fail_after=1)
    pipeline.inspect(png_bytes(), "widget")
    with pytest.raises(KeyboardInterrupt):
        pipeline.inspect(png_bytes(), "widget")
    with pytest.raises(BankNotFoundError):
        FakePipeline().inspect(png_bytes(), "widget")
    with pytest.raises(MLLMUnavailableError):
        FakePipeline().load_mllm()
    assert FakePipeline().ready() == {"banks": False, "mllm": True}
    enabled = FakePipeline(banks=["widget"], mllm_enabled=True)
    assert enabled.ready() == {"banks": True, "mllm": False}
    enabled.load_mllm()
    assert enabled.ready()["mllm"] is True


def test_a_seeded_bank_is_listed_and_deleted(tmp_path: Path):
    pipeline = FakePipeline(tmp_path, banks=["widget", "bolts"])
    assert [s.name for s in pipeline.banks.list()] == ["bolts", "widget"]
    pipeline.banks.delete("bolts")
    assert not pipeline.banks.exists("bolts") and pipeline.banks.unusable() == {}


def test_teaching_the_fake_makes_a_new_version_and_lets_the_image_pass(tmp_path):
    """The fake implements the protocol's teach call like the real one: a new version, τ recomputed, scores."""
    fake = FakePipeline(tmp_path)
    references = [np.full((16, 16, 3), level, np.uint8) for level in (100, 102, 104, 106)]
    fake.build_bank(references, "bolts", names=[f"r{i}.png" for i in range(4)])
    bright = np.full((16, 16, 3), 160, np.uint8)
    assert fake.run_expert(bright, "bolts").anomalous

    result = fake.add_references([bright], "bolts", names=["bright.png"])
    assert (result.version_before, result.version) == (1, 2)
    assert (result.references_before, result.references_after) == (4, 5)
    assert result.tau_after > result.tau_before
    (taught,) = result.taught
    assert taught.name == "bright.png" and not taught.passed_before and taught.passes_now
    assert not fake.run_expert(bright, "bolts").anomalous
    (version,) = fake.banks.history("bolts")
    assert (version.version, version.n_references, version.current) == (2, 5, True)

    fake.check_mask(png_bytes())
    fake.check_mask('{"polygons": []}')
    with pytest.raises(Exception, match="mask") as err:
        fake.check_mask(b"not an image")
    assert getattr(err.value, "code", None) == "invalid_mask"


class _TinyScorer:
    """A bank's expert for the real pipeline: the score is the mean intensity / 255, τ = 0.5, s_max = 0.7."""

    bank = SimpleNamespace(meta=SimpleNamespace(bank_id="tiny-bank"))

    def score(self, image: np.ndarray, *, original_size: tuple[int, int] | None = None):
        from expert.boxes import Box
        from expert.preprocess import Geometry
        from expert.scorer import ExpertResult

        height, width = image.shape[:2]
        orig_w, orig_h = original_size or (width, height)
        score = float(image.mean() / 255)
        boxes = [Box(0, 0, max(1, orig_w // 2), max(1, orig_h // 2), score)] if score >= 0.5 else []
        return ExpertResult(
            score=score,
            tau=0.5,
            s_max=0.7,
            anomalous=score >= 0.5,
            low_confidence=0.5 <= score <= 0.7,
            patch_scores=np.full((2, 2), score, np.float32),
            crop_map=np.full((8, 8), score, np.float32),
            boxes=boxes,
            template_index=0,
            template_name="ref0.png",
            geometry=Geometry(orig_h, orig_w, 8, 8, 0, 0, 8, 8),
            timings_ms={"embed": 1.0},
        )

    def reference_name(self, index: int) -> str:
        return f"ref{index}.png"


class _TinyBanks:
    """The store calls an inspection makes (the scorer, and the template it retrieved), and an empty listing."""

    def list(self) -> list:
        return []

    def load(self, name: str) -> _TinyScorer:
        if name != "tiny":
            raise BankNotFoundError(f"no bank named {name!r}")
        return _TinyScorer()

    def template_image(self, name: str, index: int, *, scorer=None) -> np.ndarray:
        return np.full((8, 8, 3), 128, np.uint8)


class _TinyMLLM:
    """Answers what the expert said (yes when the boxed view is sent), CAAS on when the pipeline's gate says so."""

    loaded = SimpleNamespace(model_id="tiny-mllm", quantization="none")

    def __init__(self) -> None:
        self.asked: list[tuple[str, bool, bool]] = []  # (setting, boxed sent, CAAS config given)

    def ask(self, *, query, template, boxed, expert_anomalous, setting, caas=None, question=None):
        from mllm.inspector import MLLMAnswer

        self.asked.append((setting, boxed is not None, caas is not None))
        answer = "yes" if expert_anomalous else "no"
        return MLLMAnswer(answer[0].upper(), answer, answer, caas is not None, 10, 1, {"generate": 3.0})


def test_the_real_pipeline_inspects_with_an_injected_scorer_and_mllm(tmp_path):
    """The parts are constructor arguments: a front-end test runs the REAL inspection with tiny stand-ins."""
    model = _TinyMLLM()
    loads: list[object] = []
    settings = Settings(data_dir=tmp_path, mllm={"enabled": True}, caas={"policy": "auto"})
    pipeline = Pipeline(settings, banks=_TinyBanks(), mllm_loader=lambda progress: loads.append(progress) or model)
    assert pipeline.mllm_status() == "MLLM not loaded yet (loads on the first inspection)"

    bright = np.full((30, 40, 3), 153, np.uint8)  # score 0.6: anomalous and unsure (τ ≤ 0.6 ≤ s_max)
    result = pipeline.inspect(bright, "tiny", InspectOptions(prompt_setting="full"), image_name="b.png")
    assert (result.mode, result.verdict, result.mllm_answer, result.model_id) == (
        "expert+mllm",
        "defect",
        "yes",
        "tiny-mllm",
    )
    assert result.score == pytest.approx(0.6) and result.caas_applied and result.bank_id == "tiny-bank"
    assert result.image_size == (40, 30) and result.template == "ref0.png" and len(result.boxes) == 1
    assert result.images.boxed is not None and result.images.heatmap_overlay.shape == (30, 40, 3)
    assert {"decode", "embed", "render", "mllm_generate", "total"} <= set(result.timings_ms)

    dark = np.full((30, 40, 3), 25, np.uint8)
    normal = pipeline.inspect(dark, "tiny", InspectOptions(prompt_setting="full", use_mllm=True))
    assert (normal.verdict, normal.caas_applied, normal.images.boxed) == ("no_defect", False, None)
    assert model.asked == [("full", True, True), ("full", False, False)] and len(loads) == 1
    assert pipeline.mllm_status() == "MLLM loaded: tiny-mllm (none)"
    assert pipeline.ready() == {"banks": False, "mllm": True}
    expert_only = pipeline.inspect(bright, "tiny", InspectOptions(use_mllm=False))
    assert (expert_only.mode, expert_only.verdict) == ("expert-only", "defect") and len(model.asked) == 2
    with pytest.raises(BankNotFoundError):
        pipeline.inspect(bright, "other")


def test_a_failing_injected_loader_is_the_one_mllm_unavailable_error(tmp_path):
    def fail(progress):
        raise MLLMUnavailableError("no weights here")

    pipeline = Pipeline(Settings(data_dir=tmp_path, mllm={"enabled": True}), banks=_TinyBanks(), mllm_loader=fail)
    with pytest.raises(MLLMUnavailableError, match="could not be loaded: no weights here; inspect with the expert"):
        pipeline.inspect(np.zeros((8, 8, 3), np.uint8), "tiny")
    assert pipeline.mllm_status().startswith("MLLM unavailable (no weights here)")
    assert pipeline.ready()["mllm"] is False
