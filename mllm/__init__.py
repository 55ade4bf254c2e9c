"""Multimodal LLM layer: model presets and loading, EAGLE prompts, answer parsing, CAAS, attention read-out."""
