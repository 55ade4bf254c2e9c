"""``eagle eval --executor ray`` on a local Ray instance (2 CPUs) with the fast fake pipeline.

One Ray instance serves the whole module. Checked: the same records (as sets, timings aside), maps and report as
the local executor; work spread over the actors when classes differ in size (30/4/4 images); a driver killed
with SIGKILL mid-run resumes without redoing or duplicating finished rows; the CLI's options.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from eagle.evaluation.records import RECORDS_FILE, read_records
from eagle.evaluation.runner import EvalConfig, EvalConfigError, EvalRunner, bank_root, parse_settings
from eagle.settings import Settings
from tests.fake_pipeline import FakePipeline
from tests.synthetic import make_mvtec_like

ray = pytest.importorskip("ray")

from eagle.evaluation.ray_executor import RayEvalRunner, RayOptions  # noqa: E402

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SETTINGS = "baseline,full,full+caas"
CLASS_SIZES = {"big": 30, "small1": 4, "small2": 4}
N_IMAGES = sum(CLASS_SIZES.values())


class SlowFakePipeline(FakePipeline):
    """The fake pipeline with a fixed cost per image, so that dispatch order and timing matter."""

    def __init__(self, data_dir: Path, *, delay: float = 0.0, **kwargs) -> None:
        super().__init__(data_dir, **kwargs)
        self.delay = delay

    def run_expert(self, image, bank):
        time.sleep(self.delay)
        return super().run_expert(image, bank)


@dataclass
class FakeFactory:
    """Builds the fake pipeline on every Ray worker (importable there: PYTHONPATH holds the repository)."""

    delay: float = 0.0

    def __call__(self, settings: Settings) -> SlowFakePipeline:
        return SlowFakePipeline(settings.data_dir, mllm_enabled=settings.mllm.enabled, delay=self.delay)


def _config(data_root: Path, out: Path) -> EvalConfig:
    return EvalConfig(dataset="mvtec", root=data_root, out=out, settings=parse_settings(SETTINGS), progress=False)


def run_ray(data_root: Path, out: Path, *, delay: float = 0.0, actors: int = 2) -> tuple[dict | None, RayEvalRunner]:
    """One Ray evaluation with two actors of half a CPU each (a CPU stays free for the bank tasks)."""
    runner = RayEvalRunner(
        Settings(expert={"weights": "random"}),
        _config(data_root, out),
        options=RayOptions(actors=actors, cpus_per_actor=0.5, bank_cpus=1.0),
        pipeline_factory=FakeFactory(delay),
    )
    report = runner.run()
    return report, runner


def _rows(out: Path) -> set[str]:
    """Every record as canonical JSON without its timings, one per (kind, key, setting)."""
    rows = set()
    for record in read_records(out / RECORDS_FILE):
        data = record.model_dump(mode="json", exclude={"timings_ms"})
        rows.add(json.dumps(data, sort_keys=True))
    return rows


def _keys(out: Path) -> list[tuple]:
    return [(r.kind, r.key, getattr(r, "setting", None)) for r in read_records(out / RECORDS_FILE)]


@pytest.fixture(scope="module")
def ray_address():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-data")
    make_mvtec_like(root, category="big", n_train=3, n_test_good=6, n_test_bad_per_type=8, sizes=((32, 32),), seed=1)
    for seed, name in enumerate(("small1", "small2"), start=2):
        small = {"n_train": 3, "n_test_good": 1, "n_test_bad_per_type": 1, "sizes": ((32, 40),)}
        make_mvtec_like(root, category=name, seed=seed, **small)
    return root


@pytest.fixture(scope="module")
def local_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("local") / "out"
    config = _config(data_root, out)
    report = EvalRunner(
        FakePipeline(bank_root(config), mllm_enabled=True), Settings(expert={"weights": "random"}), config
    ).run()
    return out, report


def test_same_records_maps_and_report_as_local_and_work_spreads(
    ray_address: str, data_root: Path, local_run: tuple[Path, dict], tmp_path: Path
) -> None:
    local_out, local_report = local_run
    out = tmp_path / "ray"
    report, runner = run_ray(data_root, out, delay=0.2)
    assert _rows(out) == _rows(local_out)
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == N_IMAGES * (1 + len(SETTINGS.split(",")))
    assert report["metrics"] == local_report["metrics"]
    assert report["meta"]["datasets"]["mvtec"]["complete"]
    # the maps the driver wrote are the local executor's, byte for byte
    local_maps = {p.relative_to(local_out): p.read_bytes() for p in (local_out / "maps").rglob("*.npz")}
    ray_maps = {p.relative_to(out): p.read_bytes() for p in (out / "maps").rglob("*.npz")}
    assert ray_maps == local_maps and len(ray_maps) == N_IMAGES
    # Dynamic dispatch: the big class is split between the actors, and both are still busy at the end (class-wise
    # shards would give one actor 30 images and the other 8, the last ones all on one actor). An actor that starts
    # later than the other (process start-up under load) can only do fewer, so the test looks at the tail.
    assert sum(runner.per_actor) == N_IMAGES and len(runner.per_actor) == 2
    assert min(runner.per_actor) >= 3, runner.per_actor
    big_by_actor = Counter(index for key, index in runner.assigned.items() if key.startswith("big/"))
    assert len(big_by_actor) == 2, big_by_actor
    tail = Counter(list(runner.assigned.values())[-10:])  # the last ten images to finish
    assert min(tail[0], tail[1]) >= 3, (tail, runner.per_actor)
    banks = json.loads((out / "banks.json").read_text())
    assert sorted(banks) == sorted(CLASS_SIZES) and not any(b["reused"] for b in banks.values())
    # a second run finds everything done: no image is dispatched, banks come from the cache
    _, again = run_ray(data_root, out)
    assert sum(again.per_actor) == 0 and _keys(out) == keys


@dataclass
class ScriptedFactory:
    """Builds the MMAD test's scripted fake pipeline on every Ray worker (its replies are fixed per question)."""

    def __call__(self, settings: Settings):
        from tests.test_eval_mmad import ScriptedPipeline

        return ScriptedPipeline(settings.data_dir, mllm_enabled=settings.mllm.enabled)


def test_mmad_every_question_type_gives_the_local_records_and_mmads_table(ray_address: str, tmp_path: Path) -> None:
    """``--mmad-questions all`` through Ray: the same question records and MMAD per-type table as the local run."""
    from eagle.evaluation.cli import build_config
    from tests.test_eval_mmad import _eval_args, _run, make_tree

    mmad, mvtec = make_tree(tmp_path)
    extra = ("--settings", "full", "--mmad-questions", "all", "--bank-root", f"DS-MVTec={mvtec}")
    local_report, _ = _run(mmad, tmp_path / "local", *extra)
    config = build_config(_eval_args(mmad, tmp_path / "ray", *extra))
    runner = RayEvalRunner(
        Settings(expert={"weights": "random"}),
        config,
        options=RayOptions(actors=2, cpus_per_actor=0.5, bank_cpus=1.0),
        pipeline_factory=ScriptedFactory(),
    )
    report = runner.run()
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    table = report["metrics"]["mmad"]["mmad_table"]["full"]["drop"]
    assert table == local_report["metrics"]["mmad"]["mmad_table"]["full"]["drop"]
    assert table["rows"]["DS-MVTec"]["Average"] == pytest.approx(575 / 7)  # the hand computation of test_eval_mmad
    assert table["rows"]["VisA"]["Average"] == pytest.approx(250 / 3)


DRIVER = """
import sys
from pathlib import Path
import ray
ray.init(address=sys.argv[1], log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": sys.argv[4]}})
from tests.test_eval_ray import run_ray
run_ray(Path(sys.argv[2]), Path(sys.argv[3]), delay=0.3)
"""


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_without_redoing_rows(
    ray_address: str, data_root: Path, local_run: tuple[Path, dict], tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    records = out / RECORDS_FILE
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    args = [sys.executable, "-c", DRIVER, ray_address, str(data_root), str(out), str(REPO)]
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            if records.exists() and records.read_bytes().count(b"\n") >= 3 * 4:  # 3+ images (4 rows each)
                break
            time.sleep(0.1)
        assert driver.poll() is None, f"the driver ended before it was killed: {driver.stderr.read().decode()[-2000:]}"
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL
    before = read_records(records)
    answered = {(r.key, r.setting) for r in before if r.kind == "answer"}
    names = SETTINGS.split(",")
    finished = {r.key for r in before if r.kind == "expert" and all((r.key, s) in answered for s in names)}
    assert 2 <= len(finished) < N_IMAGES
    banks_before = json.loads((out / "banks.json").read_text())
    assert {key.split("/")[0] for key in finished} <= set(banks_before)
    report, runner = run_ray(data_root, out)
    assert sum(runner.per_actor) == N_IMAGES - len(finished)  # finished images are not evaluated again
    assert not finished & set(runner.assigned)
    keys = _keys(out)
    assert len(keys) == len(set(keys)), "a row was written twice"
    local_out, local_report = local_run
    assert _rows(out) == _rows(local_out)
    assert report["metrics"] == local_report["metrics"]
    banks = json.loads((out / "banks.json").read_text())
    # Banks built before the kill come from the cache; a class whose images were all finished before the kill
    # gets no bank task at all, so its entry stays as the killed run wrote it.
    resumed_classes = {key.split("/")[0] for key in runner.assigned}
    rebuilt = [name for name in banks_before if name in resumed_classes and not banks[name]["reused"]]
    assert rebuilt == []
    assert all(banks[name] == banks_before[name] for name in banks_before if name not in resumed_classes)


def test_actor_plan_from_cluster_resources() -> None:
    def plan(options: RayOptions, resources: dict, *, device: str = "auto", n_images: int = 100) -> tuple:
        runner = SimpleNamespace(options=options, settings=Settings(mllm={"device": device}))
        fake_ray = SimpleNamespace(cluster_resources=lambda: resources)
        return RayEvalRunner._plan_actors(runner, fake_ray, n_images)

    assert plan(RayOptions(), {"CPU": 32, "GPU": 4}) == (4, 1.0, 1.0)  # one actor per GPU
    assert plan(RayOptions(gpus_per_actor=0.5), {"CPU": 32, "GPU": 4}) == (8, 0.5, 1.0)
    assert plan(RayOptions(), {"CPU": 32, "GPU": 4}, device="cpu") == (31, 0.0, 1.0)  # a CPU left for bank tasks
    assert plan(RayOptions(), {"CPU": 8}) == (7, 0.0, 1.0)
    assert plan(RayOptions(), {"CPU": 8}, n_images=3) == (3, 0.0, 1.0)  # never more actors than images
    assert plan(RayOptions(actors=2, cpus_per_actor=0.5), {"CPU": 2}) == (2, 0.0, 0.5)
    for bad in ({"actors": 0}, {"gpus_per_actor": -1.0}, {"cpus_per_actor": -0.5}):
        with pytest.raises(EvalConfigError):
            RayOptions(**bad)


def test_cli_options(monkeypatch: pytest.MonkeyPatch, data_root: Path, tmp_path: Path) -> None:
    from eagle.cli import build_parser
    from eagle.errors import CommandError
    from eagle.evaluation import cli, ray_executor

    seen = {}

    class Recorder:
        def __init__(self, settings, config, *, options):
            seen.update(options=options, config=config)

        def run(self):
            raise EvalConfigError("stop here")

    monkeypatch.setattr(ray_executor, "RayEvalRunner", Recorder)
    base = ["eval", "--dataset", "mvtec", "--root", str(data_root), "--out", str(tmp_path / "o"), "--no-progress"]
    args = build_parser().parser.parse_args([*base, "--executor", "ray", "--address", "auto", "--actors", "3"])
    with pytest.raises(CommandError, match="stop here"):
        cli.run_eval(args, Settings(expert={"weights": "random"}))
    assert seen["options"] == RayOptions(address="auto", actors=3)
    args = build_parser().parser.parse_args([*base, "--address", "auto"])
    with pytest.raises(CommandError, match="need --executor ray"):
        cli.run_eval(args, Settings(expert={"weights": "random"}))
    assert build_parser().parser.parse_args(base).executor == "local"


def test_an_unreachable_cluster_address_fails_fast_with_its_name():
    """``ray.init`` retries an unreachable address for minutes; the executor refuses it at once instead."""
    from eagle.evaluation.ray_executor import _check_reachable

    start = time.monotonic()
    with pytest.raises(EvalConfigError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:1'"):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(EvalConfigError, match="ray://127.0.0.1:1"):
        _check_reachable("ray://127.0.0.1:1")
    assert time.monotonic() - start < 5
    _check_reachable("auto")  # left to Ray
    _check_reachable(None)


def test_actor_scratch_removes_only_dead_actors_folders_of_this_host(tmp_path: Path) -> None:
    """Killed actors cannot remove their scratch folder; the next actor on the host does, and nothing else."""
    import socket

    from eagle.evaluation.ray_executor import ACTOR_SCRATCH_PREFIX, actor_scratch

    host = socket.gethostname().replace("-", "_")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # that process has exited
    dead = tmp_path / f"{ACTOR_SCRATCH_PREFIX}{host}-{dead_pid}-abc"
    alive = tmp_path / f"{ACTOR_SCRATCH_PREFIX}{host}-{os.getpid()}-def"
    other_host = tmp_path / f"{ACTOR_SCRATCH_PREFIX}elsewhere-{dead_pid}-ghi"
    unrelated = tmp_path / "eagle-eval-actor-notes"
    for folder in (dead, alive, other_host, unrelated):
        folder.mkdir()
        (folder / "map.npz").write_bytes(b"x")

    mine = actor_scratch(tmp_path)
    assert not dead.exists() and alive.exists() and other_host.exists() and unrelated.exists()
    assert mine.is_dir() and mine.name.startswith(f"{ACTOR_SCRATCH_PREFIX}{host}-{os.getpid()}-")
