"""Gradio web app (local or a Hugging Face Space)."""
