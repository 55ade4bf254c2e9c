"""Batch evaluation (``eagle eval``): data set readers, the run loop, records, metrics and reports.

Modules: :mod:`~eagle.evaluation.readers` (data set layouts), :mod:`~eagle.evaluation.runner` (the loop),
:mod:`~eagle.evaluation.records` (JSONL records, resume), :mod:`~eagle.evaluation.shards` (``--shard i/n``),
:mod:`~eagle.evaluation.bankcache` (one cached bank per class), :mod:`~eagle.evaluation.metrics`,
:mod:`~eagle.evaluation.report` (JSON, CSV, Markdown tables, plots) and :mod:`~eagle.evaluation.cli`.
"""
