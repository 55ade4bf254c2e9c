"""Prometheus metrics of the service, through ``prometheus_client`` (text exposition format 0.0.4).

:class:`ServiceMetrics` holds what the service exposes:

* ``eagle_http_requests_total{route,method,status}`` and ``eagle_http_request_duration_seconds{route}``;
* ``eagle_errors_total{code}`` (every error response by its JSON code);
* ``eagle_inspections_total{bank,verdict}``;
* ``eagle_feedback_total{bank,feedback}`` (operators' ``confirmed``/``overruled``) and ``eagle_overrules_total{bank}``;
* ``eagle_stage_duration_seconds{stage}`` from each result's ``timings_ms``;
* ``eagle_queue_depth``, ``eagle_queue_capacity``, ``eagle_worker_busy``, ``eagle_queue_rejections_total``;
* ``eagle_bank_jobs{state}``;
* ``eagle_gpu_memory_allocated_bytes{device}`` / ``eagle_gpu_memory_reserved_bytes{device}`` when torch is
  already loaded and sees a CUDA device (torch is never imported just for metrics).

Each :class:`ServiceMetrics` has its own ``CollectorRegistry`` (several services in one process, e.g. tests,
never share counts). Counters and histograms are ``prometheus_client``'s; :class:`Registry` only lets callers
pass labels as keywords (``errors.inc(code="queue_full")``) and adds gauges read from a callback at scrape
time (``prometheus_client``'s ``set_function`` cannot label them). The ``*_created`` series are off, as before.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from eagle.line_health import LineHealth

prometheus_client.disable_created_metrics()  # no ``*_created`` series: the exposition stays as it was

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

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

GaugeCallback = Callable[[], Iterable[tuple[dict[str, Any], float]]]
"""Returns ``(labels, value)`` per series, at scrape time."""


class Counter:
    """A ``prometheus_client`` counter whose labels are passed as keywords."""

    def __init__(self, metric: prometheus_client.Counter) -> None:
        self.metric = metric

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        """Add ``amount`` (≥ 0) to the series named by ``labels``."""
        (self.metric.labels(**labels) if labels else self.metric).inc(amount)


class Histogram:
    """A ``prometheus_client`` histogram whose labels are passed as keywords."""

    def __init__(self, metric: prometheus_client.Histogram) -> None:
        self.metric = metric

    def observe(self, value: float, **labels: Any) -> None:
        """Record one observation (e.g. seconds) in the series named by ``labels``."""
        (self.metric.labels(**labels) if labels else self.metric).observe(value)


class _CallbackGauge(Collector):
    """A gauge whose series are read from ``callback`` at each scrape."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str], callback: GaugeCallback) -> None:
        self.name, self.help, self.labels, self.callback = name, help_text, list(labels), callback

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        for labels, value in sorted(self.callback(), key=lambda item: sorted(item[0].items())):
            family.add_metric([str(labels[name]) for name in self.labels], float(value))
        yield family


class Registry:
    """A ``prometheus_client.CollectorRegistry`` and the metrics registered in it, rendered together."""

    def __init__(self) -> None:
        self.collectors = prometheus_client.CollectorRegistry()

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        """Register and return a counter (``name`` ends in ``_total``)."""
        return Counter(prometheus_client.Counter(name, help_text, list(labels), registry=self.collectors))

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = (), *, callback: GaugeCallback) -> None:
        """Register a gauge read from ``callback`` at scrape time."""
        self.collectors.register(_CallbackGauge(name, help_text, labels, callback))

    def histogram(
        self, name: str, help_text: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        """Register and return a histogram (cumulative ``le`` buckets, ``_sum`` and ``_count``)."""
        return Histogram(
            prometheus_client.Histogram(name, help_text, list(labels), buckets=buckets, registry=self.collectors)
        )

    def render(self) -> str:
        """All metrics in the text exposition format, ending with a newline."""
        return prometheus_client.generate_latest(self.collectors).decode("utf-8")


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


_HEALTH_STATISTICS: tuple[tuple[str, str, Callable[[LineHealth], float | None]], ...] = (
    (
        "eagle_line_health_median_shift_sigma",
        "Median score of recent good parts minus the bank's training median, in training spreads.",
        lambda h: h.median_shift,
    ),
    ("eagle_line_health_above_tau_ratio", "Share of recent scores of good parts above τ.", lambda h: h.above_tau),
    (
        "eagle_line_health_expected_above_tau_ratio",
        "The bank's own ceiling for that share (95 % upper bound from its training scores).",
        lambda h: h.expected_above_tau_max,
    ),
    (
        "eagle_line_health_ks_statistic",
        "Kolmogorov-Smirnov D between recent scores of good parts and the bank's training scores.",
        lambda h: h.ks_statistic,
    ),
)
"""The line-health statistics exported as gauges per bank, beside ``eagle_line_health_state``."""


class ServiceMetrics:
    """The service's metrics, fed by the API middleware, the inspection task and the job manager.

    Args:
        queue_state: callback returning ``(depth, capacity, busy)`` of the inference worker.
        job_states: callback returning ``{state: count}`` of bank-build jobs.
        line_health: callback returning the line-health results (:class:`eagle.line_health.LineHealth`) of the
            banks to report, read at each scrape (never during an inspection).
    """

    def __init__(
        self,
        queue_state: Callable[[], tuple[int, int, bool]] | None = None,
        job_states: Callable[[], dict[str, int]] | None = None,
        line_health: Callable[[], Iterable[LineHealth]] | None = None,
    ) -> None:
        self.queue_state = queue_state or (lambda: (0, 0, False))
        self.job_states = job_states or dict
        self.line_health = line_health or list
        self._health: list[LineHealth] = []
        r = self.registry = Registry()
        self.requests = r.counter("eagle_http_requests_total", "HTTP requests answered.", ["route", "method", "status"])
        self.request_seconds = r.histogram(
            "eagle_http_request_duration_seconds", "HTTP request latency, seconds.", ["route"]
        )
        self.errors = r.counter("eagle_errors_total", "Error responses by error code.", ["code"])
        self.inspections = r.counter("eagle_inspections_total", "Inspections completed.", ["bank", "verdict"])
        self.feedback = r.counter(
            "eagle_feedback_total", "Operator feedback on verdicts (confirmed or overruled).", ["bank", "feedback"]
        )
        self.overrules = r.counter("eagle_overrules_total", "Verdicts overruled by an operator.", ["bank"])
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

        r.gauge(
            "eagle_line_health_state",
            "Line health per bank: 0 ok, 1 watch, 2 drifting; -1 not enough inspections, -2 not enough references.",
            ["bank"],
            callback=self._health_gauge(lambda h: float(h.level), refresh=True),
        )
        for name, help_text, value in _HEALTH_STATISTICS:
            r.gauge(name, help_text, ["bank"], callback=self._health_gauge(value))

    def _health_gauge(
        self, value: Callable[[LineHealth], float | None], *, refresh: bool = False
    ) -> Callable[[], list[tuple[dict[str, Any], float]]]:
        """A gauge callback over the line-health results; ``refresh``: the first gauge of a scrape reads them anew."""

        def series() -> list[tuple[dict[str, Any], float]]:
            if refresh:
                try:
                    self._health = list(self.line_health())
                except Exception:  # noqa: BLE001 - metrics must never fail a scrape
                    self._health = []
            return [({"bank": h.bank}, float(v)) for h in self._health if (v := value(h)) is not None]

        return series

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

    def observe_feedback(self, bank: str, feedback: str) -> None:
        """Count one operator feedback (``confirmed``/``overruled``); an overrule also counts as an overrule."""
        self.feedback.inc(bank=bank, feedback=feedback)
        if feedback == "overruled":
            self.overrules.inc(bank=bank)

    def render(self) -> str:
        """The exposition text for ``GET /metrics``."""
        return self.registry.render()
