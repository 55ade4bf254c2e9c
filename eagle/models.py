"""The pipeline's model lifecycle: the backbone's ONNX graph (weights, cache, warm-up) and the lazily loaded MLLM.

:class:`BackboneGraph` keeps only the backbone weights' checksum and hands bank builds the cached ONNX graph;
:class:`MLLMModel` loads the multimodal LLM once, on first need, through an injectable loader (tests give a tiny
fake one), and says what it is doing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.progress import ProgressCallback
from eagle.errors import EagleError, one_line
from eagle.settings import Settings

if TYPE_CHECKING:  # the model stacks are imported only when they are used
    from expert.onnx_cache import ExportKey, OnnxCache
    from expert.weights import WeightsInfo
    from mllm.inspector import MLLMInspector

log = logging.getLogger(__name__)


class MLLMUnavailableError(EagleError, RuntimeError):
    """The multimodal LLM is disabled or could not be loaded; the message says why and what to do.

    One behaviour for every front end: an inspection that asks for the MLLM when it cannot be loaded fails with
    this error (``mllm_unavailable``, HTTP 503) instead of silently answering expert-only; the caller asks again
    with ``use_mllm`` off (or sets ``EAGLE_MLLM__ENABLED=false``) to inspect with the expert alone.
    """

    code, http_status = "mllm_unavailable", 503


MLLM_UNAVAILABLE = "the multimodal model could not be loaded"
EXPERT_ONLY_HINT = (
    "inspect with the expert only (untick 'Ask the MLLM' in the app, send use_mllm=false to the API, "
    "run `eagle watch --no-mllm`) or set EAGLE_MLLM__ENABLED=false"
)
"""How an MLLM load failure ends, for every front end: the message names the cause and this way out."""

MLLMLoader = Callable[[ProgressCallback | None], Any]
"""``loader(progress)`` → an inspector (:class:`mllm.inspector.MLLMInspector` or a test's stand-in with ``ask``,
``explain_stream``, ``attention_overlay`` and ``loaded.model_id`` / ``loaded.quantization``); it raises
:class:`MLLMUnavailableError` with the one-line reason when the model cannot be loaded."""


def mllm_loader(settings: Settings) -> MLLMLoader:
    """The real loader: :func:`mllm.loading.load_mllm` with ``settings``, wrapped in an ``MLLMInspector``."""

    def load(progress: ProgressCallback | None) -> MLLMInspector:
        from mllm.inspector import MLLMInspector
        from mllm.loading import MLLMLoadError, load_mllm

        try:
            loaded = load_mllm(settings.mllm, progress=progress, caas=settings.caas)
        except MLLMLoadError as err:
            raise MLLMUnavailableError(one_line(err)) from None
        return MLLMInspector(loaded, settings)

    return load


class MLLMModel:
    """The one multimodal LLM of a pipeline: loaded once on first need, under :attr:`lock`.

    Args:
        settings: the settings tree (``mllm.enabled`` says whether the model is wanted at all).
        loader: how to load it (default :func:`mllm_loader` of ``settings``).
    """

    def __init__(self, settings: Settings, loader: MLLMLoader | None = None) -> None:
        self.settings = settings
        self._loader = loader or mllm_loader(settings)
        self._inspector: Any = None
        self.lock = threading.Lock()
        self._error: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether settings ask for the MLLM at all (False: expert-only mode)."""
        return self.settings.mllm.enabled

    def loaded(self) -> bool:
        """Whether the MLLM is loaded and ready."""
        return self._inspector is not None

    def status(self) -> str:
        """One line for people: what the LLM side is doing."""
        if not self.enabled:
            return "expert-only mode (MLLM disabled in settings)"
        if self._inspector is not None:
            return f"MLLM loaded: {self._inspector.loaded.model_id} ({self._inspector.loaded.quantization})"
        if self._error:
            return f"MLLM unavailable ({self._error}); inspections asking for it fail until it loads"
        return "MLLM not loaded yet (loads on the first inspection)"

    def load(self, progress: ProgressCallback | None = None) -> Any:
        """Load the MLLM once (later calls return the same inspector; a failed load is tried again next time).

        Raises:
            MLLMUnavailableError: disabled in settings, or loading failed (the message says why and how to inspect
                with the expert alone).
        """
        if not self.enabled:
            raise MLLMUnavailableError("the MLLM is disabled (EAGLE_MLLM__ENABLED=false): expert-only mode")
        with self.lock:
            if self._inspector is not None:
                return self._inspector
            try:
                inspector = self._loader(progress)
            except MLLMUnavailableError as err:
                self._error = str(err)
                raise MLLMUnavailableError(f"{MLLM_UNAVAILABLE}: {self._error}; {EXPERT_ONLY_HINT}") from None
            self._inspector = inspector
            self._error = None
            return inspector


class BackboneGraph:
    """The configured backbone as bank builds need it: its weights' identity and its cached ONNX graph.

    Keeps only the weights' :class:`~expert.weights.WeightsInfo` (the graph's cache key), never the torch module
    (~300 MB). Thread-safe: a build waits for a start-up warm-up that is exporting the graph right now.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._weights_info: WeightsInfo | None = None
        self._lock = threading.Lock()

    @property
    def onnx_cache(self) -> OnnxCache:
        """The :class:`~expert.onnx_cache.OnnxCache` every bank build uses (``settings.onnx_cache_path``)."""
        from expert.onnx_cache import OnnxCache

        return OnnxCache(self.settings.onnx_cache_path)

    def _export_key(self, weights_info: WeightsInfo) -> ExportKey:
        from expert.onnx_cache import ExportKey

        expert = self.settings.expert
        return ExportKey.create(expert.backbone, weights_info.checksum, crop=expert.crop)

    def weights(self) -> tuple[WeightsInfo, Callable[[], Any]]:
        """``(weights_info, backbone loader)`` for a build.

        The first call loads the weights (their checksum needs them), puts the graph in :attr:`onnx_cache` while
        they are loaded (a cache hit costs a sha256 check) and drops them; the loader it returns is called by the
        cache only when it must export again (e.g. a corrupted entry).
        """
        with self._lock:
            return self._weights()

    def _weights(self) -> tuple[WeightsInfo, Callable[[], Any]]:
        from expert.weights import BackboneWeightsError, load_backbone

        if self._weights_info is None:
            module, info = load_backbone(self.settings.expert)
            self.onnx_cache.get(self._export_key(info), module)
            del module
            self._weights_info = info
        expected = self._weights_info

        def load() -> Any:
            module, info = load_backbone(self.settings.expert)
            if info.checksum != expected.checksum:
                raise BackboneWeightsError(
                    f"the backbone weights changed since they were first loaded ({expected.checksum[:19]} → "
                    f"{info.checksum[:19]}); restart to use the new weights"
                )
            return module

        return expected, load

    def warm(self, *, prune: bool = False) -> Path:
        """Make sure the configured backbone's ONNX graph is in :attr:`onnx_cache` (exported once if not).

        Returns the cached graph's path.

        Args:
            prune: also remove the cached graphs of other keys (older torch, other weights or crops).

        Raises:
            BackboneWeightsError: the weights cannot be loaded (the message says how to provide them).
        """
        with self._lock:
            weights_info, load = self._weights()
            key = self._export_key(weights_info)
            path = self.onnx_cache.get(key, load)
            if prune:
                for removed in self.onnx_cache.prune(key):
                    log.info("removed cached ONNX graph %s (another key)", removed)
            return path
