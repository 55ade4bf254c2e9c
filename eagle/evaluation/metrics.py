"""Evaluation metrics: yes/no answer quality and the expert's score quality.

Answers: Accuracy, Precision, Recall, F1, balanced accuracy. Expert: image AUROC, pixel AUROC, AUPRO.
The answer metrics are computed from the confusion counts with the formulas of the paper's reference summary
(every empty denominator gives 0); scikit-learn computes the ROC areas. This module adds the two rules for
``unknown`` answers, input checks with one-line errors, and AUPRO.

Conventions:

* Positive class = anomalous (label 1; verdict ``defect``).
* An ``unknown`` answer (the model said neither yes nor no) is handled by one of two rules
  (:data:`UNPARSED_RULES`), both always available:

  - ``drop`` (the paper's reference summary): the answer is left out of the counts; ``n_unknown`` of the
    ``n`` answers are dropped and the metrics cover the ``n_scored`` others.
  - ``wrong`` (ours): the answer counts as wrong: on an anomalous image a false negative, on a normal image a
    false positive. Nothing is dropped (dropping rewards a model for refusing hard cases) and nothing guessed.

* Accuracy = (TP + TN) / scored; Precision = TP / (TP + FP); Recall = TP / (TP + FN);
  F1 = 2·P·R / (P + R); balanced accuracy = (accuracy on normal images + accuracy on anomalous images) / 2.
  Any empty denominator gives 0, and so does the accuracy of an image class (normal or anomalous) with no
  scored image: a set with anomalous images only has balanced accuracy = its recall / 2. These are the
  reference summary's choices (it sets every undefined ratio to 0), kept so that class means match its.
* AUROC is scikit-learn's ``roc_auc_score``; ``None`` (not an exception) when only one class is present.
* AUPRO (Bergmann et al., MVTec AD): for every threshold, PRO = mean over all ground-truth regions
  (8-connected components of every mask) of the share of the region's pixels at or above the threshold;
  FPR = share of all defect-free pixels at or above it. The PRO-over-FPR curve from (0, 0) is integrated up
  to FPR 0.3 (interpolated at 0.3) and divided by 0.3, so a perfect map scores 1.

Example:
    >>> m = classification_metrics([1, 1, 0, 0], ["defect", "unknown", "no_defect", "defect"])
    >>> m.accuracy, m.tp, m.fn, m.fp, m.n_unknown
    (0.5, 1, 1, 1, 1)
    >>> d = classification_metrics([1, 1, 0, 0], ["defect", "unknown", "no_defect", "defect"], unparsed="drop")
    >>> round(d.accuracy, 4), d.tp, d.fn, d.fp, d.n_scored
    (0.6667, 1, 0, 1, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

from eagle.evaluation.mmad_table import UNPARSED_RULES
from eagle.records import VERDICTS

PAPER_UNPARSED_RULE = "drop"
AUPRO_FPR_LIMIT = 0.3


class MetricsError(ValueError):
    """Inputs to a metric do not fit together (lengths, shapes, label values)."""


@dataclass(frozen=True)
class ClassificationMetrics:
    """Yes/no answer quality on a set of images (anomalous = positive), under one rule for unknown answers.

    Attributes:
        n: answers given (scored or not).
        n_positive: scored answers on anomalous images (``tp + fn``).
        n_unknown: answers that parsed to neither yes nor no (dropped under ``drop``, wrong under ``wrong``).
        n_scored: answers in the counts (``n - n_unknown`` under ``drop``, ``n`` under ``wrong``).
        unparsed: the rule, ``drop`` or ``wrong``.
    """

    n: int
    n_positive: int
    n_unknown: int
    n_scored: int
    unparsed: str
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    balanced_accuracy: float

    def as_dict(self) -> dict:
        """Plain dict (JSON/CSV friendly)."""
        return asdict(self)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def classification_metrics(
    labels: Sequence[int], verdicts: Sequence[str], *, unparsed: str = "wrong"
) -> ClassificationMetrics:
    """Accuracy, precision, recall, F1 and balanced accuracy of verdicts against labels.

    Args:
        labels: 1 anomalous, 0 normal.
        verdicts: ``defect``, ``no_defect`` or ``unknown`` per image.
        unparsed: ``wrong`` (an unknown answer is a miss / a false alarm) or ``drop`` (left out of the counts).

    Raises:
        MetricsError: lengths differ, a label is not 0/1, a verdict is not one of :data:`VERDICTS`, or the rule
            is not one of :data:`UNPARSED_RULES`.
    """
    if unparsed not in UNPARSED_RULES:
        raise MetricsError(f"unparsed must be one of {UNPARSED_RULES}, got {unparsed!r}")
    if len(labels) != len(verdicts):
        raise MetricsError(f"{len(labels)} labels but {len(verdicts)} verdicts")
    for label, verdict in zip(labels, verdicts, strict=True):
        if label not in (0, 1):
            raise MetricsError(f"labels must be 0 or 1, got {label!r}")
        if verdict not in VERDICTS:
            raise MetricsError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    n_unknown = 0
    for label, verdict in zip(labels, verdicts, strict=True):
        if verdict == "unknown":
            n_unknown += 1
            if unparsed == "drop":
                continue
            predicted = 1 - label  # wrong: the opposite of the truth (never guessed)
        else:
            predicted = int(verdict == "defect")
        counts[("t" if predicted == label else "f") + ("p" if predicted else "n")] += 1
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return ClassificationMetrics(
        n=len(labels),
        n_positive=tp + fn,
        n_unknown=n_unknown,
        n_scored=tp + fp + tn + fn,
        unparsed=unparsed,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=_ratio(tp + tn, tp + fp + tn + fn),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        balanced_accuracy=(_ratio(tn, tn + fp) + recall) / 2,
    )


def _check_binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise MetricsError(f"{scores.size} scores but {labels.size} labels")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise MetricsError("labels must be 0/1 (or booleans)")
    if not np.isfinite(scores).all():
        raise MetricsError("scores contain NaN or infinity")
    return scores, labels.astype(bool)


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float | None:
    """Area under the ROC curve (anomalous = positive, higher score = more anomalous; ``roc_auc_score``).

    Returns:
        The area, or ``None`` when all labels are equal (AUROC undefined).

    Example:
        >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    scores, labels = _check_binary(np.asarray(scores), np.asarray(labels))
    if labels.all() or not labels.any():
        return None
    return float(skm.roc_auc_score(labels, scores))


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float | None:
    """AUROC over all pixels of all images (``maps[i]`` and ``masks[i]`` of the same shape)."""
    _check_pairs(maps, masks)
    if not maps:
        return None
    return auroc(np.concatenate([m.ravel() for m in maps]), np.concatenate([k.ravel() > 0 for k in masks]))


def _check_pairs(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if len(maps) != len(masks):
        raise MetricsError(f"{len(maps)} maps but {len(masks)} masks")
    for i, (amap, mask) in enumerate(zip(maps, masks, strict=True)):
        if amap.shape != mask.shape:
            raise MetricsError(f"map {i} has shape {amap.shape} but its mask {mask.shape}")


def pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, PRO) at every distinct map value, descending, starting at (0, 0).

    Returns:
        ``None`` when there is no defect region or no defect-free pixel.
    """
    _check_pairs(maps, masks)
    structure = np.ones((3, 3), dtype=bool)
    values, pro_weights, normal = [], [], []
    n_regions = 0
    for amap, mask in zip(maps, masks, strict=True):
        defect = np.asarray(mask) > 0
        regions, count = ndimage.label(defect, structure=structure)
        sizes = np.bincount(regions.ravel(), minlength=count + 1).astype(np.float64)
        weight = np.zeros_like(sizes)
        weight[1:] = 1.0 / sizes[1:]
        values.append(np.asarray(amap, dtype=np.float64).ravel())
        pro_weights.append(weight[regions.ravel()])
        normal.append(~defect.ravel())
        n_regions += count
    if not values:
        return None
    scores, pro_w, is_normal = np.concatenate(values), np.concatenate(pro_weights), np.concatenate(normal)
    n_normal = int(is_normal.sum())
    if n_regions == 0 or n_normal == 0:
        return None
    if not np.isfinite(scores).all():
        raise MetricsError("anomaly maps contain NaN or infinity")
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    fpr = np.cumsum(is_normal[order], dtype=np.int64)[last_of_tie] / n_normal
    pro = np.cumsum(pro_w[order])[last_of_tie] / n_regions
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def integrate_until(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` for ``x`` in ``[x[0], x_max]``, interpolating ``y`` at ``x_max``.

    ``x`` must be non-decreasing (a ROC/PRO curve).
    """
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max and inside.sum() < x.size:
        nxt = int(np.argmax(~inside))
        x0, x1, y0, y1 = x[nxt - 1], x[nxt], y[nxt - 1], y[nxt]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_at]
    return float(np.trapezoid(ys, xs))


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = AUPRO_FPR_LIMIT) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit`` (see the module docstring).

    Returns:
        A value in [0, 1], or ``None`` without any defect region or defect-free pixel.
    """
    if not 0 < fpr_limit <= 1:
        raise MetricsError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = pro_curve(maps, masks)
    if curve is None:
        return None
    fpr, pro = curve
    return integrate_until(fpr, pro, fpr_limit) / fpr_limit
