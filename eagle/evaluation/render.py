"""The report dictionary (:func:`eagle.evaluation.aggregate.build_report`) as Markdown and CSV.

* :func:`render_markdown` — tables laid out like the paper's Table 1 (Accuracy, Precision, Recall, F1 per
  data set), Table 3 (prompt settings) and Table 4 (CAAS), with the published Qwen2.5-VL-7B numbers
  alongside, then per-class tables, completeness and notes.
* :func:`csv_rows` — ``per_class.csv`` rows (one per data set, class, setting; setting ``expert`` is the
  expert alone, with image AUROC, pixel AUROC and AUPRO) and ``summary.csv`` rows (per data set and setting:
  ``pooled`` and ``mean``); :func:`write_csv` writes them atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from eagle.evaluation.aggregate import DATASET_TITLES, EXPERT_ROW
from expert import atomic

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


def csv_rows(report: dict) -> tuple[list[dict], list[dict]]:
    """``(per_class rows, summary rows)`` of the report, one dict per CSV row."""
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


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` as CSV (columns in first-seen order) atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, text.getvalue())
