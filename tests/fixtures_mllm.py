"""Session fixtures for the tiny offline multimodal models (a pytest plugin: ``pytest_plugins``).

``tests/conftest.py`` imports both fixtures; a test file run outside this tree can import them explicitly::

    from tests.fixtures_mllm import tiny_qwen_dir  # noqa: F401
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_llava, make_tiny_qwen2_5_vl


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random-weight Qwen2.5-VL (16 layers × 64, seed 0), built once per test session."""
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random-weight LLaVA-1.5 (16 layers × 64, seed 0), built once per test session."""
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
