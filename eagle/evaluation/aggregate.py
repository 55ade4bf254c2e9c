"""Evaluation records (one run folder or several shards) → the report dictionary: metrics and run facts.

:func:`build_report` reads each run's ``run.json`` and ``records.jsonl``, checks that runs may be merged,
and computes per data set, per class and aggregated metrics (``metrics``) plus run facts (``meta``:
completeness, notes, errors, mean timings). Rendering it is :mod:`eagle.evaluation.render` (Markdown, CSV),
:mod:`eagle.evaluation.plots` (PNG) and :mod:`eagle.evaluation.report` (writes the report folder).

Aggregation, per data set (``metrics[<data set>]``), for the expert and every setting:

* ``classes`` — per class: Accuracy, Precision, Recall, F1, balanced accuracy (anomalous = positive).
* ``mean`` — the unweighted mean over classes of each per-class value: **the paper's definitions**. Its
  reference summary (per class: accuracy = (normal accuracy + anomalous accuracy) / 2, P/R/F1; then the mean
  over classes) produced the published Tables 1, 3 and 4, so the paper's "Accuracy" is ``mean`` →
  ``balanced_accuracy`` and its Precision/Recall/F1 are ``mean`` → ``precision``/``recall``/``f1``.
* ``pooled`` — the same metrics from one confusion matrix over all test images of the data set (not the paper's
  definition; MMAD's own per-data-set table pools like this).

Unknown answers (parsed to neither yes nor no) follow one of two rules (:mod:`eagle.evaluation.metrics`):
``drop`` (the paper's reference summary; the default) or ``wrong`` (ours). Both are computed:
``rules[<rule>]`` holds ``classes`` (per class, per setting), ``pooled`` and ``mean`` (per setting) under each,
and the ``classes``/``pooled``/``mean`` blocks above use the rule chosen with ``build_report(unparsed=…)``
(``meta["unparsed"]``). The expert's own decisions are never unknown, so both rules give the same expert metrics.

MMAD adds ``mmad_table``: per setting and rule, MMAD's own per-question-type table
(:func:`eagle.evaluation.mmad_table.mmad_accuracy_table`: per MMAD data set, pooled over its classes), from the
detection answers and, with ``--mmad-questions all``, the other turns' records; and ``meta`` carries each class's
bank source (``bank_sources``, ``bank_from_templates``) and ``mmad_questions``.

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

from eagle.evaluation.metrics import (
    PAPER_UNPARSED_RULE,
    UNPARSED_RULES,
    aupro,
    auroc,
    classification_metrics,
    pixel_auroc,
)
from eagle.evaluation.mmad_table import MmadAnswer, mmad_accuracy_table
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
    _merged_bank_sources(dataset, runs)


def _merged_bank_sources(dataset: str, runs: list[tuple[Path, dict]]) -> dict[str, dict]:
    """Per class, where its bank came from (MMAD's ``run.json`` ``bank_sources``); runs must agree per class."""
    merged: dict[str, tuple[Path, dict]] = {}
    for directory, run in runs:
        for name, source in (run.get("bank_sources") or {}).items():
            if name in merged:
                first_dir, first = merged[name]
                if (first.get("source"), first.get("path")) != (source.get("source"), source.get("path")):
                    raise ReportError(
                        f"cannot merge {dataset} runs {first_dir} and {directory}: class {name} has banks from "
                        f"{first.get('path')} and {source.get('path')}"
                    )
            else:
                merged[name] = (directory, source)
    return {name: merged[name][1] for name in sorted(merged)}


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
    """Unweighted mean over classes of each metric (the paper's definition); counts are summed."""
    if not items:
        return {}
    out: dict[str, Any] = {k: _mean([m[k] for m in items]) for k in CLASSIFICATION_KEYS}
    for k in ("n", "n_positive", "n_unknown", "n_scored", "tp", "fp", "tn", "fn"):
        out[k] = int(sum(m[k] for m in items))
    out["unparsed"] = items[0]["unparsed"]
    out["n_classes"] = len(items)
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
    experts: list[ExpertRecord], answers: dict[tuple[str, str], AnswerRecord], setting: str, unparsed: str
) -> dict | None:
    """Answer metrics of ``setting`` over the images of ``experts`` that have an answer for it."""
    pairs = [(r.label, answers[(r.key, setting)].verdict) for r in experts if (r.key, setting) in answers]
    if not pairs:
        return None
    labels, verdicts = zip(*pairs, strict=True)
    return classification_metrics(list(labels), list(verdicts), unparsed=unparsed).as_dict()


def _expert_metrics(experts: list[ExpertRecord], unparsed: str) -> dict:
    """The expert's own decisions (anomalous iff s ≥ τ) scored like answers; never unknown, so any rule."""
    verdicts = ["defect" if r.anomalous else "no_defect" for r in experts]
    return classification_metrics([r.label for r in experts], verdicts, unparsed=unparsed).as_dict()


def _class_facts(experts: list[ExpertRecord], unparsed: str) -> dict[str, Any]:
    labels = [r.label for r in experts]
    return {
        "n": len(experts),
        "n_anomalous": int(sum(labels)),
        "tau": float(np.median([r.tau for r in experts])),
        "s_max": float(np.median([r.s_max for r in experts])),
        "image_auroc": auroc([r.score for r in experts], labels),
        **_pixel_metrics(experts),
        "expert": _expert_metrics(experts, unparsed),
    }


def _answer_metrics(
    by_class: dict[str, list[ExpertRecord]],
    answers: dict[tuple[str, str], AnswerRecord],
    settings: list[str],
    unparsed: str,
) -> dict[str, Any]:
    """Per class, pooled and class-mean answer metrics of every setting under one unknown-answer rule."""
    classes: dict[str, dict] = {}
    for name, experts in by_class.items():
        per_setting = {s: _setting_metrics(experts, answers, s, unparsed) for s in settings}
        classes[name] = {s: m for s, m in per_setting.items() if m}
    everything = [r for name in by_class for r in by_class[name]]
    pooled = {s: m for s in settings if (m := _setting_metrics(everything, answers, s, unparsed))}
    mean = {
        s: _mean_metrics([c[s] for c in classes.values() if s in c])
        for s in settings
        if any(s in c for c in classes.values())
    }
    return {"classes": classes, "pooled": pooled, "mean": mean}


def mmad_answers(records: RecordSet, setting: str) -> list[MmadAnswer]:
    """The MMAD answers of ``setting``: the detection answers that carry their item's turn, and the other turns."""
    rows = [
        MmadAnswer(key, a.question_type, a.correct_letter, a.mllm_letter)
        for (key, name), a in sorted(records.answers.items())
        if name == setting and a.question_type is not None and key in records.experts
    ]
    rows += [
        MmadAnswer(key, q.question_type, q.correct_letter, q.mllm_letter)
        for (key, name, _), q in sorted(records.questions.items())
        if name == setting and key in records.experts
    ]
    return rows


def _mmad_tables(records: RecordSet, settings: list[str]) -> dict[str, dict[str, dict]]:
    """Per setting with MMAD answers, MMAD's per-type table under each rule for unparseable answers."""
    tables = {}
    for setting in settings:
        rows = mmad_answers(records, setting)
        if rows:
            tables[setting] = {rule: mmad_accuracy_table(rows, unparsed=rule) for rule in UNPARSED_RULES}
    return tables


def _dataset_metrics(records: RecordSet, settings: list[str], unparsed: str) -> dict[str, Any]:
    by_class: dict[str, list[ExpertRecord]] = defaultdict(list)
    for key in sorted(records.experts):
        record = records.experts[key]
        by_class[record.class_name].append(record)
    by_class = {name: by_class[name] for name in sorted(by_class)}
    rules = {rule: _answer_metrics(by_class, records.answers, settings, rule) for rule in UNPARSED_RULES}
    chosen = rules[unparsed]
    classes = {
        name: {**_class_facts(group, unparsed), "settings": chosen["classes"][name]} for name, group in by_class.items()
    }
    experts = [records.experts[k] for k in sorted(records.experts)]
    pooled = {"expert": _expert_metrics(experts, unparsed) if experts else {}, "settings": chosen["pooled"]}
    mean: dict[str, Any] = {
        "image_auroc": _mean([c["image_auroc"] for c in classes.values()]),
        "pixel_auroc": _mean([c["pixel_auroc"] for c in classes.values()]),
        "aupro": _mean([c["aupro"] for c in classes.values()]),
        "expert": _mean_metrics([c["expert"] for c in classes.values()]),
        "settings": chosen["mean"],
    }
    out = {"classes": classes, "pooled": pooled, "mean": mean, "rules": rules}
    mmad = _mmad_tables(records, settings)
    if mmad:
        out["mmad_table"] = mmad
    return out


def _timing_summary(records: RecordSet) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for record in records.experts.values():
        for key, value in record.timings_ms.items():
            sums[key].append(value)
    for record in records.answers.values():
        for key, value in record.timings_ms.items():
            sums[f"{record.setting}:{key}"].append(value)
    return {k: float(np.mean(v)) for k, v in sorted(sums.items())}


def build_report(run_dirs: Sequence[Path], *, unparsed: str = PAPER_UNPARSED_RULE) -> dict[str, Any]:
    """Compute the report of one run folder or several (shards, or runs on different data sets).

    Records of the same data set are merged (the last record per image and setting wins); their runs must
    share the expert configuration, ``--limit``, pixel size and model.

    Args:
        run_dirs: output folders of ``eagle eval``.
        unparsed: the rule for unknown answers in the ``classes``/``pooled``/``mean`` blocks (and so in the
            paper tables): ``drop`` (the paper's, default) or ``wrong`` (ours); ``rules`` carries both.

    Raises:
        ReportError: a folder is not a run folder, runs of one data set are incompatible, or ``unparsed`` is
            not a rule.
    """
    if unparsed not in UNPARSED_RULES:
        raise ReportError(f"unknown rule for unparseable answers {unparsed!r}; use one of {', '.join(UNPARSED_RULES)}")
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
        metrics[dataset] = _dataset_metrics(records, settings, unparsed)
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
            "bank_sources": (sources := _merged_bank_sources(dataset, runs)),
            "bank_from_templates": any(s.get("source") == "templates" for s in sources.values()),
            "mmad_questions": "all"
            if any(run.get("mmad_questions") == "all" for _, run in runs)
            else next((run.get("mmad_questions") for _, run in runs if run.get("mmad_questions")), None),
        }
    return {
        "metrics": metrics,
        "meta": {
            "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "unparsed": unparsed,
            "datasets": meta_sets,
        },
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
