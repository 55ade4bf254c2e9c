"""The report dictionary (:func:`eagle.evaluation.aggregate.build_report`) as Markdown and CSV.

* :func:`render_markdown` — tables laid out like the paper's Table 1 (Accuracy, Precision, Recall, F1 per
  data set), Table 3 (prompt settings) and Table 4 (CAAS), with the published Qwen2.5-VL-7B numbers
  alongside, in the paper's definitions (per class: balanced accuracy, P, R, F1; then the mean over classes);
  then the same metrics pooled over all test images in a separately labelled table; then per-class tables
  (plain and balanced accuracy, with the class mean and pooled rows), completeness and notes. Unparseable
  answers follow the report's rule (``meta["unparsed"]``: dropped, the paper's, or counted wrong, ours); every
  row prints how many there were. On MMAD, also MMAD's own per-question-type table per setting
  (:mod:`eagle.evaluation.mmad_table`) and each class's bank source; when any bank was built from the templates
  mmad.json lists (``--bank-from-templates``), the report's heading says so.
* :func:`csv_rows` — ``per_class.csv`` rows (one per data set, class, setting; setting ``expert`` is the
  expert alone, with image AUROC, pixel AUROC and AUPRO) and ``summary.csv`` rows (per data set, aggregate
  ``pooled`` or ``mean`` (over classes), setting and rule for unparseable answers); :func:`write_csv` writes
  them atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from common import atomic
from eagle.evaluation.aggregate import DATASET_TITLES, EXPERT_ROW
from eagle.evaluation.metrics import PAPER_UNPARSED_RULE, UNPARSED_RULES

#: Published numbers (%, Qwen2.5-VL-7B), paper Tables 1, 3 and 4, as printed.
PAPER_TABLE1 = {
    "mvtec": {"baseline": (85.9, 95.0, 83.9, 88.3), "full+caas": (94.6, 98.5, 95.3, 96.7)},
    "visa": {"baseline": (76.0, 89.2, 61.2, 69.4), "full+caas": (86.7, 95.1, 77.3, 83.6)},
}
PAPER_TABLE3 = {
    "mvtec": {"baseline": (85.9, 88.3), "visual_all": (75.3, 89.7), "textual": (82.4, 99.5), "full": (93.1, 96.2)},
    "visa": {"baseline": (76.1, 69.4), "visual_all": (68.3, 76.5), "textual": (65.4, 77.3), "full": (88.3, 85.7)},
}
PAPER_TABLE4 = {
    "mvtec": {"full": (93.1, 96.2), "full+caas": (94.6, 96.7)},
    "visa": {"full": (88.3, 85.7), "full+caas": (86.7, 83.6)},
}
PAPER_PATCHCORE_IMAGE_AUROC = {"mvtec": 99.2}
TABLE3_ROWS = {
    "baseline": "Baseline (no expert, 1-shot+ template)",
    "visual_all": "Expert (Visual only): boxes on every image, as the paper ran it",
    "visual": "Expert (Visual only, boxes only when the expert says anomalous): ours, not in the paper",
    "textual": "Expert (Textual only)",
    "full": "Expert (Visual + Textual)",
}

#: The paper's metric definitions, as the headings of Tables 1, 3 and 4 state them.
PAPER_DEFINITION = (
    "the paper's definitions: Acc = balanced accuracy ((accuracy on normal images + accuracy on anomalous "
    "images) / 2) per class, averaged over classes; Prec, Rec, F1 (anomalous = positive) per class, averaged "
    "over classes"
)
POOLED_DEFINITION = (
    "NOT the paper's definition: one confusion matrix per data set over all its test images; Acc = share of "
    "the counted answers that are right; Prec, Rec, F1 (anomalous = positive) from the same matrix"
)
#: How each rule for unparseable answers is stated under a table, and the name of its count column.
RULE_TEXT = {
    "drop": "Answers that parse to neither yes nor no are dropped from the counts, as the paper's reference "
    "summary does (`--unparsed drop`); column *dropped* counts them.",
    "wrong": "Answers that parse to neither yes nor no count as wrong — a miss on an anomalous image, a false "
    "alarm on a normal one (`--unparsed wrong`, not the paper's rule); column *unparsed* counts them.",
}
COUNT_COLUMN = {"drop": "dropped", "wrong": "unparsed"}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _paper(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _model_label(meta: dict) -> str:
    return str(meta.get("model") or "MLLM")


def _rule(report: dict) -> str:
    rule = report["meta"].get("unparsed", PAPER_UNPARSED_RULE)
    return rule if rule in UNPARSED_RULES else PAPER_UNPARSED_RULE


def _count(m: dict | None) -> str:
    return str(m["n_unknown"]) if m else "–"


def _metric_table(report: dict, block: str, heading: str, *, paper_rows: bool) -> list[str]:
    """Acc, Prec, Rec, F1 and the unparseable count per data set, for the expert and every setting.

    ``block`` ``mean``: the paper's definitions (Acc = class-mean balanced accuracy); ``pooled``: pooled.
    """
    datasets = list(report["metrics"])
    rule = _rule(report)
    acc_key = "balanced_accuracy" if block == "mean" else "accuracy"
    head = "| Method | " + " | ".join(
        f"{DATASET_TITLES.get(d, d)} Acc | Prec | Rec | F1 | {COUNT_COLUMN[rule]}" for d in datasets
    )
    lines = [heading, "", RULE_TEXT[rule], "", head + " |", "|" + "---|" * (1 + 5 * len(datasets))]

    def row(label: str, getter) -> str:
        cells = []
        for d in datasets:
            m = getter(d)
            cells += [_pct(m.get(k)) if m else "–" for k in (acc_key, "precision", "recall", "f1")]
            cells.append(_count(m))
        return f"| {label} | " + " | ".join(cells) + " |"

    lines.append(row("Expert alone (s ≥ τ)", lambda d: report["metrics"][d][block]["expert"]))
    settings = list(dict.fromkeys(s for d in datasets for s in report["meta"]["datasets"][d]["settings"]))
    for s in settings:
        model = _model_label(report["meta"]["datasets"][datasets[0]])
        lines.append(row(f"{model} · {s}", lambda d, s=s: report["metrics"][d][block]["settings"].get(s)))
    if not paper_rows:
        return lines
    for key, label in (("baseline", "Paper: Qwen2.5-VL-7B (1-shot+)"), ("full+caas", "Paper: Qwen2.5-VL-7B w/ EAGLE")):
        cells = []
        for d in datasets:
            values = PAPER_TABLE1.get(d, {}).get(key)
            cells += [_paper(v) for v in values] + ["–"] if values else ["–"] * 5
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _table1(report: dict) -> list[str]:
    return _metric_table(
        report, "mean", f"## Table 1 — Accuracy, Precision, Recall, F1 (%), {PAPER_DEFINITION}", paper_rows=True
    )


def _pooled_table(report: dict) -> list[str]:
    return _metric_table(
        report, "pooled", f"## Pooled — Accuracy, Precision, Recall, F1 (%), {POOLED_DEFINITION}", paper_rows=False
    )


def _ablation(report: dict, title: str, rows: dict[str, str], paper: dict) -> list[str]:
    datasets = list(report["metrics"])
    rule = _rule(report)
    head = (
        "| Setting | "
        + " | ".join(
            f"{DATASET_TITLES.get(d, d)} Acc | F1 | {COUNT_COLUMN[rule]} | paper Acc | paper F1" for d in datasets
        )
        + " |"
    )
    lines = [title, "", RULE_TEXT[rule], "", head, "|" + "---|" * (1 + 5 * len(datasets))]
    for key, label in rows.items():
        cells, any_value = [], False
        for d in datasets:
            m = report["metrics"][d]["mean"]["settings"].get(key)
            any_value |= m is not None
            published = paper.get(d, {}).get(key)
            cells += [_pct(m["balanced_accuracy"]) if m else "–", _pct(m["f1"]) if m else "–", _count(m)]
            cells += [_paper(v) for v in published] if published else ["–", "–"]
        if any_value:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 6 else []


def _class_table(dataset: str, data: dict, settings: list[str], rule: str) -> list[str]:
    count = COUNT_COLUMN[rule]
    head = (
        "| Class | n | anomalous | τ | image AUROC | pixel AUROC | AUPRO | expert Acc | expert bal.Acc | "
        + " | ".join(f"{s} Acc | {s} bal.Acc | {s} {count}" for s in settings)
        + " |"
    )
    lines = [
        f"### {DATASET_TITLES.get(dataset, dataset)} per class (%): Acc = share of the counted answers that are "
        "right; bal.Acc = (accuracy on normal images + accuracy on anomalous images) / 2; last rows: the mean "
        "over classes (the paper's definition: its Acc is the bal.Acc mean) and all images pooled",
        "",
        head,
        "|" + "---|" * (9 + 3 * len(settings)),
    ]

    def row(name: str, c: dict, n: str, n_anom: str, tau: str) -> str:
        cells = [name, n, n_anom, tau]
        cells += [_pct(c.get(k)) for k in ("image_auroc", "pixel_auroc", "aupro")]
        cells += [_pct(c["expert"].get("accuracy")), _pct(c["expert"].get("balanced_accuracy"))]
        for s in settings:
            m = c["settings"].get(s)
            cells += [_pct(m["accuracy"]), _pct(m["balanced_accuracy"]), _count(m)] if m else ["–", "–", "–"]
        return "| " + " | ".join(cells) + " |"

    for name, c in data["classes"].items():
        lines.append(row(name, c, str(c["n"]), str(c["n_anomalous"]), f"{c['tau']:.4g}"))
    lines.append(row("**mean over classes**", data["mean"], "", "", ""))
    pooled = data["pooled"]
    lines.append(row("**pooled**", {"expert": pooled["expert"], "settings": pooled["settings"]}, "", "", ""))
    return lines


MMAD_TABLE_DEFINITION = (
    "MMAD's own table (its `caculate_accuracy_mmad`): per MMAD data set, pooled over its classes; a type's cell is "
    "the share of its answers whose letter is the item's Answer letter (Object Structure and Object Details "
    "counted as Object Analysis); Anomaly Detection = (accuracy on normal images + accuracy on anomalous images) "
    "/ 2, an image being normal when its path contains `good`; Average = mean of the type columns; Recall, "
    "Precision, F1 of the detection question; last row: mean of the data-set rows; NOT the paper's Table 1 "
    "definition"
)
MMAD_RULE_TEXT = {
    "drop": "Answers whose parsed or correct letter is not A–E are removed, as MMAD's summary does; column "
    "*dropped* counts them.",
    "wrong": "Answers without a parsed letter count as wrong (`--unparsed wrong`, not MMAD's rule); a correct "
    "letter outside A–E is removed (column *dropped*).",
}
TEMPLATE_BANKS_HEADING = (
    "# EAGLE evaluation report — MMAD banks built from the templates mmad.json lists (--bank-from-templates), "
    "NOT from the original training images the reference's banks use"
)
BANK_SOURCE_TEXT = {
    "bank_root": "the original data set's normal training images (--bank-root)",
    "mmad_tree": "train/good inside the MMAD folder",
    "templates": "the templates mmad.json lists (--bank-from-templates; not the reference's banks)",
}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _mmad_tables(report: dict) -> list[str]:
    """MMAD's per-type table for every setting that has MMAD answers (the report's rule)."""
    rule = _rule(report)
    lines: list[str] = []
    for dataset, data in report["metrics"].items():
        tables = data.get("mmad_table") or {}
        if not tables:
            continue
        model = _model_label(report["meta"]["datasets"][dataset])
        lines += [f"## MMAD per question type (%), {MMAD_TABLE_DEFINITION}", "", MMAD_RULE_TEXT[rule], ""]
        for setting, by_rule in tables.items():
            table = by_rule[rule]
            columns = table["columns"]
            lines += [f"### {model} · {setting}", ""]
            lines.append("| Data set | " + " | ".join(columns) + " | dropped |")
            lines.append("|" + "---|" * (len(columns) + 2))
            for name, row in table["rows"].items():
                cells = [_fmt(row.get(c)) for c in columns] + [str(table["dropped"].get(name, 0))]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            total = sum(table["dropped"].values())
            lines.append(
                "| **Average** | " + " | ".join(_fmt(table["average"].get(c)) for c in columns) + f" | {total} |"
            )
            lines.append("")
    return lines


def _bank_sources(report: dict) -> list[str]:
    """Per class, where its bank's normal references came from (MMAD)."""
    lines: list[str] = []
    for dataset, meta in report["meta"]["datasets"].items():
        sources = meta.get("bank_sources") or {}
        if not sources:
            continue
        title = DATASET_TITLES.get(dataset, dataset)
        lines += [f"## {title} banks — where each class's normal references came from", ""]
        lines += ["| Class | source | original data set | path | images |", "|---|---|---|---|---|"]
        for name, source in sources.items():
            text = BANK_SOURCE_TEXT.get(source.get("source"), str(source.get("source")))
            origin, path, count = source.get("origin") or "–", source.get("path"), source.get("n_images")
            lines.append(f"| {name} | {text} | {origin} | `{path}` | {count} |")
        lines.append("")
    return lines


def render_markdown(report: dict) -> str:
    """The Markdown report: paper-style Tables 1/3/4, MMAD's tables, per-class tables, completeness and notes."""
    metas = report["meta"]["datasets"]
    templates = any(meta.get("bank_from_templates") for meta in metas.values())
    heading = TEMPLATE_BANKS_HEADING if templates else "# EAGLE evaluation report"
    lines = [heading, "", f"Generated {report['meta']['generated']}.", ""]
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
    short = (
        "the paper's definitions: Acc = per-class balanced accuracy averaged over classes, F1 = per-class F1 "
        "averaged over classes"
    )
    lines += _table1(report) + [""]
    lines += _pooled_table(report) + [""]
    lines += _ablation(report, f"## Table 3 — prompt settings (%), {short}", TABLE3_ROWS, PAPER_TABLE3) + [""]
    lines += _ablation(
        report,
        f"## Table 4 — CAAS (%), {short}",
        {"full": "Visual + Textual, CAAS off", "full+caas": "Visual + Textual + CAAS (visual tokens)"},
        PAPER_TABLE4,
    ) + [""]
    lines += _mmad_tables(report)
    lines += _bank_sources(report)
    lines.append("## Expert (PatchCore + DBT) — image AUROC, pixel AUROC, AUPRO (%), per class, averaged over classes")
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
        lines += _class_table(dataset, data, metas[dataset]["settings"], _rule(report)) + [""]
    lines.append(
        RULE_TEXT[_rule(report)] + " report.json carries both rules (`rules`). Paper numbers: Qwen2.5-VL-7B, as "
        "printed (Table 3's textual-only F1 of 99.5 is the paper's own figure)."
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
            for rule in UNPARSED_RULES:  # both rules; the column ``unparsed`` names each row's
                for setting, m in data["rules"][rule][aggregate].items():
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
