"""The Kubernetes manifests in deploy/k8s, checked offline (no cluster, no kustomize needed).

* Every kustomization is rendered by a small renderer here (resources, namespace, images, strategic-merge
  patches: exactly the features the manifests use; anything else fails the test) and, where ``kubectl`` is
  installed, compared with ``kubectl kustomize``.
* Built-in kinds are validated against the Kubernetes OpenAPI schemas shipped in the ``kubernetes-validate``
  wheel, in strict mode (unknown fields fail), for the oldest and newest Kubernetes versions we claim.
* Custom resources (ServiceMonitor, RayCluster) have no schema offline: their pod templates are validated as
  ``PodTemplate`` objects and the rest against a strict subset of the operators' CRD schemas written here.
* The wiring: probes on /healthz and /readyz, the token file and the CLI that reads it, volumes and env, the
  Service and ServiceMonitor selectors, resource requests against docs/models.md and the measured expert peak,
  and the startup probe's script itself, run against a stub /readyz.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "overlays/gpu", "monitoring", "ray")
K8S_VERSIONS = ("1.29.0", "1.37.0")
BUILTIN = {("v1", "PersistentVolumeClaim"), ("v1", "Service"), ("apps/v1", "Deployment")}

# -------------------------------------------------------------------------------------------- a tiny kustomize
#: Strategic-merge keys of the lists the patches touch (the rest are replaced, as in Kubernetes).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name", "ports": "name"}
MERGE_KEYS["volumeMounts"] = "mountPath"
SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}


def strategic_merge(base, patch, field: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
            if match is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[match] = strategic_merge(merged[match], item)
        return merged
    return copy.deepcopy(patch)


def _pod_specs(resource: dict) -> list[dict]:
    spec = resource.get("spec", {})
    if resource["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    if resource["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return []


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    assert not unknown, f"{directory}: the test's renderer does not implement {sorted(unknown)}"
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources += render(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only file patches are implemented: {patch_entry}"
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        targets = [
            i
            for i, r in enumerate(resources)
            if (r["kind"], r["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        assert len(targets) == 1, f"patch {patch_entry['path']} matches {len(targets)} resources"
        resources[targets[0]] = strategic_merge(resources[targets[0]], patch)
    for image in kustomization.get("images", []):
        for resource in resources:
            for pod in _pod_specs(resource):
                for container in pod.get("containers", []):
                    name, _, tag = container["image"].partition(":")
                    if name == image["name"]:
                        container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if "namespace" in kustomization:
        for resource in resources:
            resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


def _canonical(value):
    """Order-insensitive form: lists of named objects become dicts by name (kustomize reorders merged lists)."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(v, dict) and ("name" in v or "mountPath" in v) for v in value):
            return {v.get("name", v.get("mountPath")): _canonical(v) for v in value}
        return [_canonical(v) for v in value]
    return value


def _by_kind(resources: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[tuple[str, str], dict]]:
    return {name: _by_kind(render(K8S / name)) for name in KUSTOMIZATIONS}


def _container(rendered, overlay: str) -> dict:
    return rendered[overlay][("Deployment", "eagle-edge")]["spec"]["template"]["spec"]["containers"][0]


# -------------------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_builtin_resources_validate_against_the_kubernetes_schemas(rendered, overlay: str) -> None:
    resources = rendered[overlay]
    validated = 0
    for resource in resources.values():
        if (resource["apiVersion"], resource["kind"]) in BUILTIN:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(resource, version, strict=True)
            validated += 1
        for pod in _pod_specs(resource):  # custom resources too: their pod templates are plain pod specs
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": {"spec": pod}}
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(template, version, strict=True)
    assert validated or overlay == "monitoring"


def test_the_validator_does_catch_mistakes(rendered) -> None:
    deployment = copy.deepcopy(rendered["base"][("Deployment", "eagle-edge")])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(rendered["base"][("Deployment", "eagle-edge")])
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def _strict(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_META = {"type": "object", "required": ["name"]}
_SECRET_KEY = _strict({"name": _STR, "key": _STR, "optional": _BOOL}, ("key",))
#: A strict subset of prometheus-operator's ServiceMonitor CRD (monitoring.coreos.com/v1): the fields used here.
SERVICE_MONITOR = _strict(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _META,
        "spec": _strict(
            {
                "selector": _strict({"matchLabels": {"type": "object", "additionalProperties": _STR}}),
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "port": _STR,
                            "path": _STR,
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "authorization": _strict({"type": _STR, "credentials": _SECRET_KEY}),
                        },
                        ("port",),
                    ),
                },
            },
            ("selector", "endpoints"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)
_GROUP = {"rayStartParams": {"type": "object", "additionalProperties": _STR}, "template": {"type": "object"}}
#: A strict subset of KubeRay's RayCluster CRD (ray.io/v1).
RAY_CLUSTER = _strict(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": _META,
        "spec": _strict(
            {
                "rayVersion": _STR,
                "enableInTreeAutoscaling": _BOOL,
                "headGroupSpec": _strict({**_GROUP, "serviceType": _STR}, ("rayStartParams", "template")),
                "workerGroupSpecs": {
                    "type": "array",
                    "items": _strict(
                        {**_GROUP, "groupName": _STR, "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT},
                        ("groupName", "rayStartParams", "template"),
                    ),
                },
            },
            ("headGroupSpec",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)


def test_custom_resources_match_a_strict_subset_of_their_crds(rendered) -> None:
    monitor = rendered["monitoring"][("ServiceMonitor", "eagle-edge")]
    jsonschema.validate(monitor, SERVICE_MONITOR)
    cluster = rendered["ray"][("RayCluster", "eagle-eval")]
    jsonschema.validate(cluster, RAY_CLUSTER)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**monitor, "spec": {**monitor["spec"], "endpoint": []}}, SERVICE_MONITOR)
    pins = re.findall(r"^ray==([0-9.]+)$", (REPO / "requirements-dev.txt").read_text(), re.M)
    assert pins == [cluster["spec"]["rayVersion"]]  # the cluster's Ray is the one the executor is tested with


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_renderer_agrees_with_kubectl_kustomize(rendered, overlay: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    theirs = _by_kind([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    assert _canonical(theirs) == _canonical(rendered[overlay])


# -------------------------------------------------------------------------------------------- wiring
def _quantity(text: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units[unit]


def test_probes_token_volumes_and_service(rendered) -> None:
    from eagle.cli import build_parser

    for overlay in ("base", "overlays/gpu"):
        resources = rendered[overlay]
        deployment = resources[("Deployment", "eagle-edge")]
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= (900 if "gpu" in overlay else 300)
        # the command is one the real CLI accepts, and its token file lies in the mounted Secret
        command = container["command"]
        args = build_parser().parser.parse_args(command[1:])
        assert command[0] == "eagle" and args.command == "serve"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        token_dir = mounts["token"]["mountPath"]
        assert str(args.token_file) == f"{token_dir}/{volumes['token']['secret']['items'][0]['path']}"
        assert mounts["token"]["readOnly"] and volumes["token"]["secret"]["secretName"] == "eagle-edge-token"
        assert not any("TOKEN" in e["name"] for e in container["env"])  # never in the environment
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["EAGLE_DATA_DIR"] == mounts["data"]["mountPath"]
        assert env["HF_HOME"].startswith(mounts["models"]["mountPath"] + "/")
        assert env["EAGLE_SERVICE__HOST"] == "0.0.0.0"
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > float(env["EAGLE_SERVICE__SHUTDOWN_TIMEOUT_S"])
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
        assert claims == {name for kind, name in resources if kind == "PersistentVolumeClaim"}
        # the Service reaches the pods' named port
        service = resources[("Service", "eagle-edge")]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
        assert {p["containerPort"] for p in container["ports"]} == {int(env["EAGLE_SERVICE__PORT"])}
        # the image's user
        uid = re.search(r"--uid (\d+)", (REPO / "Dockerfile").read_text())
        if uid:
            assert pod["securityContext"]["runAsUser"] == int(uid.group(1))
    base, gpu = _container(rendered, "base"), _container(rendered, "overlays/gpu")
    assert "nvidia.com/gpu" not in base["resources"]["limits"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == gpu["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {e["name"]: e["value"] for e in base["env"]}["EAGLE_MLLM__ENABLED"] == "false"
    assert {e["name"]: e["value"] for e in gpu["env"]}["EAGLE_MLLM__ENABLED"] == "true"
    assert base["image"].split(":")[0] != gpu["image"].split(":")[0]


def test_env_parses_as_eagle_settings(rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    from eagle.settings import Settings

    for overlay in ("base", "overlays/gpu"):
        for name in [n for n in os.environ if n.startswith("EAGLE_")]:
            monkeypatch.delenv(name)
        for item in _container(rendered, overlay)["env"]:
            monkeypatch.setenv(item["name"], item["value"])
        settings = Settings(_env_file=None)
        assert str(settings.data_dir) == "/data" and settings.service.port == 8080
        assert settings.mllm.enabled == (overlay != "base")


def _models_table() -> dict[str, tuple[float, float]]:
    """docs/models.md's presets table: preset -> (4-bit GiB, bf16 GiB)."""
    table = {}
    for line in (REPO / "docs" / "models.md").read_text().splitlines():
        match = re.match(r"\| `([^`]+)`.*\| ≈ ([0-9.]+) / ([0-9.]+) GiB \|$", line)
        if match:
            table[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    return table


def test_resources_match_docs_models_and_the_measured_expert(rendered) -> None:
    gib = 2**30
    results = json.loads((REPO / "bench" / "results" / "expert-2026-11-25.json").read_text())
    expert_peak = max(run["peak_rss_mb"]["after_build"] for run in results["runs"] if run["impl"] == "eagle") * 2**20
    base = _container(rendered, "base")["resources"]
    assert _quantity(base["requests"]["memory"]) >= expert_peak  # building a 200-reference bank fits the request
    assert _quantity(base["limits"]["memory"]) >= 1.5 * expert_peak
    gpu = _container(rendered, "overlays/gpu")
    env = {e["name"]: e["value"] for e in gpu["env"]}
    four_bit, bf16 = _models_table()[env["EAGLE_MLLM__PRESET"]]
    assert env.get("EAGLE_MLLM__QUANTIZATION", "auto") in ("auto", "4bit")  # 4-bit on CUDA: one 12 GB GPU
    memory = gpu["resources"]["requests"]["memory"]
    assert _quantity(memory) >= expert_peak + 4 * gib  # the expert's peak + a checkpoint shard while quantising
    models_pvc = rendered["overlays/gpu"][("PersistentVolumeClaim", "eagle-models")]
    assert _quantity(models_pvc["spec"]["resources"]["requests"]["storage"]) >= 1.5 * bf16 * gib  # bf16 files
    assert four_bit + 2 <= 12  # docs: "the default preset in 4-bit fits a 12 GB card" (weights + 1-2 GiB)


def test_service_monitor_scrapes_the_service_with_the_token(rendered) -> None:
    monitor = rendered["monitoring"][("ServiceMonitor", "eagle-edge")]
    service = rendered["base"][("Service", "eagle-edge")]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]  # the Secret must be beside it
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    volumes = rendered["base"][("Deployment", "eagle-edge")]["spec"]["template"]["spec"]["volumes"]
    secret = next(v["secret"] for v in volumes if "secret" in v)
    assert endpoint["authorization"]["credentials"] == {"name": secret["secretName"], "key": secret["items"][0]["key"]}


#: A strict subset of prometheus-operator's PrometheusRule CRD (monitoring.coreos.com/v1): the fields used here.
PROMETHEUS_RULE = _strict(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _META,
        "spec": _strict(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "name": _STR,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": _strict(
                                    {
                                        "alert": _STR,
                                        "expr": _STR,
                                        "for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d))+$"},
                                        "labels": {"type": "object", "additionalProperties": _STR},
                                        "annotations": {"type": "object", "additionalProperties": _STR},
                                    },
                                    ("alert", "expr"),
                                ),
                            },
                        },
                        ("name", "rules"),
                    ),
                }
            },
            ("groups",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)


def test_line_health_alerts_use_series_the_service_exports(rendered) -> None:
    from deploy.metrics import ServiceMetrics
    from eagle.line_health import LineHealth

    rule = rendered["monitoring"][("PrometheusRule", "eagle-line-health")]
    jsonschema.validate(rule, PROMETHEUS_RULE)
    monitor = rendered["monitoring"][("ServiceMonitor", "eagle-edge")]
    assert rule["metadata"]["namespace"] == monitor["metadata"]["namespace"]
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
    health = LineHealth.model_validate(
        {
            **dict.fromkeys(LineHealth.model_fields),
            "bank": "b",
            "bank_id": "0" * 16,
            "state": "drifting",
            "level": 2,
            "reason": "r",
            "n_references": 30,
            "n_recent": 200,
            "tau": 1.0,
            "median_shift": 2.5,
            "train_scores": [],
            "recent": [],
        }
    )
    exported = ServiceMetrics(line_health=lambda: [health]).render()
    assert 'eagle_line_health_state{bank="b"} 2.0' in exported
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            series = re.match(r"^([a-z_]+)\b", alert["expr"]).group(1)
            assert f"# TYPE {series} gauge" in exported, alert["alert"]
    states = {alert["alert"]: int(alert["expr"].rsplit("==", 1)[1]) for alert in rule["spec"]["groups"][0]["rules"]}
    assert states == {"EagleLineDrifting": 2, "EagleLineWatch": 1, "EagleBankTooFewReferences": -2}


def test_ray_cluster_shares_one_volume_and_has_gpu_workers(rendered) -> None:
    cluster = rendered["ray"][("RayCluster", "eagle-eval")]
    pvc = rendered["ray"][("PersistentVolumeClaim", "eagle-eval-shared")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = _pod_specs(cluster)
    for pod in pods:
        container = pod["containers"][0]
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/shared"}
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs only the driver
    assert pods[1]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


# -------------------------------------------------------------------------------------------- the startup probe
class _Readyz(http.server.BaseHTTPRequestHandler):
    status, body = 200, {}

    def do_GET(self) -> None:  # noqa: N802
        data = json.dumps(self.body).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "checks", "started"),
    [
        (200, {"banks": True, "mllm": True, "worker": True, "warm_up": True}, True),
        (503, {"banks": False, "mllm": True, "worker": True, "warm_up": True}, True),  # a fresh box: no bank yet
        (503, {"banks": True, "mllm": False, "worker": True, "warm_up": False}, False),  # still loading the MLLM
        (503, {"banks": False, "worker": True, "warm_up": False}, False),
        (None, None, False),  # nothing listening yet
    ],
)
def test_startup_probe_script(rendered, status, checks, started) -> None:
    command = _container(rendered, "overlays/gpu")["startupProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    handler = type("Handler", (_Readyz,), {"status": status or 200, "body": {"checks": checks}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()  # the port is free again: connection refused
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"EAGLE_SERVICE__PORT": str(port), "PATH": "/usr/bin:/bin"}
        result = subprocess.run([sys.executable, "-c", command[2]], env=env, timeout=30, check=False)
        assert (result.returncode == 0) == started
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
