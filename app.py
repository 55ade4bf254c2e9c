"""Hugging Face Spaces entry point (``app_file: app.py`` in the README's front matter).

Runs the same app as ``eagle app``; settings come from the Space's variables (``EAGLE_*``).
"""

from app.launch import launch
from eagle.settings import load_settings

if __name__ == "__main__":
    launch(load_settings())
