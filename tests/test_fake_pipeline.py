"""The one fake the tests use is the real pipeline: only its small injected parts are fakes.

``FakePipeline`` overrides none of :class:`~eagle.pipeline.Pipeline`'s methods; its parts (bank store, scorer,
builder, MLLM) are compared with the real parts' signatures here, so they cannot drift from what the pipeline calls.
"""

from __future__ import annotations

import importlib
import inspect
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eagle.bank_service import BankService
from eagle.banks import BankNotFoundError
from eagle.images import image_sha256
from eagle.inspection import ScorerSource
from eagle.models import MLLMUnavailableError
from eagle.pipeline import BankCatalog, InspectionPipeline, Pipeline
from eagle.records import InspectOptions
from eagle.settings import Settings
from tests.fake_pipeline import FakeBankStore, FakeBuilder, FakeMLLM, FakePipeline, FakeScorer
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


def test_the_fake_is_the_real_pipeline_with_nothing_overridden():
    assert issubclass(FakePipeline, Pipeline)
    overridden = {name for name in vars(FakePipeline) if not name.startswith("_")}
    assert overridden == set(), overridden  # inspect, finish, decode, line_health, ready...: the real code
    _assert_compatible(Pipeline, InspectionPipeline)


@pytest.mark.parametrize(
    ("part", "real"),
    [
        (FakeBankStore, BankCatalog),
        (FakeBankStore, ScorerSource),
        (FakeBuilder, BankService),
        (FakeScorer, "expert.scorer.ExpertScorer"),
        (FakeMLLM, "mllm.inspector.MLLMInspector"),
    ],
)
def test_each_fake_part_takes_every_call_of_the_real_one(part, real):
    if isinstance(real, str):
        module, name = real.rsplit(".", 1)
        real = getattr(importlib.import_module(module), name)
    wanted = {"score"} if part is FakeScorer else {"ask", "explain_stream", "attention_overlay"}
    members = _members(real) if part not in (FakeScorer, FakeMLLM) else {n: vars(real)[n] for n in wanted}
    _assert_compatible(part, type("Calls", (), members))


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
    """The fake builder teaches like the real one: a new version, τ recomputed, scores; the mask check is real."""
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

    white = io.BytesIO()
    Image.new("RGB", (32, 24), "white").save(white, format="PNG")
    fake.check_mask(white.getvalue())  # the real check: a black-and-white picture, or polygons JSON
    fake.check_mask('{"polygons": [[[0, 0], [10, 0], [10, 10]]]}')
    with pytest.raises(Exception, match="mask") as err:
        fake.check_mask(b"not an image")
    assert getattr(err.value, "code", None) == "invalid_mask"


def test_the_real_inspection_runs_the_fake_scorer_and_mllm_through_the_caas_gate():
    """Record, boxes, pictures, timings and the CAAS gate are the real pipeline's; the answers the fake MLLM's."""
    pipeline = FakePipeline(banks=["widget"], mllm_enabled=True)
    assert pipeline.mllm_status() == "MLLM not loaded yet (loads on the first inspection)"

    bright = np.full((30, 40, 3), 153, np.uint8)  # score 0.6: anomalous and unsure (τ ≤ 0.6 ≤ s_max)
    result = pipeline.inspect(bright, "widget", InspectOptions(prompt_setting="full", caas="auto"), image_name="b.png")
    assert (result.mode, result.model_id, result.caas_applied, result.caas_alpha) == (
        "expert+mllm",
        "fake-mllm",
        True,
        pipeline.settings.caas.alpha,
    )
    assert (result.mllm_answer, result.verdict) == ("no", "no_defect")  # CAAS on: the fake flips the expert's yes
    assert result.score == pytest.approx(0.6) and result.bank_id == pipeline.banks.meta("widget")["bank_id"]
    assert result.image_size == (40, 30) and result.template is None and len(result.boxes) == 1
    assert result.images.boxed is not None and result.images.heatmap_overlay.shape == (30, 40, 3)
    assert {"decode", "embed", "render", "mllm_generate", "total"} <= set(result.timings_ms)

    off = pipeline.inspect(bright, "widget", InspectOptions(prompt_setting="full", caas="off"))
    assert (off.mllm_answer, off.verdict, off.caas_applied) == ("yes", "defect", False)
    dark = np.full((30, 40, 3), 25, np.uint8)
    normal = pipeline.inspect(dark, "widget", InspectOptions(prompt_setting="full", caas="auto"))
    assert (normal.verdict, normal.caas_applied, normal.images.boxed) == ("no_defect", False, None)
    assert pipeline.mllm_status() == "MLLM loaded: fake-mllm (none)"
    assert pipeline.ready() == {"banks": True, "mllm": True}
    expert_only = pipeline.inspect(bright, "widget", InspectOptions(use_mllm=False))
    assert (expert_only.mode, expert_only.verdict) == ("expert-only", "defect")
    with pytest.raises(BankNotFoundError):
        pipeline.inspect(bright, "other")


def test_a_failing_injected_loader_is_the_one_mllm_unavailable_error(tmp_path):
    def fail(progress):
        raise MLLMUnavailableError("no weights here")

    settings = Settings(data_dir=tmp_path, mllm={"enabled": True})
    banks = FakeBankStore(settings.banks_dir)
    banks.seed("widget")
    pipeline = Pipeline(settings, banks=banks, mllm_loader=fail)
    with pytest.raises(MLLMUnavailableError, match="could not be loaded: no weights here; inspect with the expert"):
        pipeline.inspect(np.zeros((8, 8, 3), np.uint8), "widget")
    assert pipeline.mllm_status().startswith("MLLM unavailable (no weights here)")
    assert pipeline.ready() == {"banks": True, "mllm": False}
