"""One inference worker (the GPU, or the CPU on an expert-only box) fed by a bounded queue.

Requests do not race for the model: each becomes a task on a single worker thread. Admission is exact: one
task runs and at most ``capacity`` wait, counting a task the thread has not picked up yet as the one about to
run (so ``capacity + 1`` simultaneous requests on an idle worker are all accepted). One more is refused at
once with :class:`~deploy.errors.QueueFull` carrying a ``Retry-After``
estimate (queue depth × recent task time, never less than the configured minimum), which the API turns into
``429``. :meth:`InferenceWorker.shutdown` stops accepting work and finishes everything already accepted.

Example:
    >>> worker = InferenceWorker(capacity=2)
    >>> worker.start()
    >>> worker.submit(lambda x: x * 2, 21).result()
    42
    >>> worker.shutdown()
    True
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from deploy.errors import QueueFull, ShuttingDown

logger = logging.getLogger(__name__)

_Task = tuple[Future, Callable[..., Any], tuple, dict]


class InferenceWorker:
    """A single thread running submitted callables in order, with a bounded waiting queue.

    Args:
        capacity: most tasks allowed to wait (the running task is not counted).
        min_retry_after_s: smallest ``Retry-After`` advertised when the queue is full.
        name: thread name (shows in logs and ``py-spy``).
    """

    def __init__(self, capacity: int, *, min_retry_after_s: int = 1, name: str = "eagle-inference") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.min_retry_after_s = max(1, int(min_retry_after_s))
        self._name = name
        self._tasks: collections.deque[_Task] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._busy = False
        self._mean_task_s: float | None = None
        self.completed = 0
        self.rejected = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._accepting = True
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting tasks, finish every accepted one, and stop the thread.

        Args:
            timeout: seconds to wait for the queue to drain; ``None`` waits as long as it takes.

        Returns:
            ``True`` when every accepted task finished in time.
        """
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def accepting(self) -> bool:
        """Whether new tasks are taken (started and not shutting down)."""
        return self._accepting

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- queue -----------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Tasks waiting (not counting the running one)."""
        return len(self._tasks)

    @property
    def busy(self) -> bool:
        """Whether a task is running now."""
        return self._busy

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the time to work through the current queue, at least the minimum."""
        mean = self._mean_task_s or 0.0
        return max(self.min_retry_after_s, math.ceil((self.depth + 1) * mean))

    def refusal(self) -> QueueFull | None:
        """The :class:`~deploy.errors.QueueFull` a new task would get now, or ``None`` if there is room.

        Room means fewer than ``capacity + 1`` accepted tasks not yet finished (the running one plus ``capacity``
        waiting). Lets the API refuse an upload before reading its body; :meth:`submit` still decides for real.
        """
        if len(self._tasks) + (1 if self._busy else 0) < self.capacity + 1:
            return None
        retry = self.retry_after()
        return QueueFull(
            f"the inspection queue is full ({self.capacity} waiting); retry in {retry} s", retry_after=retry
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; its outcome arrives in the returned future.

        Raises:
            QueueFull: one task runs (or is about to) and ``capacity`` more already wait.
            ShuttingDown: the worker is not accepting tasks (not started, or draining before exit).
        """
        future: Future = Future()
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the service is shutting down and accepts no new inspections")
            refusal = self.refusal()
            if refusal is not None:
                self.rejected += 1
                raise refusal
            self._tasks.append((future, fn, args, kwargs))
            self._cond.notify()
        return future

    # -- thread ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and self._accepting:
                    self._cond.wait()
                if not self._tasks:  # drained and no longer accepting
                    return
                future, fn, args, kwargs = self._tasks.popleft()
                self._busy = True
            try:
                if future.set_running_or_notify_cancel():
                    start = time.perf_counter()
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:  # noqa: BLE001 - delivered to the waiting request
                        future.set_exception(exc)
                    self._record_duration(time.perf_counter() - start)
            finally:
                with self._cond:
                    self._busy = False
                    self.completed += 1

    def _record_duration(self, seconds: float) -> None:
        self._mean_task_s = seconds if self._mean_task_s is None else 0.8 * self._mean_task_s + 0.2 * seconds
