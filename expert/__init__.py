"""PatchCore expert: patch features, coreset bank, DBT threshold, anomaly map and visual prompt.

Knows nothing of Gradio, HTTP or files it was not handed; :mod:`expert.bank` reads and writes
bank directories.

Layers, data flow and where each rule lives: docs/architecture.md.
"""
