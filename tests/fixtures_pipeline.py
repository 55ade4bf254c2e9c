"""Session fixtures for pipeline-level tests: an expert-only pipeline with the synthetic bank built once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from eagle.banks import BankSummary
from eagle.pipeline import Pipeline
from eagle.settings import Settings

CATEGORY = "widget"
BANK = "widget"


def pipeline_settings(data_dir: Path, **mllm) -> Settings:
    """Random-weight expert settings for tests; ``mllm`` keys enable the MLLM (e.g. ``model_id=...``)."""
    return Settings(
        data_dir=data_dir,
        expert={"weights": "random", "min_references": 2, "recommended_references": 2},
        mllm={"enabled": bool(mllm), **mllm},
        caas={"layer_start": 9, "layer_end": 15},
    )


@dataclass
class BuiltPipeline:
    pipeline: Pipeline
    summary: BankSummary
    stages: list[tuple[str, float]]
    references: list[Path]


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory, synthetic_root) -> BuiltPipeline:
    """Expert-only :class:`Pipeline` whose data dir holds the bank ``widget`` built from the synthetic train set."""
    data_dir = tmp_path_factory.mktemp("pipeline-data")
    pipeline = Pipeline(pipeline_settings(data_dir))
    references = sorted((synthetic_root / CATEGORY / "train" / "good").glob("*.png"))
    stages: list[tuple[str, float]] = []
    summary = pipeline.build_bank(references, BANK, progress=lambda s, f: stages.append((s, f)))
    return BuiltPipeline(pipeline, summary, stages, references)


def split_test_images(root: Path) -> tuple[list[Path], list[Path]]:
    """(good, defective) test images of the synthetic category."""
    test = root / CATEGORY / "test"
    good = sorted((test / "good").glob("*.png"))
    bad = sorted(p for d in sorted(test.iterdir()) if d.name != "good" for p in sorted(d.glob("*.png")))
    return good, bad
