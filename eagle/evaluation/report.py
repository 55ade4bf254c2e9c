"""Write the report folder of an evaluation: JSON, CSV, Markdown and plots.

Outputs written by :func:`write_report` into the report folder:

* ``report.json`` — everything: per data set, per class and aggregated metrics (``metrics``: ``classes``,
  ``mean`` over classes — the paper's definitions —, ``pooled``, and ``rules`` with all of them under both rules
  for unparseable answers) plus run facts (``meta``: the rule the tables use, completeness, notes, errors,
  mean timings).
* ``per_class.csv`` — one row per (data set, class, setting); setting ``expert`` is the expert alone
  (anomalous iff s ≥ τ) and carries image AUROC, pixel AUROC and AUPRO.
* ``summary.csv`` — per (data set, setting, rule for unparseable answers): ``pooled`` (all test images
  together) and ``mean`` (of classes; the paper's Acc is its ``balanced_accuracy``).
* ``report.md`` — tables laid out like the paper's Table 1 (Accuracy, Precision, Recall, F1 per data set),
  Table 3 (prompt settings) and Table 4 (CAAS) in the paper's definitions, with the published Qwen2.5-VL-7B
  numbers alongside; the pooled metrics in a separately labelled table; then per-class tables.
* ``plots/`` — per class a histogram of the expert's scores (normal vs anomalous) with τ and s_max; per data
  set and setting a confusion matrix (rows: truth; columns: no defect, defect, unknown).

The report dictionary comes from :func:`eagle.evaluation.aggregate.build_report`; the Markdown and CSV from
:mod:`eagle.evaluation.render`, the plots from :mod:`eagle.evaluation.plots`. Every file is written atomically.

Example:
    >>> from eagle.evaluation.aggregate import build_report
    >>> report = build_report([Path("runs/shard0"), Path("runs/shard1")])  # doctest: +SKIP
    >>> write_report(report, Path("runs/merged"))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from common import atomic
from eagle.evaluation.plots import write_plots
from eagle.evaluation.records import dump_json
from eagle.evaluation.render import csv_rows, render_markdown, write_csv


def write_report(report: dict, out: Path, *, plots: bool = True) -> list[Path]:
    """Write report.json, per_class.csv, summary.csv, report.md and (optionally) plots into ``out``.

    Returns:
        The files written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dump_json(out / "report.json", report)
    per_class, summary = csv_rows(report)
    write_csv(out / "per_class.csv", per_class)
    write_csv(out / "summary.csv", summary)
    atomic.write_text(out / "report.md", render_markdown(report))
    written = [out / "report.json", out / "per_class.csv", out / "summary.csv", out / "report.md"]
    if plots:
        run_dirs = [Path(d) for meta in report["meta"]["datasets"].values() for d in meta["runs"]]
        written += write_plots(report, run_dirs, out)
    return written
