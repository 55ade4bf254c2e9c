"""Metrics equal scikit-learn's on fixed records; AUPRO equals a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from eagle.evaluation.metrics import MetricsError, aupro, auroc, classification_metrics, pixel_auroc


def _as_predictions(labels: list[int], verdicts: list[str]) -> list[int]:
    """The documented rule: unknown is wrong, i.e. the opposite of the truth."""
    return [{"defect": 1, "no_defect": 0}.get(v, 1 - y) for y, v in zip(labels, verdicts, strict=True)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_classification_metrics_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 57
    labels = rng.integers(0, 2, n).tolist()
    verdicts = rng.choice(["defect", "no_defect", "unknown"], n, p=[0.45, 0.45, 0.1]).tolist()
    m = classification_metrics(labels, verdicts)
    y_pred = _as_predictions(labels, verdicts)
    assert m.accuracy == pytest.approx(accuracy_score(labels, y_pred))
    assert m.precision == pytest.approx(precision_score(labels, y_pred, zero_division=0))
    assert m.recall == pytest.approx(recall_score(labels, y_pred, zero_division=0))
    assert m.f1 == pytest.approx(f1_score(labels, y_pred, zero_division=0))
    assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(labels, y_pred))
    assert m.n_unknown == verdicts.count("unknown")
    assert m.tp + m.fp + m.tn + m.fn == n and m.n_positive == sum(labels)


def test_unknown_counts_as_wrong_on_both_classes() -> None:
    m = classification_metrics([1, 0], ["unknown", "unknown"])
    assert (m.tp, m.fn, m.fp, m.tn, m.accuracy, m.n_unknown) == (0, 1, 1, 0, 0.0, 2)


def test_single_class_and_empty_denominators_follow_the_reference_summary() -> None:
    # normal images only: the anomalous-image accuracy is 0 (not left out, as scikit-learn would), so
    # balanced accuracy = (2/3 + 0) / 2; P, R, F1 have empty or zero terms and are 0
    m = classification_metrics([0, 0, 0], ["no_defect", "no_defect", "defect"])
    assert m.balanced_accuracy == pytest.approx(1 / 3)
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)
    # anomalous images only, all found: recall 1, precision 1, balanced accuracy (0 + 1) / 2
    m = classification_metrics([1, 1], ["defect", "defect"])
    assert (m.precision, m.recall, m.f1, m.balanced_accuracy, m.accuracy) == (1.0, 1.0, 1.0, 0.5, 1.0)


def test_classification_metrics_rejects_bad_input() -> None:
    with pytest.raises(MetricsError, match="2 labels but 1 verdicts"):
        classification_metrics([0, 1], ["defect"])
    with pytest.raises(MetricsError, match="verdict must be one of"):
        classification_metrics([1], ["yes"])
    with pytest.raises(MetricsError, match="labels must be 0 or 1"):
        classification_metrics([2], ["defect"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes many ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_undefined_and_invalid() -> None:
    assert auroc([0.1, 0.2], [1, 1]) is None
    with pytest.raises(MetricsError, match="NaN"):
        auroc([0.1, float("nan")], [0, 1])


def test_pixel_auroc_equals_sklearn_on_concatenated_pixels() -> None:
    rng = np.random.default_rng(5)
    maps = [rng.random((6, 7)).astype(np.float32) for _ in range(3)]
    masks = [rng.random((6, 7)) > 0.8 for _ in range(3)]
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(MetricsError, match="shape"):
        pixel_auroc([np.zeros((2, 2))], [np.zeros((3, 3))])


def _brute_force_aupro(maps, masks, limit=0.3) -> float:
    """Threshold by threshold: PRO averaged over 8-connected regions, FPR over all defect-free pixels."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, count + 1)]
    n_normal = sum(int((~m).sum()) for m in masks)
    points = [(0.0, 0.0)]
    for t in sorted({float(v) for m in maps for v in m.ravel()}, reverse=True):
        hits = [m >= t for m in maps]
        pro = np.mean([(hits[i] & region).sum() / region.sum() for i, region in regions])
        fpr = sum(int((h & ~m).sum()) for h, m in zip(hits, masks, strict=True)) / n_normal
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 >= limit:
            break
        if x1 > limit:  # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_aupro_hand_computed() -> None:
    # two 1-pixel regions (not touching); curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1): area to .3 is .15 → .5
    amap = np.array([[0.9, 0.8, 0.2, 0.1]])
    mask = np.array([[1, 0, 1, 0]], bool)
    assert aupro([amap], [mask]) == pytest.approx(0.5)
    assert aupro([mask.astype(float)], [mask]) == pytest.approx(1.0)  # a perfect map


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(3):
        mask = np.zeros((7, 8), bool)
        mask[1:3, 1:3] = True  # one square region
        mask[4, 5] = mask[5, 6] = True  # diagonal neighbours: ONE region under 8-connectivity
        if rng.random() < 0.5:
            mask[6, 0] = True
        masks.append(mask)
        maps.append(np.round(rng.random((7, 8)) + 0.6 * mask, 2))  # rounded: ties between pixels
    masks.append(np.zeros((7, 8), bool))  # a defect-free image only adds normal pixels
    maps.append(np.round(rng.random((7, 8)), 2))
    assert aupro(maps, masks) == pytest.approx(_brute_force_aupro(maps, masks), abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(_brute_force_aupro(maps, masks, 1.0), abs=1e-12)


def test_aupro_without_regions_is_none() -> None:
    assert aupro([np.zeros((3, 3))], [np.zeros((3, 3), bool)]) is None
