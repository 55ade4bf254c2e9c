"""Turn evaluation records (one run folder or several shards) into metrics, tables and plots.

Outputs written by :func:`write_report` into the report folder:

* ``report.json`` — everything: per data set, per class and aggregated metrics (``metrics``) plus run facts
  (``meta``: completeness, notes, errors, mean timings).
* ``per_class.csv`` — one row per (data set, class, setting); setting ``expert`` is the expert alone
  (anomalous iff s ≥ τ) and carries image AUROC, pixel AUROC and AUPRO.
* ``summary.csv`` — per (data set, setting): ``pooled`` (all test images together) and ``mean`` (of classes).
* ``report.md`` — tables laid out like the paper's Table 1 (Accuracy, Precision, Recall, F1 per data set),
  Table 3 (prompt settings) and Table 4 (CAAS), with the published Qwen2.5-VL-7B numbers alongside, then
  per-class tables.
* ``plots/`` — per class a histogram of the expert's scores (normal vs anomalous) with τ and s_max; per data
  set and setting a confusion matrix (rows: truth; columns: no defect, defect, unknown).

Aggregation: the paper tables use ``pooled`` metrics over all test images of a data set (as MMAD's summary
does); per-class metrics and their unweighted ``mean`` are reported too. Unknown answers count as wrong
(see :mod:`eagle.evaluation.metrics`).

Example:
    >>> report = build_report([Path("runs/shard0"), Path("runs/shard1")])  # doctest: +SKIP
    >>> write_report(report, Path("runs/merged"))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eagle.evaluation.metrics import aupro, auroc, classification_metrics, pixel_auroc
from eagle.evaluation.records import RECORDS_FILE, AnswerRecord, ExpertRecord, RecordSet, dump_json, read_records

log = logging.getLogger(__name__)

SETTING_ORDER: tuple[str, ...] = (
    "baseline",
    "visual",
    "textual",
    "full",
    "baseline+caas",
    "visual+caas",
    "textual+caas",
    "full+caas",
)
EXPERT_ROW = "expert"
DATASET_TITLES = {"mvtec": "MVTec-AD", "visa": "VisA", "mmad": "MMAD", "folder": "Folder"}
CLASSIFICATION_KEYS = ("accuracy", "precision", "recall", "f1", "balanced_accuracy")

#: Published numbers (%, Qwen2.5-VL-7B), paper Tables 1, 3 and 4, as printed.
PAPER_TABLE1 = {
    "mvtec": {"baseline": (85.9, 95.0, 83.9, 88.3), "full+caas": (94.6, 98.5, 95.3, 96.7)},
    "visa": {"baseline": (76.0, 89.2, 61.2, 69.4), "full+caas": (86.7, 95.1, 77.3, 83.6)},
}
PAPER_TABLE3 = {
    "mvtec": {"baseline": (85.9, 88.3), "visual": (75.3, 89.7), "textual": (82.4, 99.5), "full": (93.1, 96.2)},
    "visa": {"baseline": (76.1, 69.4), "visual": (68.3, 76.5), "textual": (65.4, 77.3), "full": (88.3, 85.7)},
}
PAPER_TABLE4 = {
    "mvtec": {"full": (93.1, 96.2), "full+caas": (94.6, 96.7)},
    "visa": {"full": (88.3, 85.7), "full+caas": (86.7, 83.6)},
}
PAPER_PATCHCORE_IMAGE_AUROC = {"mvtec": 99.2}
TABLE3_ROWS = {
    "baseline": "Baseline (no expert, 1-shot+ template)",
    "visual": "Expert (Visual only)",
    "textual": "Expert (Textual only)",
    "full": "Expert (Visual + Textual)",
}


class ReportError(ValueError):
    """Run folders cannot be reported or merged (not a run folder, or incompatible configurations)."""


# ---------------------------------------------------------------------------------------------- loading


def _load_run(directory: Path) -> tuple[dict, list]:
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
        run, records = _load_run(directory)
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


# ---------------------------------------------------------------------------------------------- writing


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _paper(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _model_label(meta: dict) -> str:
    return str(meta.get("model") or "MLLM")


def _table1(report: dict) -> list[str]:
    datasets = list(report["metrics"])
    head = "| Method | " + " | ".join(f"{DATASET_TITLES.get(d, d)} Acc | Prec | Rec | F1 | unknown" for d in datasets)
    lines = [
        "## Table 1 — Accuracy, Precision, Recall, F1 (%), all test images pooled, anomalous = positive",
        "",
        head + " |",
        "|" + "---|" * (1 + 5 * len(datasets)),
    ]

    def row(label: str, getter) -> str:
        cells = []
        for d in datasets:
            m = getter(d)
            cells += [_pct(m.get(k)) if m else "–" for k in ("accuracy", "precision", "recall", "f1")]
            cells.append(str(m["n_unknown"]) if m else "–")
        return f"| {label} | " + " | ".join(cells) + " |"

    lines.append(row("Expert alone (s ≥ τ)", lambda d: report["metrics"][d]["pooled"]["expert"]))
    settings = list(dict.fromkeys(s for d in datasets for s in report["meta"]["datasets"][d]["settings"]))
    for s in settings:
        model = _model_label(report["meta"]["datasets"][datasets[0]])
        lines.append(row(f"{model} · {s}", lambda d, s=s: report["metrics"][d]["pooled"]["settings"].get(s)))
    for key, label in (("baseline", "Paper: Qwen2.5-VL-7B (1-shot+)"), ("full+caas", "Paper: Qwen2.5-VL-7B w/ EAGLE")):
        cells = []
        for d in datasets:
            values = PAPER_TABLE1.get(d, {}).get(key)
            cells += [_paper(v) for v in values] + ["–"] if values else ["–"] * 5
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _ablation(report: dict, title: str, rows: dict[str, str], paper: dict) -> list[str]:
    datasets = list(report["metrics"])
    head = (
        "| Setting | "
        + " | ".join(f"{DATASET_TITLES.get(d, d)} Acc | F1 | paper Acc | paper F1" for d in datasets)
        + " |"
    )
    lines = [title, "", head, "|" + "---|" * (1 + 4 * len(datasets))]
    for key, label in rows.items():
        cells, any_value = [], False
        for d in datasets:
            m = report["metrics"][d]["pooled"]["settings"].get(key)
            any_value |= m is not None
            published = paper.get(d, {}).get(key)
            cells += [_pct(m["accuracy"]) if m else "–", _pct(m["f1"]) if m else "–"]
            cells += [_paper(v) for v in published] if published else ["–", "–"]
        if any_value:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 4 else []


def _class_table(dataset: str, data: dict, settings: list[str]) -> list[str]:
    head = (
        "| Class | n | anomalous | τ | image AUROC | pixel AUROC | AUPRO | expert Acc | "
        + " | ".join(f"{s} Acc | {s} bal.Acc" for s in settings)
        + " |"
    )
    lines = [f"### {DATASET_TITLES.get(dataset, dataset)} per class", "", head, "|" + "---|" * (8 + 2 * len(settings))]

    def row(name: str, c: dict, n: str, n_anom: str, tau: str) -> str:
        cells = [
            name,
            n,
            n_anom,
            tau,
            _pct(c["image_auroc"]),
            _pct(c["pixel_auroc"]),
            _pct(c["aupro"]),
            _pct(c["expert"].get("accuracy")),
        ]
        for s in settings:
            m = c["settings"].get(s)
            cells += [_pct(m["accuracy"]), _pct(m["balanced_accuracy"])] if m else ["–", "–"]
        return "| " + " | ".join(cells) + " |"

    for name, c in data["classes"].items():
        lines.append(row(name, c, str(c["n"]), str(c["n_anomalous"]), f"{c['tau']:.4g}"))
    mean = data["mean"]
    lines.append(row("**mean**", mean, "", "", ""))
    return lines


def render_markdown(report: dict) -> str:
    """The Markdown report: paper-style Tables 1/3/4, per-class tables, completeness and notes."""
    metas = report["meta"]["datasets"]
    lines = ["# EAGLE evaluation report", "", f"Generated {report['meta']['generated']}.", ""]
    for dataset, meta in metas.items():
        title = DATASET_TITLES.get(dataset, dataset)
        state = "complete"
        if not meta["complete"]:
            missing = f"; missing shards {', '.join(meta['missing_shards'])}" if meta["missing_shards"] else ""
            state = f"INCOMPLETE ({meta['n_images']} of {meta['planned']} images{missing})"
        model = f"model `{meta['model']}`" if meta["model"] else "no MLLM"
        lines.append(
            f"- **{title}**: {state}; {model}; pixel metrics at "
            f"{'mask resolution' if meta['pixel_size'] is None else meta['pixel_size']}."
        )
        if not meta["mllm_enabled"]:
            lines.append(f"- **{title}: MLLM disabled — only the expert's metrics were computed.**")
        if meta["errors"]:
            lines.append(f"- {title}: {len(meta['errors'])} images could not be evaluated (see report.json).")
        lines += [f"- {title}: {note}" for note in meta["notes"]]
    lines.append("")
    lines += _table1(report) + [""]
    lines += _ablation(report, "## Table 3 — prompt settings (%, pooled)", TABLE3_ROWS, PAPER_TABLE3) + [""]
    lines += _ablation(
        report,
        "## Table 4 — CAAS (%, pooled)",
        {"full": "Visual + Textual, CAAS off", "full+caas": "Visual + Textual + CAAS (visual tokens)"},
        PAPER_TABLE4,
    ) + [""]
    lines.append("## Expert (PatchCore + DBT)")
    lines.append("")
    lines.append("| Data set | image AUROC | pixel AUROC | AUPRO | paper image AUROC |")
    lines.append("|---|---|---|---|---|")
    for dataset, data in report["metrics"].items():
        mean = data["mean"]
        lines.append(
            f"| {DATASET_TITLES.get(dataset, dataset)} | {_pct(mean['image_auroc'])} | {_pct(mean['pixel_auroc'])} | "
            f"{_pct(mean['aupro'])} | {_paper(PAPER_PATCHCORE_IMAGE_AUROC.get(dataset))} |"
        )
    lines.append("")
    for dataset, data in report["metrics"].items():
        lines += _class_table(dataset, data, metas[dataset]["settings"]) + [""]
    lines.append(
        "Unknown answers count as wrong. Paper numbers: Qwen2.5-VL-7B, as printed (Table 3's textual-only "
        "F1 of 99.5 is the paper's own figure)."
    )
    return "\n".join(lines) + "\n"


def _csv_rows(report: dict) -> tuple[list[dict], list[dict]]:
    per_class, summary = [], []
    for dataset, data in report["metrics"].items():
        for name, c in data["classes"].items():
            base = {"dataset": dataset, "class": name}
            expert_extra = {k: c[k] for k in ("image_auroc", "pixel_auroc", "aupro", "tau", "s_max")}
            per_class.append({**base, "setting": EXPERT_ROW, **c["expert"], **expert_extra})
            for setting, m in c["settings"].items():
                per_class.append({**base, "setting": setting, **m})
        for aggregate in ("pooled", "mean"):
            block = data[aggregate]
            extra = {k: block.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")} if aggregate == "mean" else {}
            base = {"dataset": dataset, "aggregate": aggregate}
            summary.append({**base, "setting": EXPERT_ROW, **block["expert"], **extra})
            for setting, m in block["settings"].items():
                summary.append({**base, "setting": setting, **m})
    return per_class, summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


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


def write_plots(report: dict, run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """Score histograms with τ per class and confusion matrices per data set and setting (PNG)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sets: dict[str, RecordSet] = defaultdict(RecordSet)
    for directory in run_dirs:
        run, records = _load_run(Path(directory))
        sets[run["identity"]["dataset"]].add(records)
    for dataset, records in sets.items():
        by_class: dict[str, list[ExpertRecord]] = defaultdict(list)
        for record in records.experts.values():
            by_class[record.class_name].append(record)
        for name, experts in sorted(by_class.items()):
            fig = Figure(figsize=(6, 3.5))
            ax = fig.subplots()
            scores = np.array([r.score for r in experts])
            bins = np.linspace(scores.min(), scores.max(), 31) if np.ptp(scores) > 0 else 10
            for label, colour, text in ((0, "tab:green", "normal"), (1, "tab:red", "anomalous")):
                chosen = [r.score for r in experts if r.label == label]
                if chosen:
                    ax.hist(chosen, bins=bins, alpha=0.6, color=colour, label=f"{text} ({len(chosen)})")
            c = report["metrics"][dataset]["classes"][name]
            ax.axvline(c["tau"], color="black", linestyle="-", label=f"τ = {c['tau']:.3g}")
            ax.axvline(c["s_max"], color="black", linestyle="--", label=f"s_max = {c['s_max']:.3g}")
            ax.set(title=f"{DATASET_TITLES.get(dataset, dataset)} · {name}", xlabel="expert score", ylabel="images")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = plots / f"scores_{_safe(dataset)}_{_safe(name)}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        for setting in [EXPERT_ROW, *report["meta"]["datasets"][dataset]["settings"]]:
            matrix = confusion_counts(records, setting)
            if matrix.sum() == 0:
                continue
            fig = Figure(figsize=(4.5, 3.2))
            ax = fig.subplots()
            ax.imshow(matrix, cmap="Blues")
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, str(value), ha="center", va="center", color="black")
            ax.set_xticks([0, 1, 2], ["no defect", "defect", "unknown"])
            ax.set_yticks([0, 1], ["normal", "anomalous"])
            ax.set(title=f"{DATASET_TITLES.get(dataset, dataset)} · {setting}", xlabel="answer", ylabel="truth")
            fig.tight_layout()
            path = plots / f"confusion_{_safe(dataset)}_{_safe(setting)}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
    return written


def write_report(report: dict, out: Path, *, plots: bool = True) -> list[Path]:
    """Write report.json, per_class.csv, summary.csv, report.md and (optionally) plots into ``out``.

    Returns:
        The files written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dump_json(out / "report.json", report)
    per_class, summary = _csv_rows(report)
    _write_csv(out / "per_class.csv", per_class)
    _write_csv(out / "summary.csv", summary)
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    written = [out / "report.json", out / "per_class.csv", out / "summary.csv", out / "report.md"]
    if plots:
        run_dirs = [Path(d) for meta in report["meta"]["datasets"].values() for d in meta["runs"]]
        written += write_plots(report, run_dirs, out)
    return written
