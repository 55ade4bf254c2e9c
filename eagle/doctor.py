"""What this installation can do, checked before anyone does work: ``eagle doctor``, ``/readyz`` and the app's header.

Each check is a small function returning a :class:`Check`: its name, ``ok`` / ``warning`` / ``missing``, whether the
CONFIGURED setup needs it, a one-line detail and the exact fix (a download command, a setting, a ``pip install``).
:func:`run_checks` runs them all into a :class:`Report`; the configured setup can run (``Report.runnable``) unless a
check it needs is ``missing``.

The checks never download anything. Weights are looked up where the loaders look (timm's hub repository for the
backbone, :func:`mllm.loading.model_source` for the MLLM) with ``huggingface_hub.try_to_load_from_cache``. Offline
mode (``HF_HUB_OFFLINE=1``) is honoured: the hub is then not contacted at all; otherwise one short probe (2 s by
default) says whether it answers. The MLLM stack is imported only when the MLLM is enabled.

Example:
    >>> from eagle.settings import Settings
    >>> report = run_checks(Settings(expert={"weights": "random"}, mllm={"enabled": False}))  # doctest: +SKIP
    >>> report.runnable, report.get("expert_weights").status  # doctest: +SKIP
    (True, 'warning')
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from eagle.settings import Settings

__all__ = [
    "BACKBONE_DOWNLOAD_MB",
    "MIN_FREE_MB",
    "PROBE_TIMEOUT_S",
    "WARN_FREE_MB",
    "Check",
    "HubState",
    "Report",
    "ReportCache",
    "Status",
    "bitsandbytes_check",
    "disk_check",
    "expert_weights_check",
    "gpu_check",
    "hub_cache_dir",
    "hub_check",
    "hub_offline",
    "hub_state",
    "mllm_weights_check",
    "run_checks",
    "warm_up_skip_reason",
]

Status = Literal["ok", "warning", "missing"]
"""``ok``: works; ``warning``: works with a caveat (slow, downloads first, test-only); ``missing``: cannot work."""

PROBE_TIMEOUT_S = 2.0
"""How long the hub reachability probe waits before calling the hub unreachable."""

MIN_FREE_MB = 256
"""Below this much free space under the data folder a bank cannot be written: ``missing``."""

WARN_FREE_MB = 2048
"""Below this much free space the disk check warns (a bank with its ONNX graph takes ~100-300 MB)."""

BACKBONE_DOWNLOAD_MB = 270
"""Size of the expert backbone's weights download (WideResNet-50-2, safetensors)."""


@dataclass(frozen=True)
class Check:
    """One capability of this installation.

    Attributes:
        name: stable key (``expert_weights``, ``mllm_weights``, ``gpu``, ``bitsandbytes``, ``hub``, ``disk``).
        title: a short label for people.
        status: ``ok``, ``warning`` or ``missing``.
        needed: whether the configured setup needs it (a needed ``missing`` check means it cannot run).
        detail: one line saying what was found.
        fix: the exact step that fixes it (empty when nothing needs fixing).
    """

    name: str
    title: str
    status: Status
    needed: bool
    detail: str
    fix: str = ""

    @property
    def blocking(self) -> bool:
        """True when the configured setup needs this and it is missing."""
        return self.needed and self.status == "missing"

    def to_dict(self) -> dict:
        """A JSON-ready dict (``eagle doctor --json``, ``/readyz``)."""
        return asdict(self)


@dataclass(frozen=True)
class Report:
    """Every :class:`Check` of one run, in a fixed order."""

    checks: tuple[Check, ...]

    @property
    def runnable(self) -> bool:
        """Whether the configured setup can run: no check it needs is missing."""
        return not any(check.blocking for check in self.checks)

    def get(self, name: str) -> Check:
        """The check called ``name``.

        Raises:
            KeyError: no such check.
        """
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def problems(self) -> list[Check]:
        """The checks that are not ``ok``, blocking ones first."""
        shown = [c for c in self.checks if c.status != "ok"]
        return sorted(shown, key=lambda c: (not c.blocking, c.status != "missing"))

    def to_dict(self) -> dict:
        """``{"runnable": bool, "checks": [...]}``."""
        return {"runnable": self.runnable, "checks": [check.to_dict() for check in self.checks]}

    def summary(self) -> str:
        """One line for people: whether it can run and what is missing or limited."""
        blocking = [c.title for c in self.checks if c.blocking]
        limited = [c.title for c in self.checks if not c.blocking and c.status != "ok"]
        if blocking:
            line = "cannot run as configured: " + ", ".join(blocking) + " missing"
        else:
            line = "ready"
        if limited:
            line += "; limited: " + ", ".join(limited)
        return line

    def table(self) -> str:
        """A plain-text table: one row per check (status, needed, detail) and the fix under each problem."""
        width = max(len(c.title) for c in self.checks)
        lines = [f"{'check':<{width}}  status   needed  detail"]
        for c in self.checks:
            lines.append(f"{c.title:<{width}}  {c.status:<7}  {'yes' if c.needed else 'no':<6}  {c.detail}")
            if c.fix and c.status != "ok":
                lines.append(f"{'':<{width}}  fix: {c.fix}")
        lines.append("")
        lines.append(("OK: " if self.runnable else "NOT RUNNABLE: ") + self.summary())
        return "\n".join(lines)


# -- the Hugging Face hub: offline mode, reachability, the cache -----------------------------------------------------
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether offline mode is set (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``, as huggingface_hub reads them)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The hub cache the loaders use: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


@dataclass(frozen=True)
class HubState:
    """Whether weights that are not cached could be downloaded now.

    Attributes:
        offline: offline mode is set (nothing is downloaded; the hub was not contacted).
        reachable: the hub answered the probe (``False`` when offline).
        detail: one line for people.
    """

    offline: bool
    reachable: bool
    detail: str

    @property
    def can_download(self) -> bool:
        """True when a missing file would be downloaded on first use."""
        return self.reachable and not self.offline


def hub_state(timeout_s: float = PROBE_TIMEOUT_S) -> HubState:
    """Offline mode, else one HEAD request to the hub's endpoint with a short timeout (any HTTP answer counts)."""
    if hub_offline():
        detail = "offline mode (HF_HUB_OFFLINE=1): nothing is downloaded, weights come from the cache"
        return HubState(True, False, detail)
    url = _endpoint()
    start = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered: reachable
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or type(err).__name__
        if isinstance(reason, BaseException):
            reason = type(reason).__name__ if not str(reason) else str(reason)
        elapsed = time.monotonic() - start
        return HubState(False, False, f"{url} unreachable after {elapsed:.1f} s ({str(reason)[:80]})")
    return HubState(False, True, f"{url} reachable")


def hub_check(state: HubState) -> Check:
    """The hub: reachable, offline by choice, or unreachable (never needed by itself: the weight checks say)."""
    if state.offline or state.reachable:
        return Check("hub", "Hugging Face hub", "ok", False, state.detail)
    return Check(
        "hub",
        "Hugging Face hub",
        "warning",
        False,
        state.detail + "; weights not in the cache cannot be downloaded",
        "on a machine without internet set HF_HUB_OFFLINE=1 (nothing then waits on the network)",
    )


def _cached(repo: str, filename: str, revision: str | None = None) -> str | None:
    """The cached file's path, or ``None`` (huggingface_hub's own cache lookup; never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(hub_cache_dir()), revision=revision)
    return found if isinstance(found, str) else None


# -- the checks ------------------------------------------------------------------------------------------------------
def expert_weights_check(settings: Settings, hub: HubState) -> Check:
    """The expert backbone's weights: in the hub cache, a local file, or random (allowed by settings)."""
    expert = settings.expert
    title = "Expert weights"
    if expert.weights == "random":
        return Check(
            "expert_weights",
            title,
            "warning",
            True,
            "random weights (EAGLE_EXPERT__WEIGHTS=random): banks work but mean nothing; for tests and smoke runs",
            "for real inspection set EAGLE_EXPERT__WEIGHTS=hub (the default) with the weights in the cache",
        )
    if expert.weights == "file":
        path = Path(expert.weights_path).expanduser()
        if path.suffix.lower() == ".safetensors" and path.is_file():
            return Check("expert_weights", title, "ok", True, f"local file {path}")
        return Check(
            "expert_weights",
            title,
            "missing",
            True,
            f"EAGLE_EXPERT__WEIGHTS_PATH={str(path)!r} is not an existing .safetensors file",
            "download model.safetensors of the backbone and point EAGLE_EXPERT__WEIGHTS_PATH at it",
        )
    from expert.weights import HUB_WEIGHT_FILES, BackboneWeightsError, hub_weights_source

    try:
        repo, revision = hub_weights_source(expert.backbone)
    except BackboneWeightsError as err:
        return Check("expert_weights", title, "missing", True, str(err), "set EAGLE_EXPERT__BACKBONE to a timm model")
    for filename in HUB_WEIGHT_FILES:
        path = _cached(repo, filename, revision)
        if path:
            return Check("expert_weights", title, "ok", True, f"{repo} in the Hugging Face cache ({hub_cache_dir()})")
    download = f"hf download {repo} {HUB_WEIGHT_FILES[0]}"
    if hub.can_download:
        return Check(
            "expert_weights",
            title,
            "warning",
            True,
            f"{repo} not in the cache yet: the first bank build downloads it (~{BACKBONE_DOWNLOAD_MB} MB)",
            f"to fetch it now: {download}",
        )
    return Check(
        "expert_weights",
        title,
        "missing",
        True,
        f"{repo} is not in the Hugging Face cache ({hub_cache_dir()}) and cannot be downloaded ("
        + ("offline mode" if hub.offline else "hub unreachable")
        + "): no bank can be built",
        f"on a connected machine run `{download}` and copy its cache here (HF_HOME), "
        "or set EAGLE_EXPERT__WEIGHTS=file with EAGLE_EXPERT__WEIGHTS_PATH=/path/to/model.safetensors, "
        "or EAGLE_EXPERT__WEIGHTS=random (tests and demos only)",
    )


def _mllm_weights_cached(repo: str) -> tuple[bool, str]:
    """Whether a hub model's config and every weight shard are cached; ``(cached, what is missing)``."""
    if not _cached(repo, "config.json"):
        return False, "config.json"
    index = _cached(repo, "model.safetensors.index.json")
    if index:
        try:
            shards = sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False, "a readable model.safetensors.index.json"
        absent = [shard for shard in shards if not _cached(repo, shard)]
        return (not absent), (f"{len(absent)} of {len(shards)} weight shards" if absent else "")
    if _cached(repo, "model.safetensors"):
        return True, ""
    return False, "the weights (model.safetensors)"


def mllm_weights_check(settings: Settings, hub: HubState) -> Check:
    """The MLLM's weights (when the MLLM is enabled): a local model folder or the hub cache."""
    title = "MLLM weights"
    if not settings.mllm.enabled:
        return Check("mllm_weights", title, "ok", False, "not used: expert-only mode (EAGLE_MLLM__ENABLED=false)")
    from mllm.loading import MLLMLoadError, model_source
    from mllm.presets import estimate_weight_memory_gib

    off = "or EAGLE_MLLM__ENABLED=false for expert-only mode"
    try:
        model_id, preset = model_source(settings.mllm)
    except MLLMLoadError as err:
        return Check("mllm_weights", title, "missing", True, str(err), f"fix EAGLE_MLLM__MODEL_ID / PRESET, {off}")
    if Path(model_id).is_dir():
        return Check("mllm_weights", title, "ok", True, f"local model folder {model_id}")
    cached, absent = _mllm_weights_cached(model_id)
    if cached:
        return Check("mllm_weights", title, "ok", True, f"{model_id} in the Hugging Face cache")
    size = f"~{estimate_weight_memory_gib(preset, 'bf16'):g} GiB" if model_id == preset.hub_id else "its weights"
    download = f"hf download {model_id}"
    if hub.can_download:
        return Check(
            "mllm_weights",
            title,
            "warning",
            True,
            f"{model_id} not in the cache ({absent} missing): the first inspection downloads {size}",
            f"to fetch it now: {download}",
        )
    return Check(
        "mllm_weights",
        title,
        "missing",
        True,
        f"{model_id} not in the Hugging Face cache ({absent} missing) and cannot be downloaded ("
        + ("offline mode" if hub.offline else "hub unreachable")
        + "): the MLLM cannot answer",
        f"on a connected machine run `{download}` and copy its cache here (HF_HOME), "
        f"or set EAGLE_MLLM__MODEL_ID to a local model folder, {off}",
    )


@dataclass(frozen=True)
class _Gpu:
    name: str
    total_gib: float
    free_gib: float


def _gpu() -> _Gpu | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    try:
        free, total = torch.cuda.mem_get_info(0)
    except RuntimeError:
        free, total = props.total_memory, props.total_memory
    return _Gpu(props.name, total / 2**30, free / 2**30)


def _mllm_quantization(settings: Settings, gpu: _Gpu | None) -> str:
    """The quantisation the MLLM loads with (``auto``: 4-bit on a GPU, fp32 on the CPU), as ``mllm.loading`` does."""
    quantization = settings.mllm.quantization
    on_gpu = gpu is not None and settings.mllm.device.strip().lower() != "cpu"
    if quantization == "auto":
        return "4bit" if on_gpu else "fp32"
    return quantization


def gpu_check(settings: Settings, gpu: _Gpu | None = None, *, probe: bool = True) -> Check:
    """The CUDA GPU and its memory; needed only when the MLLM is enabled on an explicit CUDA device."""
    gpu = _gpu() if probe and gpu is None else gpu
    mllm = settings.mllm
    device = mllm.device.strip().lower()
    needed = mllm.enabled and device.startswith("cuda")
    title = "GPU"
    if gpu is None:
        if not mllm.enabled:
            return Check("gpu", title, "ok", False, "no CUDA GPU; not needed: the expert runs on the CPU")
        if needed:
            return Check(
                "gpu",
                title,
                "missing",
                True,
                f"EAGLE_MLLM__DEVICE={mllm.device} but no CUDA GPU is available",
                "run on a host with an NVIDIA GPU, or set EAGLE_MLLM__DEVICE=auto (CPU, slow) "
                "or EAGLE_MLLM__ENABLED=false",
            )
        return Check(
            "gpu",
            title,
            "warning",
            False,
            "no CUDA GPU: the MLLM runs on the CPU in fp32 (tens of seconds per image)",
            "use a host with an NVIDIA GPU (8+ GB), or EAGLE_MLLM__ENABLED=false for expert-only mode",
        )
    detail = f"{gpu.name}, {gpu.total_gib:.1f} GiB ({gpu.free_gib:.1f} GiB free)"
    if mllm.enabled and device != "cpu":
        from mllm.presets import PresetError, estimate_weight_memory_gib, get_preset

        try:
            preset = get_preset(mllm.preset, trust_remote_code=mllm.trust_remote_code)
            need = estimate_weight_memory_gib(preset, _mllm_quantization(settings, gpu))
        except (PresetError, ValueError):
            need = None
        if need is not None and need + 1.0 > gpu.free_gib:
            return Check(
                "gpu",
                title,
                "warning",
                needed,
                f"{detail}: the MLLM's weights need ≈ {need:g} GiB plus ~1 GiB for activations",
                "set EAGLE_MLLM__QUANTIZATION=4bit or EAGLE_MLLM__PRESET=qwen2.5-vl-3b",
            )
    return Check("gpu", title, "ok", needed, detail)


def _bnb_requirement() -> str:
    """``bitsandbytes`` with the version range this package was built with (its own metadata)."""
    try:
        requires = importlib.metadata.requires("eagle-inspect") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    for requirement in requires:
        if requirement.replace(" ", "").lower().startswith("bitsandbytes") and ";" not in requirement:
            spec = requirement.replace(" ", "")[len("bitsandbytes") :]
            return f'"bitsandbytes{spec}"' if spec else "bitsandbytes"
    return "bitsandbytes"


def bitsandbytes_check(settings: Settings, gpu: _Gpu | None) -> Check:
    """bitsandbytes: importable; needed when the MLLM loads 4-bit or 8-bit (``auto`` on a GPU is 4-bit)."""
    title = "bitsandbytes"
    quantization = _mllm_quantization(settings, gpu) if settings.mllm.enabled else None
    needed = quantization in ("4bit", "8bit")
    fix = f"pip install {_bnb_requirement()}, or set EAGLE_MLLM__QUANTIZATION=bf16"
    if importlib.util.find_spec("bitsandbytes") is None:
        status: Status = "missing" if needed else "ok"
        why = f"needed for {quantization} loading" if needed else "not needed by this setup"
        return Check("bitsandbytes", title, status, needed, f"not installed ({why})", fix if needed else "")
    if needed:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # noqa: BLE001 - a broken native library shows up as anything
            detail = f"installed but not usable ({type(err).__name__})"
            return Check("bitsandbytes", title, "missing", True, detail, fix)
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    why = f"used for {quantization} loading" if needed else "not needed by this setup"
    return Check("bitsandbytes", title, "ok", needed, f"installed ({version}; {why})")


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_check(settings: Settings) -> Check:
    """Free space (and write access) under the data folder, where banks, caches and the audit log live."""
    title = "Disk"
    data_dir = Path(settings.data_dir)
    where = _existing_ancestor(data_dir)
    fix = f"free space under {where} or set EAGLE_DATA_DIR to a larger disk"
    if not os.access(where, os.W_OK):
        return Check("disk", title, "missing", True, f"{where} is not writable (data folder {data_dir})", fix)
    free_mb = shutil.disk_usage(where).free / 2**20
    detail = f"{free_mb / 1024:.1f} GiB free under {where}"
    if free_mb < MIN_FREE_MB:
        return Check("disk", title, "missing", True, f"{detail}: too little to write a bank", fix)
    if free_mb < WARN_FREE_MB:
        return Check("disk", title, "warning", True, f"{detail}: room for a few banks only", fix)
    return Check("disk", title, "ok", True, detail)


def run_checks(settings: Settings, *, probe_timeout_s: float = PROBE_TIMEOUT_S) -> Report:
    """Run every check for these settings (never downloads; at most one short hub probe, none when offline)."""
    hub = hub_state(probe_timeout_s)
    gpu = _gpu()
    return Report(
        (
            expert_weights_check(settings, hub),
            mllm_weights_check(settings, hub),
            gpu_check(settings, gpu, probe=False),
            bitsandbytes_check(settings, gpu),
            hub_check(hub),
            disk_check(settings),
        )
    )


class ReportCache:
    """A :class:`Report` recomputed at most every ``ttl_s`` seconds (``/readyz`` is polled often)."""

    def __init__(self, settings: Settings, *, ttl_s: float = 30.0, probe_timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self._settings = settings
        self._ttl_s = ttl_s
        self._probe_timeout_s = probe_timeout_s
        self._lock = threading.Lock()
        self._report: Report | None = None
        self._at = 0.0

    def get(self) -> Report:
        """The cached report, refreshed when older than ``ttl_s``."""
        with self._lock:
            if self._report is None or time.monotonic() - self._at > self._ttl_s:
                self._report = run_checks(self._settings, probe_timeout_s=self._probe_timeout_s)
                self._at = time.monotonic()
            return self._report


def warm_up_skip_reason(settings: Settings, *, probe_timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the start-up ONNX warm-up should not even try (``None``: go ahead).

    It is skipped at once when the backbone weights are neither cached nor downloadable (offline mode, or the
    hub did not answer a short probe), instead of waiting on the network; the reason says how to fix it.
    """
    if settings.expert.weights == "random":
        return None
    # Cached hub weights need no probe: the offline-state answer only matters for a download.
    cached = expert_weights_check(settings, HubState(False, True, ""))
    if cached.status == "ok":
        return None
    hub = hub_state(probe_timeout_s) if settings.expert.weights == "hub" else HubState(False, False, "")
    check = expert_weights_check(settings, hub)
    if check.status != "missing":
        return None
    return f"{check.detail}; fix: {check.fix}"
