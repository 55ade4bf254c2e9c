"""Batch evaluation (``eagle eval``): data set readers, the run loop, records, metrics and reports.

Modules: :mod:`~eagle.evaluation.readers` (data set layouts), :mod:`~eagle.evaluation.runner` (the loop),
:mod:`~eagle.evaluation.records` (JSONL records, resume), :mod:`~eagle.evaluation.shards` (``--shard i/n``),
:mod:`~eagle.evaluation.bankcache` (one cached bank per class), :mod:`~eagle.evaluation.metrics`,
:mod:`~eagle.evaluation.aggregate` (records → report dictionary), :mod:`~eagle.evaluation.render` (Markdown,
CSV), :mod:`~eagle.evaluation.plots` (PNG), :mod:`~eagle.evaluation.report` (writes the report folder) and
:mod:`~eagle.evaluation.cli`.
"""
