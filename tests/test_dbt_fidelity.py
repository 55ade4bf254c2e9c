"""DBT and coreset choices the reference code makes, through the bank build, its meta, the app and the CLI.

* ``dbt_search`` (leave-own-out, the reference; whole bank, the paper's Algorithm 1) reaches the scores and
  is recorded in the bank's meta; banks saved before the field existed still load, with the same id.
* ``coreset_start_method`` (center_farthest, the reference; mean_farthest, the earlier rule) is recorded.
* An empty CAAS band (τ > s_max, certain with ≤ 10 references at κ = 3) is a bank warning with its reason,
  shown in the app's bank facts and in ``eagle build-bank``'s output.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from eagle.banks import BankStore
from eagle.cli_expert import _bank_summary, _print_summary
from eagle.images import list_images, load_image
from eagle.settings import ExpertSettings
from expert.bank import load_bank, save_bank
from expert.bank_schema import BankError
from expert.build import fit_bank
from expert.dbt import training_scores
from tests.test_bank import _bank, _images, write_fake_onnx

SETTINGS = ExpertSettings(weights="random", seed=0)


# ------------------------------------------------------------------------------------------------ meta
def _save(tmp_path: Path, settings: ExpertSettings) -> Path:
    onnx = write_fake_onnx(tmp_path / "exported.onnx")
    return save_bank(_bank(0, settings), tmp_path / "bank", onnx_source=onnx, reference_images=_images())


def _strip_search(bank_dir: Path) -> None:
    raw = json.loads((bank_dir / "meta.json").read_text())
    del raw["threshold"]["search"]
    (bank_dir / "meta.json").write_text(json.dumps(raw))


def test_dbt_search_and_start_method_are_recorded_and_a_different_search_is_a_note(tmp_path):
    settings = ExpertSettings(weights="random", dbt_search="whole_bank", coreset_start_method="mean_farthest")
    saved = _save(tmp_path, settings)
    raw = json.loads((saved / "meta.json").read_text())
    assert raw["threshold"]["search"] == "whole_bank" and raw["coreset"]["start_method"] == "mean_farthest"
    assert load_bank(saved, settings).notes == []
    notes = load_bank(saved, ExpertSettings(weights="random")).notes
    assert notes == [
        "dbt_search: bank 'whole_bank', running 'leave_own_out'; using the bank's tau=6.5 "
        "(rebuild the bank to change it)"
    ]


def test_a_bank_saved_before_dbt_search_existed_loads_as_leave_own_out_with_its_id(tmp_path):
    saved = _save(tmp_path, ExpertSettings(weights="random"))
    bank_id = load_bank(saved).meta.bank_id
    _strip_search(saved)  # what an older format-1 bank's meta.json looks like
    loaded = load_bank(saved, ExpertSettings(weights="random"))
    assert loaded.meta.threshold.search == "leave_own_out" and loaded.meta.bank_id == bank_id


def test_the_bank_id_covers_a_non_default_search(tmp_path):
    saved = _save(tmp_path, ExpertSettings(weights="random", dbt_search="whole_bank"))
    _strip_search(saved)
    with pytest.raises(BankError, match="bank_id mismatch"):
        load_bank(saved)


# ---------------------------------------------------------------------------------------------- building
class _FakeEmbedder:
    """Deterministic per-image features [B, 784, 64] seeded by the image's pixels (no backbone run).

    Every batch it returns is kept, so a test can recompute DBT from exactly what the build saw.
    """

    def __init__(self) -> None:
        self.produced: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = []
        for image in batch:
            rng = np.random.default_rng(int(np.abs(image).sum() * 1000) % (2**32))
            out.append(rng.standard_normal((784, 64)).astype(np.float32) + rng.standard_normal(64).astype(np.float32))
        self.produced.append(np.stack(out))
        return self.produced[-1]


@pytest.fixture(scope="module")
def ten_references(synthetic_root):
    paths = list_images(synthetic_root / "widget" / "train" / "good")[:10]
    return [load_image(p, max_pixels=10_000_000) for p in paths], [p.name for p in paths]


def test_dbt_search_setting_reaches_the_training_scores(ten_references, random_backbone, random_weights_info):
    """Each build's scores equal :func:`training_scores` (itself tested against brute force) with its search."""
    images, names = ten_references
    scores = {}
    for search in ("leave_own_out", "whole_bank"):
        embedder = _FakeEmbedder()
        bank = fit_bank(
            images,
            names,
            settings=ExpertSettings(weights="random", seed=0, dbt_search=search),
            backbone=random_backbone,
            weights_info=random_weights_info,
            name=search,
            embedder=embedder,
        )
        features = np.concatenate(embedder.produced)
        assert bank.meta.threshold.search == search and features.shape == (10, 784, 64)
        want, _ = training_scores(features, _coreset_rows(bank, features), search=search, min_unsampled=32)
        np.testing.assert_allclose(bank.train_scores, want, rtol=1e-6)
        scores[search] = bank.train_scores
    assert (scores["whole_bank"] <= scores["leave_own_out"] * (1 + 1e-6)).all()
    assert (scores["whole_bank"] < scores["leave_own_out"]).any()


def _coreset_rows(bank, features: np.ndarray) -> np.ndarray:
    """Rows of the flattened [N * P] features that the memory bank holds (matched exactly)."""
    flat = features.reshape(-1, features.shape[-1])
    lookup = {row.tobytes(): i for i, row in enumerate(flat)}
    return np.array([lookup[row.tobytes()] for row in bank.memory_bank], dtype=np.int64)


@pytest.fixture(scope="module")
def ten_reference_bank(ten_references, random_backbone, random_weights_info):
    """A bank built from 10 references with the default settings (random WideResNet weights)."""
    images, names = ten_references
    return fit_bank(
        images, names, settings=SETTINGS, backbone=random_backbone, weights_info=random_weights_info, name="ten"
    )


def _band_warnings(warnings) -> list[str]:
    return [w for w in warnings if w.startswith("CAAS band empty")]


@pytest.mark.slow
def test_ten_references_record_an_empty_caas_band_with_its_reason(ten_reference_bank):
    bank = ten_reference_bank
    threshold = bank.meta.threshold
    assert bank.meta.counts.used_for_dbt == 10 and threshold.tau > threshold.s_max
    (warning,) = _band_warnings(bank.meta.warnings)
    assert warning == (
        f"CAAS band empty (tau {threshold.tau:.3g} > s_max {threshold.s_max:.3g}): no score is ever "
        "low-confidence, so CAAS never turns on; with 10 DBT training scores this is certain at kappa = 3, "
        "since the largest of 10 scores is at most mean + 3 sigma; use 11 or more reference images"
    )


@pytest.mark.slow
def test_the_app_bank_facts_show_the_empty_band(ten_reference_bank, ten_references, tmp_path):
    from app.handlers import bank_facts_markdown

    settings = ExpertSettings(weights="random", seed=0)
    save_bank(ten_reference_bank, tmp_path / "banks" / "ten", reference_images=ten_references[0])
    facts = bank_facts_markdown(SimpleNamespace(banks=BankStore(tmp_path / "banks", settings)), "ten")
    (warning,) = _band_warnings(ten_reference_bank.meta.warnings)
    assert f"⚠️ {warning}" in facts
    assert facts.count("reference images;") == 1  # the few-references warning is said once, not twice


@pytest.mark.slow
def test_build_bank_output_shows_the_empty_band(ten_reference_bank, tmp_path):
    summary = _bank_summary(ten_reference_bank.meta, tmp_path, n_files=10, stage_seconds={"embed": 1.0})
    (warning,) = _band_warnings(summary["warnings"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _print_summary(summary)
    text = out.getvalue()
    assert f"warning: {warning}" in text.splitlines()
    assert "empty (tau > s_max): CAAS never turns on" in text
