"""Report plots (PNG), written atomically into ``<report>/plots/``.

Per class a histogram of the expert's scores (normal vs anomalous) with τ and s_max; per data set and setting
a confusion matrix (rows: truth; columns: no defect, defect, unknown).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common import atomic
from eagle.evaluation.aggregate import DATASET_TITLES, EXPERT_ROW, confusion_counts, load_run
from eagle.evaluation.records import ExpertRecord, RecordSet


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_plots(report: dict, run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """Score histograms with τ per class and confusion matrices per data set and setting (PNG)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sets: dict[str, RecordSet] = defaultdict(RecordSet)
    for directory in run_dirs:
        run, records = load_run(Path(directory))
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
            with atomic.atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
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
            with atomic.atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
            written.append(path)
    return written
