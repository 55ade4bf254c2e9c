"""Multimodal LLM layer: model presets and loading, EAGLE prompts, answer parsing, CAAS, attention read-out.

Layers, data flow and where each rule lives: docs/architecture.md.
"""
