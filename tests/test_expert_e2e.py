"""The expert end to end (expert.build, expert.scorer): build a bank from synthetic normals, score the test set.

A seeded random-weight WideResNet-50-2 and the synthetic MVTec-like set (tests/synthetic.py). One bank is
built per session (embed → coreset → DBT → ONNX export → save) and shared by the tests below.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from eagle.images import list_images, load_image
from eagle.settings import ExpertSettings
from expert.bank import load_bank, save_bank
from expert.bank_schema import BankError
from expert.build import ReferenceCountError, build_bank, fit_bank
from expert.progress import BUILD_STAGES
from expert.scorer import SCORE_STAGES, ExpertScorer, load_expert

pytestmark = pytest.mark.slow

MAX_PIXELS = 10_000_000
SETTINGS = ExpertSettings(weights="random", seed=0)


def _read(path: Path) -> np.ndarray:
    return load_image(path, max_pixels=MAX_PIXELS)


def _mask_bbox(mask_path: Path) -> tuple[int, int, int, int]:
    mask = _read(mask_path)[..., 0] > 127
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def references(synthetic_root):
    paths = list_images(synthetic_root / "widget" / "train" / "good")
    return [_read(p) for p in paths], [p.name for p in paths]


@pytest.fixture(scope="session")
def built(tmp_path_factory, references, random_backbone, random_weights_info):
    """The session's bank, built once through build_bank, with its progress calls and warnings."""
    images, names = references
    out_dir = tmp_path_factory.mktemp("banks") / "widget"
    calls: list[tuple[str, float]] = []
    collect = _Collect()
    logging.getLogger("expert.build").addHandler(collect)
    try:
        bank = build_bank(
            images,
            names,
            settings=SETTINGS,
            backbone=random_backbone,
            weights_info=random_weights_info,
            out_dir=out_dir,
            name="widget",
            progress=lambda stage, fraction: calls.append((stage, fraction)),
        )
    finally:
        logging.getLogger("expert.build").removeHandler(collect)
    return bank, out_dir, calls, collect.messages


@pytest.fixture(scope="session")
def scorer(built):
    return load_expert(built[1], SETTINGS)


@pytest.fixture(scope="session")
def test_set(synthetic_root, scorer):
    """[(defect kind, image path, image, ExpertResult)] for every synthetic test image (ONNX runtime)."""
    rows = []
    for path in list_images(synthetic_root / "widget" / "test"):
        image = _read(path)
        rows.append((path.parent.name, path, image, scorer.score(image)))
    return rows


# ------------------------------------------------------------------------------------------- building
def test_build_reports_every_stage_in_order_and_ends_each_at_one(built):
    _, _, calls, _ = built
    stages = [stage for stage, _ in calls]
    first_seen = [s for i, s in enumerate(stages) if s not in stages[:i]]
    assert first_seen == list(BUILD_STAGES)
    for stage in BUILD_STAGES:
        fractions = [f for s, f in calls if s == stage]
        assert fractions[0] == 0.0 and fractions[-1] == 1.0
        assert fractions == sorted(fractions)


def test_bank_contents_match_settings_and_counts(built, references):
    bank, out_dir, _, _ = built
    images, names = references
    n, patches = len(images), 28 * 28
    assert bank.directory == out_dir.absolute()
    assert bank.memory_bank.shape == (int(n * patches * SETTINGS.coreset_ratio), 1024)
    assert bank.coreset_image_ids.shape == (bank.memory_bank.shape[0],)
    assert set(np.unique(bank.coreset_image_ids)) <= set(range(n))
    assert bank.global_descriptors.shape == (n, 1024)
    assert [ref.name for ref in bank.meta.references] == names
    assert bank.meta.counts.references == n and bank.meta.counts.patches == n * patches
    assert bank.meta.backbone.weights_source == "random:seed=0"
    assert bank.has_onnx and bank.onnx_path.is_file()
    assert all(bank.reference_path(i).is_file() for i in range(n))
    threshold = bank.meta.threshold
    assert threshold.method == "k_sigma" and math.isfinite(threshold.tau)
    scores = bank.train_scores.astype(np.float64)
    assert threshold.tau == pytest.approx(scores.mean() + 3.0 * scores.std(ddof=0), rel=1e-6)
    assert threshold.s_max == pytest.approx(scores.max(), rel=1e-6)


def test_fewer_references_than_recommended_warns_and_is_recorded(built, references):
    bank, _, _, logged = built
    n = len(references[0])
    assert n < SETTINGS.recommended_references
    assert any(f"only {n} reference images" in message for message in logged)
    assert any(f"only {n} reference images" in w for w in bank.meta.warnings)
    assert load_bank(bank.directory).meta.warnings == bank.meta.warnings  # kept in meta.json


def test_memory_bank_rows_are_patches_of_the_image_they_are_attributed_to(built, references, scorer):
    bank = built[0]
    images, _ = references
    for row in (0, len(bank.memory_bank) // 2, len(bank.memory_bank) - 1):
        image_id = int(bank.coreset_image_ids[row])
        features, _ = scorer.patch_features(images[image_id])
        distances = ((features - bank.memory_bank[row]) ** 2).sum(axis=1)
        # Batch-8 (build) vs batch-1 (query) runs of the same ONNX graph: equal up to float noise.
        assert distances.min() <= 1e-6 * float((bank.memory_bank[row] ** 2).sum())


# ------------------------------------------------------------------------------------------- scoring
def test_image_auroc_on_the_synthetic_set_is_at_least_0_9(test_set):
    labels = [kind != "good" for kind, *_ in test_set]
    scores = [result.score for *_, result in test_set]
    assert sum(labels) >= 3 and len(labels) - sum(labels) >= 3
    assert roc_auc_score(labels, scores) >= 0.9


def test_result_fields_follow_their_definitions(test_set, scorer):
    tau, s_max = scorer.bank.meta.threshold.tau, scorer.bank.meta.threshold.s_max
    for _, _, image, result in test_set:
        assert result.patch_scores.shape == (28, 28)
        assert result.score == float(result.patch_scores.max())
        assert (result.tau, result.s_max) == (tau, s_max)
        assert result.anomalous == (result.score >= tau)
        assert result.low_confidence == (tau <= result.score <= s_max)
        assert (len(result.boxes) > 0) == result.anomalous  # boxes only when score >= tau
        assert result.anomaly_map.shape == image.shape[:2] == result.valid_mask.shape
        np.testing.assert_array_equal(result.valid_mask, result.geometry.inspected_mask())
        assert not result.anomaly_map[~result.valid_mask].any()
        assert set(result.timings_ms) == set(SCORE_STAGES)
        assert result.template_name == scorer.bank.meta.references[result.template_index].name


def test_patch_scores_equal_brute_force_nearest_neighbour(test_set, scorer):
    _, _, image, result = test_set[-1]
    features, _ = scorer.patch_features(image)
    memory = scorer.bank.memory_bank.astype(np.float64)
    squared = ((features.astype(np.float64)[:, None, :] - memory[None, :, :]) ** 2).sum(axis=2)
    expected = squared.min(axis=1).reshape(28, 28)
    np.testing.assert_allclose(result.patch_scores, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_a_reference_image_retrieves_itself_as_template_and_scores_below_tau(references, scorer):
    images, names = references
    for index in (0, len(images) - 1):
        result = scorer.score(images[index])
        assert result.template_index == index and result.template_name == names[index]
        assert result.score < result.tau and not result.boxes


@pytest.mark.parametrize("index", [0, 1, 2], ids=["224x224", "240x320", "300x200"])
def test_box_overlaps_the_defect_bounding_box_iou_at_least_0_5(synthetic_root, scorer, index):
    # Scratches: one elongated defect per image. Compact defects (holes, stains ~4 patches across) get
    # boxes ~70 % of the defect's side from the 2/3-of-max binarisation: see the next test.
    image = _read(synthetic_root / "widget" / "test" / "scratch" / f"{index:03d}.png")
    assert image.shape[0] != image.shape[1] or index == 0
    truth = _mask_bbox(synthetic_root / "widget" / "ground_truth" / "scratch" / f"{index:03d}_mask.png")
    result = scorer.score(image)
    assert result.anomalous and result.boxes
    top = result.boxes[0]
    assert _iou((top.x0, top.y0, top.x1, top.y1), truth) >= 0.5


def test_top_box_lies_on_the_defect_for_every_defect_type_and_aspect(test_set, synthetic_root):
    for kind, path, _, result in test_set:
        if kind == "good":
            continue
        mask = _read(synthetic_root / "widget" / "ground_truth" / kind / f"{path.stem}_mask.png")[..., 0] > 127
        top = result.boxes[0]
        ys, xs = np.nonzero(mask)
        assert top.x0 <= xs.mean() < top.x1 and top.y0 <= ys.mean() < top.y1, path  # centred on the defect
        assert mask[top.y0 : top.y1, top.x0 : top.x1].sum() >= 0.25 * mask.sum(), path  # covers much of it


# ------------------------------------------------------------------------------------------- round trip
def test_bank_round_trip_gives_identical_tensors_and_scores(built, scorer, test_set, tmp_path):
    bank = built[0]
    reloaded = load_bank(built[1], SETTINGS)
    for name in ("memory_bank", "train_scores", "coreset_image_ids", "global_descriptors"):
        np.testing.assert_array_equal(getattr(reloaded, name), getattr(bank, name))
    copy_dir = save_bank(reloaded, tmp_path / "copy")
    in_memory = ExpertScorer(bank, scorer.embedder, SETTINGS)
    from_copy = load_expert(copy_dir, SETTINGS)
    for _, _, image, result in test_set[:: max(1, len(test_set) // 4)]:
        assert in_memory.score(image).score == result.score
        again = from_copy.score(image)
        assert again.score == result.score and again.template_index == result.template_index
        np.testing.assert_array_equal(again.patch_scores, result.patch_scores)
        assert again.boxes == result.boxes


def test_torch_and_onnx_runtimes_agree(built, test_set):
    torch_scorer = load_expert(built[1], SETTINGS, runtime="torch")
    for _, _, image, result in [test_set[0], test_set[-1]]:
        other = torch_scorer.score(image)
        np.testing.assert_allclose(other.patch_scores, result.patch_scores, rtol=1e-3, atol=1e-5)
        assert other.anomalous == result.anomalous and other.template_index == result.template_index


def test_torch_runtime_refuses_a_backbone_with_other_weights(built):
    with pytest.raises(BankError, match="weights"):
        load_expert(built[1], ExpertSettings(weights="random", seed=1), runtime="torch")


@pytest.mark.parametrize(
    ("change", "key"),
    [({"crop": 192}, "crop"), ({"distance": "euclidean"}, "distance"), ({"center_crop": False}, "center_crop")],
)
def test_a_bank_built_with_other_settings_is_refused_with_a_clear_error(built, change, key):
    running = ExpertSettings(weights="random", seed=0, **change)
    with pytest.raises(BankError, match=f"setting {key}") as err:
        load_expert(built[1], running)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("count", [0, 1])
def test_too_few_references_give_a_clear_error_naming_the_minimum(tmp_path, references, random_backbone, count):
    images, names = references
    with pytest.raises(ReferenceCountError, match="at least 2") as err:
        build_bank(
            images[:count],
            names[:count],
            settings=SETTINGS,
            backbone=random_backbone,
            weights_info=None,
            out_dir=tmp_path / "bank",
            name="few",
        )
    assert "EAGLE_EXPERT__MIN_REFERENCES" in str(err.value)
    assert not (tmp_path / "bank").exists()


def test_identical_references_give_a_usable_bank_with_finite_tau(
    tmp_path, references, random_backbone, random_weights_info, caplog
):
    image = references[0][0]
    caplog.set_level(logging.WARNING, logger="expert.build")
    bank = fit_bank(
        [image] * 3,
        ["a.png", "b.png", "c.png"],
        settings=SETTINGS,
        backbone=random_backbone,
        weights_info=random_weights_info,
        name="same",
    )
    threshold = bank.meta.threshold
    assert math.isfinite(threshold.tau) and math.isfinite(threshold.s_max)
    assert threshold.s_max >= 0.0 and len(bank.train_scores) == bank.meta.counts.used_for_dbt
    assert bank.meta.counts.used_for_dbt >= 1
    duplicates = "2 reference images are pixel-identical copies of others (b.png = a.png, c.png = a.png)"
    assert duplicates in caplog.text and any(duplicates in w for w in bank.meta.warnings)
    save_bank(bank, tmp_path / "same", reference_images=[image] * 3)  # no ONNX file: the torch runtime
    result = load_expert(tmp_path / "same", SETTINGS, runtime="torch").score(image)
    # Every patch of the query is unsampled in some reference, whose leave-own-out score bounds it.
    assert math.isfinite(result.score) and result.score <= threshold.s_max * (1 + 1e-4) + 1e-6


def test_images_and_names_must_pair_up(references, random_backbone):
    images, names = references
    with pytest.raises(ValueError, match="names"):
        fit_bank(images[:3], names[:2], settings=SETTINGS, backbone=random_backbone, weights_info=None, name="x")
    with pytest.raises(ValueError, match="unique"):
        fit_bank(images[:2], ["a", "a"], settings=SETTINGS, backbone=random_backbone, weights_info=None, name="x")
