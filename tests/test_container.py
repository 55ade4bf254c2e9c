"""The container's entry commands, run exactly as the Dockerfile writes them, in this environment.

Without a Docker engine the Dockerfile is parsed (stages, inherited ENV, CMD/ENTRYPOINT, HEALTHCHECK) and each
target's command is executed as a subprocess with the container's environment, changed only where this machine
differs (the /data and /models volume paths, a free port on loopback, a random-weight expert, no MLLM). Then
the server must answer, and the HEALTHCHECK command must pass against it and fail after it.

The real image is built and run by ``deploy/container-smoke.sh``: ``test_container_smoke_script`` (marker
``container``) runs it, only when asked for (``EAGLE_CONTAINER_TESTS=1``: minutes, gigabytes) and a Docker daemon
answers:  ``EAGLE_CONTAINER_TESTS=1 .venv/bin/python -m pytest -m container``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@dataclass
class Stage:
    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    volumes: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    healthcheck: list[str] | None = None
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    stopsignal: str | None = None


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def _exec_form(text: str) -> list[str]:
    value = json.loads(text)  # exec form only: a shell form would run under /bin/sh -c with other semantics
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def parse_dockerfile(path: Path) -> dict[str, Stage]:
    """Stages by name, with ENV/USER/VOLUME/HEALTHCHECK/CMD inherited from the parent stage."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in _logical_lines(path.read_text()):
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), flags=re.IGNORECASE)
            assert match, line
            base, name = match.group(1), match.group(2) or f"stage{len(stages)}"
            parent = stages.get(base)
            current = Stage(name=name, base=base)
            if parent is not None:
                current.env = dict(parent.env)
                current.user, current.volumes = parent.user, list(parent.volumes)
                current.cmd, current.entrypoint = parent.cmd, parent.entrypoint
                current.healthcheck = parent.healthcheck
                current.stopsignal = parent.stopsignal
            stages[name] = current
        elif instruction == "ENV":
            assert current is not None
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env = current.env
                current.env[key] = re.sub(
                    r"\$(\w+)|\$\{(\w+)\}", lambda m, env=env: env.get(m[1] or m[2], f"${m[1] or m[2]}"), value
                )
        elif instruction == "USER":
            current.user = rest.strip()
        elif instruction == "VOLUME":
            current.volumes += _exec_form(rest) if rest.strip().startswith("[") else rest.split()
        elif instruction == "EXPOSE":
            current.expose += rest.split()
        elif instruction == "CMD":
            current.cmd = _exec_form(rest)
        elif instruction == "ENTRYPOINT":
            current.entrypoint = _exec_form(rest)
        elif instruction == "STOPSIGNAL":
            current.stopsignal = rest.strip()
        elif instruction == "HEALTHCHECK":
            options, _, command = rest.partition(" CMD ")
            current.healthcheck_options = dict(o.lstrip("-").split("=", 1) for o in options.split())
            current.healthcheck = _exec_form(command)
    return stages


STAGES = parse_dockerfile(REPO / "Dockerfile")


def entry_command(stage: Stage) -> list[str]:
    return [*(stage.entrypoint or []), *(stage.cmd or [])]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def container_env(stage: Stage, tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The stage's ENV as the container would see it, with this machine's paths and a tiny offline setup."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EAGLE_", "HF_"))}
    for key, value in stage.env.items():
        value = value.replace("/data", str(tmp_path / "data")).replace("/models", str(tmp_path / "models"))
        env[key] = value.replace("/opt/venv/bin", str(VENV_BIN)).replace("$PATH", os.environ["PATH"])
    env.update(
        {
            "EAGLE_MLLM__ENABLED": "false",
            "EAGLE_EXPERT__WEIGHTS": "random",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(overrides)
    return env


def run_until_answers(command: list[str], env: dict[str, str], url: str, log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115 - closed by stop()
    process = subprocess.Popen(command, env=env, cwd=log.parent, stdout=handle, stderr=subprocess.STDOUT)
    process.log_handle = handle  # type: ignore[attr-defined]
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, f"{command} exited {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{command} never answered:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def stop(process: subprocess.Popen, log: Path) -> str:
    """SIGTERM (``docker stop``): the server must shut down gracefully, then exit.

    uvicorn re-raises the caught SIGTERM once its shutdown is complete, so the exit status is "killed by
    SIGTERM" (143 in Docker, which ``docker stop`` expects) or 0; the log proves the shutdown ran to the end.
    """
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(60)
    finally:
        process.log_handle.close()  # type: ignore[attr-defined]
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]
    return log.read_text()


def healthcheck(stage: Stage, env: dict[str, str]) -> int:
    return subprocess.run(stage.healthcheck, env=env, capture_output=True, timeout=60).returncode


# -- the Dockerfile itself -----------------------------------------------------------------------------------------
def test_dockerfile_targets_base_user_volumes_and_requirements():
    assert {"wheels", "base", "deps", "build", "runtime", "edge", "app"} <= set(STAGES)
    text = (REPO / "Dockerfile").read_text()
    # One Debian bookworm base for CPU and GPU images (PyPI's wheels bring CUDA): a public one by default, any
    # bookworm image (a local debootstrap import where no registry answers) by --build-arg; no CUDA base, no PPA.
    assert re.fullmatch(r"\$\{BASE_IMAGE\}", STAGES["base"].base)
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, flags=re.MULTILINE)
    assert "nvidia/cuda" not in text and "ppa" not in text.lower() and not text.startswith("# syntax=")
    assert re.search(r"apt-get install -y --no-install-recommends [^\n]*\bpython3\b", text)
    assert "python3-venv" in text and "python3 -m venv /opt/venv" in text
    # Wheels: the index by default; only a given local wheel directory (an image, or a buildx named context).
    assert re.search(r"^ARG WHEELS_IMAGE=scratch$", text, flags=re.MULTILINE)
    assert STAGES["wheels"].base == "${WHEELS_IMAGE}"
    assert "--mount=type=bind,from=wheels,target=/wheels" in text
    assert "--no-index --find-links /wheels" in text and "/opt/venv/bin/pip install $from -r ${REQUIREMENTS}" in text
    # The proxy's CA bundle is a build secret, never a layer.
    assert "--mount=type=secret,id=pip_cert" in text and "PIP_CERT=/run/secrets/pip_cert" in text
    instructions = "\n".join(_logical_lines(text))
    assert "COPY --from=wheels" not in instructions and "ca-certificates.crt" not in instructions
    assert re.search(r"ARG REQUIREMENTS=requirements-gpu.txt", text)
    for name in ("requirements-base.txt", "requirements.txt", "requirements-gpu.txt"):
        assert (REPO / name).is_file() and name in text
    # The dependencies are one layer copied from `deps`; EAGLE's own wheel (from `build`) is a small one on top.
    assert "COPY --from=deps /opt/venv /opt/venv" in text and "from=build,source=/dist" in text
    for target, command, probe in (("edge", ["eagle", "serve"], "edge"), ("app", ["eagle", "app"], "app")):
        stage = STAGES[target]
        assert stage.user == "eagle"  # non-root, inherited from runtime
        assert set(stage.volumes) == {"/models", "/data"}
        assert stage.env["EAGLE_DATA_DIR"] == "/data" and stage.env["HF_HOME"].startswith("/models")
        assert entry_command(stage) == command
        assert stage.healthcheck == ["python", "-m", "deploy.healthcheck", probe]
        assert {"interval", "timeout", "start-period", "retries"} <= set(stage.healthcheck_options)
        assert stage.stopsignal == "SIGTERM"
    assert STAGES["edge"].expose == ["8080"] and STAGES["app"].expose == ["7860"]


def test_compose_reserves_a_gpu_and_uses_the_targets():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    edge = compose["services"]["edge"]
    devices = edge["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert edge["build"]["target"] == "edge" and compose["services"]["app"]["build"]["target"] == "app"
    assert edge["command"][:2] == entry_command(STAGES["edge"])  # the image's command, plus --token-file
    assert {"eagle-models:/models", "eagle-data:/data"} <= set(edge["volumes"])
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "README.md" not in ignored  # pyproject's readme


# -- running them -----------------------------------------------------------------------------------------------------
def test_edge_command_refuses_the_containers_open_address_without_a_token(tmp_path):
    stage = STAGES["edge"]
    env = container_env(stage, tmp_path)  # EAGLE_SERVICE__HOST=0.0.0.0 from the image, and no token
    assert env["EAGLE_SERVICE__HOST"] == "0.0.0.0"
    done = subprocess.run(entry_command(stage), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in done.stderr
    assert "Traceback" not in done.stderr


def test_edge_command_starts_answers_and_stops_gracefully(tmp_path):
    stage = STAGES["edge"]
    port = free_port()
    env = container_env(stage, tmp_path, EAGLE_SERVICE__HOST="127.0.0.1", EAGLE_SERVICE__PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    assert healthcheck(stage, env) == 1  # nothing listens yet
    process = run_until_answers(entry_command(stage), env, f"{base}/healthz", tmp_path / "edge.log")
    try:
        assert httpx.get(f"{base}/healthz").json() == {"status": "alive"}
        assert healthcheck(stage, env) == 0
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"  # no bank yet
        assert httpx.get(f"{base}/v1/banks").json() == {"banks": [], "declared": []}
        assert "/v1/inspect" in httpx.get(f"{base}/openapi.json").json()["paths"]
    finally:
        output = stop(process, tmp_path / "edge.log")
    assert "Application shutdown complete" in output and "Traceback" not in output
    assert healthcheck(stage, env) == 1
    assert (tmp_path / "data" / "audit.sqlite3").is_file()  # the /data volume holds the audit log


def test_compose_edge_command_with_a_token_file(tmp_path):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    token_file = tmp_path / "eagle_token"
    token_file.write_text("compose-secret-token-0123456789\n")
    command = [
        str(token_file) if part == "/run/secrets/eagle_token" else part
        for part in compose["services"]["edge"]["command"]
    ]
    port = free_port()
    env = container_env(STAGES["edge"], tmp_path, EAGLE_SERVICE__HOST="127.0.0.1", EAGLE_SERVICE__PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    process = run_until_answers(command, env, f"{base}/healthz", tmp_path / "compose.log")
    try:
        assert httpx.get(f"{base}/v1/banks").status_code == 401
        authorised = httpx.get(f"{base}/v1/banks", headers={"Authorization": "Bearer compose-secret-token-0123456789"})
        assert authorised.status_code == 200
    finally:
        stop(process, tmp_path / "compose.log")


def test_app_command_starts_and_the_page_loads(tmp_path):
    stage = STAGES["app"]
    port = free_port()
    env = container_env(stage, tmp_path, EAGLE_APP__HOST="127.0.0.1", EAGLE_APP__PORT=str(port))
    process = run_until_answers(entry_command(stage), env, f"http://127.0.0.1:{port}/", tmp_path / "app.log")
    try:
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "gradio" in page.text.lower()
        assert healthcheck(stage, env) == 0
    finally:
        stop(process, tmp_path / "app.log")
    assert healthcheck(stage, env) == 1


# -- the real image (deploy/container-smoke.sh) -----------------------------------------------------------------------
def _docker_daemon_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.container
@pytest.mark.skipif(
    os.environ.get("EAGLE_CONTAINER_TESTS") != "1", reason="builds and runs the image: set EAGLE_CONTAINER_TESTS=1"
)
def test_container_smoke_script(tmp_path):
    if not _docker_daemon_answers():
        pytest.skip("no Docker daemon answers `docker info`")
    results = tmp_path / "container.json"
    env = {**os.environ, "RESULTS": os.environ.get("RESULTS", str(results)), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "deploy" / "container-smoke.sh")], env=env, capture_output=True, text=True, timeout=3600
    )
    assert done.returncode == 0, done.stderr[-6000:]
    record = json.loads(Path(env["RESULTS"]).read_text())
    assert record["passed"] and record["run"]["pid1"]["uid"] == 10001
    assert record["run"]["sigterm"]["exit_code"] in (0, 143)
    assert record["run"]["inspections"]["good"]["verdict"] == "no_defect"
    assert record["run"]["inspections"]["defect"]["verdict"] == "defect"


if __name__ == "__main__":  # pragma: no cover - print what the container runs
    for name in ("edge", "app"):
        print(name, entry_command(STAGES[name]), STAGES[name].healthcheck)
    pytest.main([__file__, "-q"])
