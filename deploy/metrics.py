"""Prometheus metrics of the service, rendered in the text exposition format (version 0.0.4).

``prometheus_client`` is not a dependency of EAGLE, so the few metric kinds needed (counter, gauge,
histogram, with labels) are implemented here, thread-safe, following the format specification: ``# HELP`` and
``# TYPE`` lines, label values escaped (backslash, double quote, newline), histogram buckets cumulative with
a ``+Inf`` bucket equal to ``_count``.

:class:`ServiceMetrics` holds what the service exposes:

* ``eagle_http_requests_total{route,method,status}`` and ``eagle_http_request_duration_seconds{route}``;
* ``eagle_errors_total{code}`` (every error response by its JSON code);
* ``eagle_inspections_total{bank,verdict}``;
* ``eagle_stage_duration_seconds{stage}`` from each result's ``timings_ms``;
* ``eagle_queue_depth``, ``eagle_queue_capacity``, ``eagle_worker_busy``, ``eagle_queue_rejections_total``;
* ``eagle_bank_jobs{state}``;
* ``eagle_gpu_memory_allocated_bytes{device}`` / ``eagle_gpu_memory_reserved_bytes{device}`` when torch is
  already loaded and sees a CUDA device (torch is never imported just for metrics).

Example:
    >>> registry = Registry()
    >>> hits = registry.counter("demo_hits_total", "Hits.", ["path"])
    >>> hits.inc(path="/a")
    >>> print(registry.render().strip())
    # HELP demo_hits_total Hits.
    # TYPE demo_hits_total counter
    demo_hits_total{path="/a"} 1.0
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Seconds; from a fast expert-only stage on a GPU to a slow CPU-only MLLM answer."""

LabelValues = tuple[str, ...]


def escape_label_value(value: str) -> str:
    r"""Escape a label value for the text format: ``\`` → ``\\``, ``"`` → ``\"``, newline → ``\n``."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """Format a sample value the way Prometheus parses it (``+Inf``, ``-Inf``, ``NaN``, else ``repr``)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{escape_label_value(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, Any]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label combination."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        """Add ``amount`` (≥ 0) to the series named by ``labels``."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: Any) -> float:
        """Current value of one series (0 if never incremented)."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        """The exposition lines of every series."""
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, key)} {format_value(v)}" for key, v in items]


class Gauge(_Metric):
    """A value that goes up and down; either set explicitly or read from a callback at render time."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        callback: Callable[[], Iterable[tuple[dict[str, Any], float]]] | None = None,
    ) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[LabelValues, float] = {}
        self._callback = callback

    def set(self, value: float, **labels: Any) -> None:
        """Set the series named by ``labels``."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def samples(self) -> list[str]:
        """The exposition lines of every series (from the callback when there is one)."""
        if self._callback is not None:
            items = sorted((self._key(labels), float(value)) for labels, value in self._callback())
        else:
            with self._lock:
                items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, key)} {format_value(v)}" for key, v in items]


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help_text, label_names)
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("histogram buckets must be strictly increasing")
        self.buckets = tuple(float(b) for b in buckets)
        self._series: dict[LabelValues, list[float]] = {}  # per-bucket counts (not cumulative), then sum, count

    def observe(self, value: float, **labels: Any) -> None:
        """Record one observation (e.g. seconds) in the series named by ``labels``."""
        key = self._key(labels)
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 3))
            series[index] += 1
            series[-2] += value
            series[-1] += 1

    def count(self, **labels: Any) -> int:
        """Observations recorded in one series."""
        with self._lock:
            series = self._series.get(self._key(labels))
        return int(series[-1]) if series else 0

    def samples(self) -> list[str]:
        """The exposition lines of every series."""
        with self._lock:
            items = sorted((key, list(series)) for key, series in self._series.items())
        lines: list[str] = []
        for key, series in items:
            cumulative = 0.0
            for bound, n in zip((*self.buckets, math.inf), series[: len(self.buckets) + 1], strict=True):
                cumulative += n
                le = f'le="{format_value(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {format_value(cumulative)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {format_value(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {format_value(series[-1])}")
        return lines


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> Any:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        """Register and return a :class:`Counter`."""
        return self._add(Counter(name, help_text, labels))

    def gauge(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        callback: Callable[[], Iterable[tuple[dict[str, Any], float]]] | None = None,
    ) -> Gauge:
        """Register and return a :class:`Gauge` (read from ``callback`` at render time when given)."""
        return self._add(Gauge(name, help_text, labels, callback))

    def histogram(
        self, name: str, help_text: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        """Register and return a :class:`Histogram`."""
        return self._add(Histogram(name, help_text, labels, buckets))

    def render(self) -> str:
        """All metrics in the text exposition format, ending with a newline."""
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.header())
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"


def gpu_memory() -> list[tuple[dict[str, Any], float, float]]:
    """``(labels, allocated, reserved)`` bytes per CUDA device; empty without a loaded torch or a GPU.

    torch is only consulted when something else already imported it: metrics never load a framework.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        return [
            ({"device": f"cuda:{i}"}, float(torch.cuda.memory_allocated(i)), float(torch.cuda.memory_reserved(i)))
            for i in range(torch.cuda.device_count())
        ]
    except Exception:  # noqa: BLE001 - metrics must never fail a scrape
        return []


class ServiceMetrics:
    """The service's metrics, fed by the API middleware, the inspection task and the job manager.

    Args:
        queue_state: callback returning ``(depth, capacity, busy)`` of the inference worker.
        job_states: callback returning ``{state: count}`` of bank-build jobs.
    """

    def __init__(
        self,
        queue_state: Callable[[], tuple[int, int, bool]] | None = None,
        job_states: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.queue_state = queue_state or (lambda: (0, 0, False))
        self.job_states = job_states or dict
        r = self.registry = Registry()
        self.requests = r.counter("eagle_http_requests_total", "HTTP requests answered.", ["route", "method", "status"])
        self.request_seconds = r.histogram(
            "eagle_http_request_duration_seconds", "HTTP request latency, seconds.", ["route"]
        )
        self.errors = r.counter("eagle_errors_total", "Error responses by error code.", ["code"])
        self.inspections = r.counter("eagle_inspections_total", "Inspections completed.", ["bank", "verdict"])
        self.stage_seconds = r.histogram(
            "eagle_stage_duration_seconds", "Pipeline stage latency from the result's timings, seconds.", ["stage"]
        )
        r.gauge("eagle_queue_depth", "Inspections waiting for the worker.", callback=lambda: [({}, self._q()[0])])
        r.gauge("eagle_queue_capacity", "Most inspections allowed to wait.", callback=lambda: [({}, self._q()[1])])
        r.gauge("eagle_worker_busy", "1 while the worker runs an inspection.", callback=lambda: [({}, self._q()[2])])
        self.rejections = r.counter("eagle_queue_rejections_total", "Inspections refused with 429 (queue full).")
        r.gauge(
            "eagle_bank_jobs",
            "Bank-build jobs by state.",
            ["state"],
            callback=lambda: [({"state": s}, float(n)) for s, n in self.job_states().items()],
        )
        r.gauge(
            "eagle_gpu_memory_allocated_bytes",
            "GPU memory allocated by torch.",
            ["device"],
            callback=lambda: [(labels, alloc) for labels, alloc, _ in gpu_memory()],
        )
        r.gauge(
            "eagle_gpu_memory_reserved_bytes",
            "GPU memory reserved by torch's caching allocator.",
            ["device"],
            callback=lambda: [(labels, reserved) for labels, _, reserved in gpu_memory()],
        )

    def _q(self) -> tuple[float, float, float]:
        depth, capacity, busy = self.queue_state()
        return float(depth), float(capacity), 1.0 if busy else 0.0

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request and its latency."""
        self.requests.inc(route=route, method=method, status=str(status))
        self.request_seconds.observe(seconds, route=route)

    def observe_inspection(self, bank: str, verdict: str, timings_ms: dict[str, float]) -> None:
        """Count one inspection and record each stage's duration (``timings_ms`` in milliseconds)."""
        self.inspections.inc(bank=bank, verdict=verdict)
        for stage, ms in timings_ms.items():
            if isinstance(ms, int | float) and math.isfinite(ms) and ms >= 0:
                self.stage_seconds.observe(ms / 1000.0, stage=str(stage))

    def render(self) -> str:
        """The exposition text for ``GET /metrics``."""
        return self.registry.render()
