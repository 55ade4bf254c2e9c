"""Gradio web app (local or a Hugging Face Space).

Layers, data flow and where each rule lives: docs/architecture.md.
"""
