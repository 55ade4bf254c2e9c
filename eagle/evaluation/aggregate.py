"""Evaluation records (one run folder or several shards) → the report dictionary: metrics and run facts.

:func:`build_report` reads each run's ``run.json`` and ``records.jsonl``, checks that runs may be merged,
and computes per data set, per class and aggregated metrics (``metrics``) plus run facts (``meta``:
completeness, notes, errors, mean timings). Rendering it is :mod:`eagle.evaluation.render` (Markdown, CSV),
:mod:`eagle.evaluation.plots` (PNG) and :mod:`eagle.evaluation.report` (writes the report folder).

Aggregation: the paper tables use ``pooled`` metrics over all test images of a data set (as MMAD's summary
does); per-class metrics and their unweighted ``mean`` are reported too. Unknown answers count as wrong
(see :mod:`eagle.evaluation.metrics`).

Example:
    >>> report = build_report([Path("runs/shard0"), Path("runs/shard1")])  # doctest: +SKIP
    >>> sorted(report)  # doctest: +SKIP
    ['meta', 'metrics']
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eagle.evaluation.metrics import aupro, auroc, classification_metrics, pixel_auroc
from eagle.evaluation.records import RECORDS_FILE, AnswerRecord, ExpertRecord, RecordSet, read_records
from eagle.settings import PROMPT_SETTINGS

log = logging.getLogger(__name__)

# Table rows in the paper's order (Table 3: no hints → both hints), each setting then its CAAS variant.
SETTING_ORDER: tuple[str, ...] = (*PROMPT_SETTINGS, *(f"{setting}+caas" for setting in PROMPT_SETTINGS))
EXPERT_ROW = "expert"
DATASET_TITLES = {"mvtec": "MVTec-AD", "visa": "VisA", "mmad": "MMAD", "folder": "Folder"}
CLASSIFICATION_KEYS = ("accuracy", "precision", "recall", "f1", "balanced_accuracy")


class ReportError(ValueError):
    """Run folders cannot be reported or merged (not a run folder, or incompatible configurations)."""


# ---------------------------------------------------------------------------------------------- loading


def load_run(directory: Path) -> tuple[dict, list]:
    """``(run.json, records)`` of one run folder, with map files resolved against the folder."""
    run_file = directory / "run.json"
    if not run_file.is_file():
        raise ReportError(f"{directory} is not an evaluation output folder (no run.json)")
    run = json.loads(run_file.read_text(encoding="utf-8"))
    records = read_records(directory / RECORDS_FILE)
    resolved = []
    for record in records:
        if isinstance(record, ExpertRecord) and record.map_file:
            record = record.model_copy(update={"map_file": str((directory / record.map_file).resolve())})
        resolved.append(record)
    return run, resolved


def _check_compatible(dataset: str, runs: list[tuple[Path, dict]]) -> None:
    first_dir, first = runs[0]
    for directory, run in runs[1:]:
        for key in ("expert", "limit", "pixel_size", "mllm"):
            a, b = first["identity"].get(key), run["identity"].get(key)
            if key == "mllm" and (a is None or b is None):
                continue
            if a != b:
                raise ReportError(
                    f"cannot merge {dataset} runs {first_dir} and {directory}: different {key} ({a!r} vs {b!r})"
                )


def _coverage(runs: list[tuple[Path, dict]]) -> dict[str, Any]:
    """Which shards are present, which are missing, and how many images the present runs planned."""
    shards: dict[str, dict[str, int]] = {}
    for _, run in runs:
        known = shards.setdefault(run["identity"]["shard"], {})
        for name, count in run.get("planned", {}).items():
            known[name] = max(known.get(name, 0), int(count))
    missing: list[str] = []
    if "0/1" not in shards:  # a whole run covers everything by itself
        for n in sorted({int(s.split("/")[1]) for s in shards}):
            present = {int(s.split("/")[0]) for s in shards if int(s.split("/")[1]) == n}
            missing += [f"{i}/{n}" for i in range(n) if i not in present]
    planned = sum(shards["0/1"].values()) if "0/1" in shards else sum(sum(v.values()) for v in shards.values())
    return {"shards": sorted(shards), "missing_shards": missing, "planned": planned}


# ---------------------------------------------------------------------------------------------- metrics


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _mean_metrics(items: Sequence[dict]) -> dict:
    if not items:
        return {}
    out = {k: _mean([m[k] for m in items]) for k in CLASSIFICATION_KEYS}
    for k in ("n", "n_positive", "n_unknown", "tp", "fp", "tn", "fn"):
        out[k] = int(sum(m[k] for m in items))
    return out


def _pixel_metrics(experts: list[ExpertRecord]) -> dict[str, Any]:
    with_maps = [r for r in experts if r.map_file]
    if not any(r.label for r in with_maps):
        return {"pixel_auroc": None, "aupro": None, "n_pixel_images": 0}
    maps, masks = [], []
    for record in with_maps:
        try:
            with np.load(record.map_file, allow_pickle=False) as data:
                maps.append(data["map"].astype(np.float32))
                masks.append(data["mask"] > 0)
        except (OSError, KeyError, ValueError) as err:
            log.warning("pixel metrics skipped for %s: map file unreadable (%s)", record.class_name, err)
            return {"pixel_auroc": None, "aupro": None, "n_pixel_images": 0, "error": f"{record.map_file}: {err}"}
    return {"pixel_auroc": pixel_auroc(maps, masks), "aupro": aupro(maps, masks), "n_pixel_images": len(maps)}


def _setting_metrics(
    experts: list[ExpertRecord], answers: dict[tuple[str, str], AnswerRecord], setting: str
) -> dict | None:
    """Answer metrics of ``setting`` over the images of ``experts`` that have an answer for it."""
    pairs = [(r.label, answers[(r.key, setting)].verdict) for r in experts if (r.key, setting) in answers]
    if not pairs:
        return None
    labels, verdicts = zip(*pairs, strict=True)
    return classification_metrics(list(labels), list(verdicts)).as_dict()


def _class_metrics(experts: list[ExpertRecord], answers: dict[tuple[str, str], AnswerRecord], settings: list[str]):
    labels = [r.label for r in experts]
    scores = [r.score for r in experts]
    result: dict[str, Any] = {
        "n": len(experts),
        "n_anomalous": int(sum(labels)),
        "tau": float(np.median([r.tau for r in experts])),
        "s_max": float(np.median([r.s_max for r in experts])),
        "image_auroc": auroc(scores, labels),
        **_pixel_metrics(experts),
        "expert": classification_metrics(labels, ["defect" if r.anomalous else "no_defect" for r in experts]).as_dict(),
        "settings": {},
    }
    for setting in settings:
        metrics = _setting_metrics(experts, answers, setting)
        if metrics:
            result["settings"][setting] = metrics
    return result


def _dataset_metrics(records: RecordSet, settings: list[str]) -> dict[str, Any]:
    by_class: dict[str, list[ExpertRecord]] = defaultdict(list)
    for key in sorted(records.experts):
        record = records.experts[key]
        by_class[record.class_name].append(record)
    classes = {name: _class_metrics(by_class[name], records.answers, settings) for name in sorted(by_class)}
    experts = [records.experts[k] for k in sorted(records.experts)]
    pooled: dict[str, Any] = {
        "expert": classification_metrics(
            [r.label for r in experts], ["defect" if r.anomalous else "no_defect" for r in experts]
        ).as_dict()
        if experts
        else {},
        "settings": {},
    }
    for setting in settings:
        metrics = _setting_metrics(experts, records.answers, setting)
        if metrics:
            pooled["settings"][setting] = metrics
    mean: dict[str, Any] = {
        "image_auroc": _mean([c["image_auroc"] for c in classes.values()]),
        "pixel_auroc": _mean([c["pixel_auroc"] for c in classes.values()]),
        "aupro": _mean([c["aupro"] for c in classes.values()]),
        "expert": _mean_metrics([c["expert"] for c in classes.values()]),
        "settings": {
            s: _mean_metrics([c["settings"][s] for c in classes.values() if s in c["settings"]])
            for s in settings
            if any(s in c["settings"] for c in classes.values())
        },
    }
    return {"classes": classes, "pooled": pooled, "mean": mean}


def _timing_summary(records: RecordSet) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for record in records.experts.values():
        for key, value in record.timings_ms.items():
            sums[key].append(value)
    for record in records.answers.values():
        for key, value in record.timings_ms.items():
            sums[f"{record.setting}:{key}"].append(value)
    return {k: float(np.mean(v)) for k, v in sorted(sums.items())}


def build_report(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """Compute the report of one run folder or several (shards, or runs on different data sets).

    Records of the same data set are merged (the last record per image and setting wins); their runs must
    share the expert configuration, ``--limit``, pixel size and model.

    Raises:
        ReportError: a folder is not a run folder, or runs of one data set are incompatible.
    """
    if not run_dirs:
        raise ReportError("no run folders given")
    grouped: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    record_sets: dict[str, RecordSet] = defaultdict(RecordSet)
    for directory in run_dirs:
        directory = Path(directory)
        run, records = load_run(directory)
        dataset = run["identity"]["dataset"]
        grouped[dataset].append((directory, run))
        record_sets[dataset].add(records)
    metrics, meta_sets = {}, {}
    for dataset, runs in sorted(grouped.items()):
        _check_compatible(dataset, runs)
        records = record_sets[dataset]
        requested = list(dict.fromkeys(s for _, run in runs for s in run.get("settings", [])))
        settings = sorted(requested, key=lambda s: SETTING_ORDER.index(s) if s in SETTING_ORDER else 99)
        mllm_enabled = any(run.get("mllm_enabled") for _, run in runs)
        coverage = _coverage(runs)
        n_done = len(records.experts)
        answers_done = {s: sum(1 for k in records.experts if (k, s) in records.answers) for s in settings}
        all_answered = all(v == n_done for v in answers_done.values())
        complete = not coverage["missing_shards"] and n_done >= coverage["planned"] and all_answered
        metrics[dataset] = _dataset_metrics(records, settings)
        meta_sets[dataset] = {
            "runs": [str(d) for d, _ in runs],
            "settings": settings,
            "mllm_enabled": mllm_enabled,
            "model": next((run.get("model") for _, run in runs if run.get("model")), None),
            "pixel_size": runs[0][1]["identity"].get("pixel_size"),
            "complete": complete,
            "n_images": n_done,
            "answers": answers_done,
            **coverage,
            "notes": list(dict.fromkeys(n for _, run in runs for n in run.get("notes", []))),
            "errors": [e.model_dump(mode="json") for e in records.errors.values()],
            "mean_timings_ms": _timing_summary(records),
        }
    return {
        "metrics": metrics,
        "meta": {"generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "datasets": meta_sets},
    }


# ---------------------------------------------------------------------------------------------- counts


def confusion_counts(records: RecordSet, setting: str) -> np.ndarray:
    """2×3 counts: rows truth (normal, anomalous); columns answer (no defect, defect, unknown).

    ``setting`` ``expert`` uses the expert's own decision (never unknown).
    """
    matrix = np.zeros((2, 3), dtype=np.int64)
    column = {"no_defect": 0, "defect": 1, "unknown": 2}
    for key, record in records.experts.items():
        if setting == EXPERT_ROW:
            verdict = "defect" if record.anomalous else "no_defect"
        elif (key, setting) in records.answers:
            verdict = records.answers[(key, setting)].verdict
        else:
            continue
        matrix[record.label, column[verdict]] += 1
    return matrix
