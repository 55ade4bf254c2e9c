"""``eagle eval --executor ray``: the same evaluation, fanned out over a Ray cluster.

Same readers, same records, same report as the local executor (:class:`~eagle.evaluation.runner.EvalRunner`,
which this subclasses): only :meth:`RayEvalRunner._execute` differs.

* **Banks**: one Ray task per class builds its bank, or finds it in the cache (the same
  :class:`~eagle.evaluation.bankcache.BankCache` key), in parallel. Bank tasks reserve CPUs only
  (``bank_cpus``), never a GPU, so they cannot wait behind inspection actors that hold every GPU.
* **Inspection**: actors, each holding one pipeline (the MLLM loaded once, eagerly, when the actor starts), run
  the local executor's own per-image function (:meth:`EvalRunner._process`). Dispatch is dynamic: an actor gets
  the next image only when it has returned its last one, so the work spreads by speed, not by a fixed split —
  a class of 30 images and two of 2 keep every actor busy, where class-wise or static shards would not.
* **Records**: only the DRIVER writes. Actors return their records (and anomaly maps as ``.npz`` bytes); the
  driver writes each map, then appends the records to ``<out>/records.jsonl`` (fsync'ed) as results arrive.
  ``--resume`` semantics, ``eval-merge`` and the report are therefore those of the local executor; a driver
  killed mid-run leaves at most one cut line, which the next run drops before redoing only what is missing.

Storage: actors and bank tasks read the data set, and write and read banks, at the SAME paths as the driver. On a
cluster, put the data set and ``--bank-dir`` (default ``<out>/cache``) on storage every node mounts at one path
(a ReadWriteMany volume on KubeRay); ``--out`` itself is only written by the driver. A node that cannot see
them fails with a message saying so.

Example:
    >>> runner = RayEvalRunner(settings, config, options=RayOptions(address="auto"))  # doctest: +SKIP
    >>> report = runner.run()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import atomic
from eagle.evaluation.bankcache import BankCache, cache_key
from eagle.evaluation.readers import EvalDataset, EvalSample
from eagle.evaluation.records import ExpertRecord, RecordSet, RecordWriter
from eagle.evaluation.runner import EvalConfig, EvalConfigError, EvalRunner, bank_root
from eagle.progress_bars import count_bar
from eagle.settings import Settings

log = logging.getLogger(__name__)

RAY_HINT = "pip install 'eagle-inspect[ray]' (or the pinned ray from requirements-dev.txt)"
#: How often one image is handed to another actor after the actor running it died (node lost, out of memory).
MAX_IMAGE_RETRIES = 1

PipelineFactory = Callable[[Settings], Any]


class RayUnavailableError(EvalConfigError):
    """``--executor ray`` was asked for but Ray is not installed."""


def import_ray() -> Any:
    """Import Ray, or raise :class:`RayUnavailableError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def default_pipeline_factory(settings: Settings) -> Any:
    """The real :class:`eagle.pipeline.Pipeline` (lazy: it loads nothing until used)."""
    from eagle.pipeline import Pipeline

    return Pipeline(settings)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray executor runs.

    Attributes:
        address: the Ray cluster (``auto``, ``ray://head:10001``, ``host:6379``); ``None``: ``RAY_ADDRESS`` when
            set (e.g. under ``ray job submit``), otherwise a Ray instance started on this machine.
        actors: inspection actors; ``None``: as many as the cluster's GPUs allow (``gpus_per_actor`` > 0), or
            its CPUs less ``bank_cpus``; never more than the images to evaluate.
        gpus_per_actor: GPUs each actor reserves (fractions share a GPU); ``None``: 1 when the cluster has GPUs
            and the MLLM device is not ``cpu``, else 0.
        cpus_per_actor: CPUs each actor reserves.
        bank_cpus: CPUs each bank-building task reserves (bank tasks never reserve a GPU).
        runtime_env: a Ray runtime environment for a Ray instance this run starts or connects to.
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    bank_cpus: float = 1.0
    runtime_env: dict | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise EvalConfigError(f"--actors must be at least 1, got {self.actors}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise EvalConfigError(f"--gpus-per-actor must not be negative, got {self.gpus_per_actor}")
        if self.cpus_per_actor < 0 or self.bank_cpus < 0:
            raise EvalConfigError("CPUs per actor and per bank task must not be negative")


def _check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """Fail fast when a cluster address names a host:port that does not answer (``ray.init`` retries for minutes).

    ``auto``, ``local`` and ``None`` are left to Ray. Raises :class:`EvalConfigError` naming the address.
    """
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise EvalConfigError(
            f"cannot reach the Ray cluster at {address!r}: {err}; check --address (ray://HEAD:10001 or HEAD:6379)"
        ) from None


def connect(options: RayOptions) -> Any:
    """Connect to (or start) Ray as ``options`` say, unless this process is already connected; return ``ray``."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {}
    if options.runtime_env:
        kwargs["runtime_env"] = options.runtime_env
    if options.address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # a private instance for this run: no dashboard needed
        log.info("starting a local Ray instance (pass --address to use a cluster)")
    _check_reachable(options.address or os.environ.get("RAY_ADDRESS"))
    try:
        ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = options.address or os.environ.get("RAY_ADDRESS") or "a local instance"
        raise EvalConfigError(f"cannot connect to Ray ({where}): {' '.join(str(err).split())}") from None
    return ray


# ---------------------------------------------------------------------------------------------------- worker side
_PIPELINES: dict[str, Any] = {}  # per worker process: bank tasks of one run share one pipeline (one backbone load)


def _pipeline_for(factory: PipelineFactory, settings: Settings) -> Any:
    key = f"{getattr(factory, '__module__', '')}.{getattr(factory, '__qualname__', repr(factory))}|"
    key += settings.model_dump_json()
    if key not in _PIPELINES:
        _PIPELINES.clear()  # a new run's settings: drop the old pipeline
        _PIPELINES[key] = factory(settings)
    return _PIPELINES[key]


def build_bank_task(
    factory: PipelineFactory,
    settings: Settings,
    class_name: str,
    references: list[Path],
    root: Path,
    prune: bool,
) -> tuple[str, str, bool]:
    """Build (or find in the cache) one class's bank; runs as a Ray task.

    Returns:
        ``(bank name, cache key, reused)``; the driver records them in ``banks.json``.
    """
    expert_only = settings.model_copy(deep=True)
    expert_only.mllm.enabled = False  # a bank task never loads the MLLM
    cache = BankCache(_pipeline_for(factory, expert_only), expert_only.expert, progress=False, prune=prune)
    name = cache.get(class_name, references, root=root)
    return name, cache_key(expert_only.expert, references, root), not cache.built


class _ListWriter:
    """Collects what :meth:`EvalRunner._process` appends, for the driver to write."""

    def __init__(self) -> None:
        self.records: list = []

    def append(self, record) -> None:
        self.records.append(record)


ACTOR_SCRATCH_PREFIX = "eagle-eval-actor-"


def actor_scratch(base: str | Path | None = None) -> Path:
    """A private scratch folder for this actor process; first removes those of dead actor processes on this host.

    An actor closed by the driver removes its folder (:meth:`InspectActor.close`), but one that was killed (a lost
    node, out of memory, a cancelled run) cannot. Folders are named ``eagle-eval-actor-<host>-<pid>-<random>``, so
    the next actor on the same host removes those whose process is gone; folders of other hosts (a shared
    ``/tmp``, other pods) are never touched.
    """
    return atomic.staging_dir(Path(base or tempfile.gettempdir()), ACTOR_SCRATCH_PREFIX)


class InspectActor:
    """One pipeline on one worker (a GPU when reserved) that inspects the images it is handed, one at a time.

    It runs :meth:`EvalRunner._process` with its output folder in a private temporary directory: the anomaly maps
    written there are read back and returned as bytes with the records, so nothing is written to ``--out`` by a
    worker.
    """

    def __init__(self, factory: PipelineFactory, settings: Settings, config: EvalConfig, dataset: EvalDataset):
        self.tmp = actor_scratch()
        self.runner = EvalRunner(factory(settings), settings, replace(config, out=self.tmp, progress=False), dataset)

    def ready(self) -> dict[str, Any]:
        """Check this node sees the data set, then load the MLLM (when enabled) so the first image pays nothing.

        Raises:
            EvalConfigError: the data set root is not visible here.
            eagle.models.MLLMUnavailableError: the MLLM could not be loaded.
        """
        root = self.runner.dataset.root
        if not Path(root).is_dir():
            raise EvalConfigError(
                f"the data set root {root} is not visible on Ray node {socket.gethostname()}: mount it at the same "
                "path on every node"
            )
        pipeline = self.runner.pipeline
        if pipeline.mllm_enabled and hasattr(pipeline, "load_mllm"):
            pipeline.load_mllm()
        return {"host": socket.gethostname(), "pid": os.getpid()}

    def inspect(self, sample: EvalSample, bank: str, done: RecordSet) -> tuple[list, dict[str, bytes]]:
        """Evaluate one image (its missing records only); return ``(records, {map_file: npz bytes})``.

        Raises:
            EvalConfigError: the bank the bank task built is not visible on this node.
        """
        if not self.runner.pipeline.banks.exists(bank):
            raise EvalConfigError(
                f"bank {bank} (built by a Ray task) is not in {self.runner.settings.banks_dir} on Ray node "
                f"{socket.gethostname()}: put --bank-dir (default <out>/cache) on storage every node shares"
            )
        writer = _ListWriter()
        self.runner._process(sample, bank, done, writer)
        maps: dict[str, bytes] = {}
        for record in writer.records:
            if isinstance(record, ExpertRecord) and record.map_file:
                path = self.tmp / record.map_file
                maps[record.map_file] = path.read_bytes()
                path.unlink()
        return writer.records, maps

    def close(self) -> None:
        """Remove the temporary folder."""
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- driver side
def _done_for(done: RecordSet, key: str, settings: list[str]) -> RecordSet:
    """The records already written for one image (all an actor needs to skip what is done)."""
    subset = RecordSet()
    if key in done.experts:
        subset.experts[key] = done.experts[key]
    for name in settings:
        if (key, name) in done.answers:
            subset.answers[(key, name)] = done.answers[(key, name)]
    subset.questions.update({k: r for k, r in done.questions.items() if k[0] == key and k[1] in settings})
    return subset


class RayEvalRunner(EvalRunner):
    """:class:`EvalRunner` whose per-image work runs on Ray actors (see the module docstring).

    Args:
        settings: the settings every worker's pipeline is built with (its ``data_dir`` is set to
            :func:`bank_root` of ``config``, made absolute).
        config: what to evaluate (paths are made absolute: workers resolve them on their own nodes).
        options: the Ray cluster and the actors' resources.
        pipeline_factory: builds a pipeline from settings (default :class:`eagle.pipeline.Pipeline`); it must be
            importable on the workers. Tests pass a fake.
        dataset: an already-read data set.

    Raises:
        RayUnavailableError: Ray is not installed.
    """

    def __init__(
        self,
        settings: Settings,
        config: EvalConfig,
        *,
        options: RayOptions | None = None,
        pipeline_factory: PipelineFactory = default_pipeline_factory,
        dataset: EvalDataset | None = None,
    ):
        import_ray()
        config = replace(
            config,
            root=config.root.resolve(),
            out=config.out.resolve(),
            bank_dir=Path(config.bank_dir).resolve() if config.bank_dir else None,
            bank_roots={name: Path(directory).resolve() for name, directory in config.bank_roots.items()},
        )
        settings = settings.model_copy(deep=True)
        settings.data_dir = bank_root(config)
        super().__init__(pipeline_factory(settings), settings, config, dataset)
        self.options = options or RayOptions()
        self.factory = pipeline_factory
        self.per_actor: list[int] = []  # images each actor evaluated in the last run (logs and tests)
        self.assigned: dict[str, int] = {}  # image key -> the actor that evaluated it, in the last run

    def _plan_actors(self, ray: Any, n_images: int) -> tuple[int, float, float]:
        """``(actors, GPUs each, CPUs each)`` from the options and the cluster's resources."""
        opts = self.options
        resources = ray.cluster_resources()
        cluster_gpus, cluster_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        gpus = opts.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if cluster_gpus >= 1 and self.settings.mllm.device != "cpu" else 0.0
        cpus = opts.cpus_per_actor
        n = opts.actors
        if n is None:
            if gpus > 0:
                n = int(cluster_gpus // gpus)
            else:
                n = int((cluster_cpus - opts.bank_cpus) // cpus) if cpus > 0 else int(cluster_cpus)
        n = max(1, min(n, n_images))
        if n * gpus > cluster_gpus or n * cpus + opts.bank_cpus > cluster_cpus:
            log.warning(
                "%d actors × (%g CPU, %g GPU) + a bank task (%g CPU) exceed the cluster's %g CPU / %g GPU now: "
                "the run waits until the cluster grows",
                n,
                cpus,
                gpus,
                opts.bank_cpus,
                cluster_cpus,
                cluster_gpus,
            )
        return n, gpus, cpus

    @staticmethod
    def _get(ray: Any, ref: Any) -> Any:
        """``ray.get`` that re-raises a remote task's own exception (so the CLI shows its one-line message)."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise

    def _execute(self, todo: dict[str, list[EvalSample]], done: RecordSet, *, total: int) -> None:
        """Build banks with one task per class and inspect with actors; write every result here, as it arrives."""
        work = {name: samples for name, samples in todo.items() if samples}
        remaining = sum(len(s) for s in work.values())
        if not work:
            return
        ray = connect(self.options)
        config = self.config
        n_actors, gpus, cpus = self._plan_actors(ray, remaining)
        log.info("Ray: %d bank tasks, %d actors (%g GPU, %g CPU each)", len(work), n_actors, gpus, cpus)
        manifest = BankCache(None, self.settings.expert, manifest=config.out / "banks.json", progress=False)
        bank_remote = ray.remote(build_bank_task).options(num_cpus=self.options.bank_cpus, num_gpus=0)
        settings_ref = ray.put(self.settings)
        pending = {
            bank_remote.remote(
                self.factory,
                settings_ref,
                name,
                list(self.dataset.train[name]),
                self.dataset.root,
                config.bank_dir is None,  # never prune a shared --bank-dir (as the local executor)
            ): name
            for name in work
        }
        actor_class = ray.remote(InspectActor)
        dataset_ref = ray.put(self.dataset)
        actors = [
            actor_class.options(num_cpus=cpus, num_gpus=gpus).remote(self.factory, settings_ref, config, dataset_ref)
            for _ in range(n_actors)
        ]
        starting = {actor.ready.remote(): index for index, actor in enumerate(actors)}
        alive = set(range(n_actors))
        self.per_actor = [0] * n_actors
        self.assigned = {}
        names = [s.name for s in self.specs]
        queue: deque[tuple[EvalSample, str]] = deque()
        idle: deque[int] = deque()
        inflight: dict[Any, tuple[int, EvalSample, str]] = {}
        retries: dict[str, int] = {}
        bar = count_bar(total, initial=total - remaining, desc="eval", enabled=config.progress)
        try:
            with RecordWriter(self.records_path) as writer:
                while pending or queue or inflight:
                    while idle and queue:
                        index = idle.popleft()
                        sample, bank = queue.popleft()
                        ref = actors[index].inspect.remote(sample, bank, _done_for(done, sample.rel_path, names))
                        inflight[ref] = (index, sample, bank)
                    waiting = [*pending, *starting, *inflight]
                    if not waiting:
                        raise RuntimeError(f"every Ray actor died; {len(queue)} images were not evaluated")
                    [ref], _ = ray.wait(waiting, num_returns=1)
                    if ref in pending:
                        class_name = pending.pop(ref)
                        bank, key, reused = self._get(ray, ref)
                        references = self.dataset.train[class_name]
                        manifest._record(class_name, bank, key, len(references), reused)
                        log.info("bank %s for class %s %s", bank, class_name, "reused" if reused else "built")
                        queue.extend((sample, bank) for sample in work[class_name])
                    elif ref in starting:
                        index = starting.pop(ref)
                        info = self._get(ray, ref)
                        log.info("actor %d ready on %s (pid %s)", index, info["host"], info["pid"])
                        idle.append(index)
                    else:
                        index, sample, bank = inflight.pop(ref)
                        try:
                            records, maps = self._get(ray, ref)
                        except ray.exceptions.RayActorError as err:
                            alive.discard(index)
                            retries[sample.rel_path] = retries.get(sample.rel_path, 0) + 1
                            if retries[sample.rel_path] > MAX_IMAGE_RETRIES or not alive:
                                raise
                            log.warning("actor %d died (%s); handing %s to another", index, err, sample.rel_path)
                            queue.appendleft((sample, bank))
                            continue
                        for rel, data in maps.items():
                            atomic.write_bytes(config.out / rel, data)
                        for record in records:
                            writer.append(record)
                        done.add(records)
                        self.per_actor[index] += 1
                        self.assigned[sample.rel_path] = index
                        idle.append(index)
                        bar.set_postfix_str(sample.class_name, refresh=False)
                        bar.update(1)
        finally:
            bar.close()
            closing = [actors[index].close.remote() for index in alive]
            if closing:  # best effort: remove their temporary folders
                ray.wait(closing, num_returns=len(closing), timeout=10)
            for actor in actors:
                ray.kill(actor)
        log.info("Ray: images per actor %s", self.per_actor)
