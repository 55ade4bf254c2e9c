"""One settings tree for the whole product, read from the environment (prefix ``EAGLE_``) and ``.env``.

Each package owns its configuration (:mod:`expert.config`, :mod:`mllm.config`); this module
composes those groups with the application's own (app, service) into the root :class:`Settings`.

Nested groups use a double underscore: ``EAGLE_EXPERT__THRESHOLD_METHOD=quantile``,
``EAGLE_MLLM__PRESET=qwen2.5-vl-3b``, ``EAGLE_CAAS__ALPHA=0.6``. A bad value is a start-up error
that names the key (see :func:`load_settings`).

Example:
    >>> from eagle.settings import Settings
    >>> s = Settings(expert={"kappa": 2.5})
    >>> s.expert.kappa
    2.5
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eagle.cli import LogLevel
from expert.config import ExpertSettings
from expert.drift import DriftSettings
from mllm.config import PROMPT_SETTINGS, CAASSettings, MLLMSettings, PromptSetting, PromptSettings

__all__ = [
    "PROMPT_SETTINGS",
    "AppSettings",
    "CAASSettings",
    "DriftSettings",
    "ExpertSettings",
    "KeepImagesSettings",
    "MLLMSettings",
    "PromptSetting",
    "PromptSettings",
    "ServiceSettings",
    "Settings",
    "SettingsError",
    "load_settings",
]


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "eagle"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AppSettings(_Group):
    """The Gradio web app."""

    host: str = Field("127.0.0.1")
    port: int = Field(7860, ge=1, le=65535)
    share: bool = False
    max_upload_mb: int = Field(200, ge=1)
    warm_onnx_cache: bool = Field(
        True,
        description="At start-up, export the expert's ONNX backbone into the cache in a background thread (once per "
        "weights/crop/torch version), so the first bank build does not wait 10-20 s for it.",
    )


class ServiceSettings(_Group):
    """The headless edge service (``eagle serve``) and watched folder."""

    host: str = Field("127.0.0.1")
    port: int = Field(8080, ge=1, le=65535)
    token: SecretStr | None = Field(None, description="Bearer token; required on a non-loopback address.")
    max_upload_mb: int = Field(25, ge=1)
    queue_size: int = Field(8, ge=1)
    retry_after_s: int = Field(2, ge=1)
    max_archive_mb: int = Field(1024, ge=1, description="Largest zip upload for a bank build (MiB).")
    max_archive_unpacked_mb: int = Field(4096, ge=1, description="Most bytes a bank zip may unpack to (MiB).")
    max_archive_entries: int = Field(10_000, ge=1, description="Most entries in a bank zip.")
    max_pending_builds: int = Field(4, ge=1, description="Bank builds allowed to wait; more get 429.")
    shutdown_timeout_s: float = Field(120.0, gt=0, description="Graceful shutdown: wait this long for accepted work.")
    audit_path: Path | None = Field(None, description="SQLite audit log; default <data_dir>/audit.sqlite3.")
    watch_poll_s: float = Field(1.0, gt=0, description="Watched folder: seconds between scans.")
    watch_truncated_retry_s: float = Field(
        30.0,
        ge=0,
        description="Watched folder: an image cut short is left in place and retried until this many seconds passed "
        "since its last change, then failed (0: fail at once).",
    )
    watch_events: bool = Field(
        True,
        description="Watched folder: take a file when its writer closes it (inotify close-write events, where "
        "available), polling kept as the fallback; false: polling only.",
    )
    watch_batch_size: int = Field(
        4,
        ge=1,
        le=32,
        description="Watched folder: when several images are ready, the expert embeds up to this many in one forward "
        "pass (more images per second on a CPU; each image's latency is then its batch's). 1: one at a time.",
    )


class KeepImagesSettings(_Group):
    """Kept inspected images and growing a bank from them (``eagle bank refresh``; docs/edge.md: growing the bank).

    Off by default: without it the audit log keeps only each image's name and sha256.
    """

    enabled: bool = Field(
        False,
        description="Keep a copy of every successfully inspected image under <data_dir>/kept-images (named by its "
        "sha256), so a bank can be refreshed from confirmed good parts. Privacy: these are the line's own pictures.",
    )
    max_count: int = Field(1000, ge=1, description="Most images kept; the oldest are deleted on each write.")
    max_days: float = Field(30.0, gt=0, description="Images older than this many days are deleted on each write.")
    refresh_margin: float = Field(
        0.8,
        gt=0,
        le=1,
        description="A refresh proposes expert passes with score <= margin x tau (and parts an operator said good).",
    )
    refresh_count: int = Field(20, ge=1, le=64, description="How many images a refresh proposes at most.")
    auto_refresh: bool = Field(
        False,
        description="Allow `eagle bank refresh NAME --auto` to teach the proposal without asking (each one is "
        "logged in <data_dir>/bank-refresh.jsonl); false: a refresh always waits for approval.",
    )


class Settings(BaseSettings):
    """The root of all configuration. Build with :func:`load_settings` to get clear errors."""

    model_config = SettingsConfigDict(
        env_prefix="EAGLE_", env_nested_delimiter="__", env_file=".env", extra="ignore", validate_assignment=True
    )

    data_dir: Path = Field(default_factory=_default_data_dir, description="Banks, audit log and app state.")
    max_image_pixels: int = Field(64_000_000, ge=1, description="Larger images are refused (decompression-bomb guard).")
    log_level: LogLevel = "INFO"
    bank_versions_kept: int = Field(
        5, ge=1, description="Versions kept per bank (every build, teach or import writes one; the oldest are pruned)."
    )
    max_loaded_banks: int = Field(
        4,
        ge=1,
        description="Banks kept loaded in memory at once (the least recently used is dropped; docs/edge.md: memory).",
    )
    onnx_cache_dir: Path | None = Field(
        None,
        description="Where exported ONNX backbones are cached for every bank build (default <data_dir>/cache/onnx; "
        "several data dirs may share one).",
    )
    expert: ExpertSettings = Field(default_factory=ExpertSettings)
    mllm: MLLMSettings = Field(default_factory=MLLMSettings)
    caas: CAASSettings = Field(default_factory=CAASSettings)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    app: AppSettings = Field(default_factory=AppSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    health: DriftSettings = Field(
        default_factory=DriftSettings, description="Line health: windows and limits of the drift check."
    )
    keep_images: KeepImagesSettings = Field(
        default_factory=KeepImagesSettings,
        description="Kept inspected images (off by default) and bank refresh from them.",
    )

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("onnx_cache_dir", mode="before")
    @classmethod
    def _cache_dir(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None  # unset or empty (``EAGLE_ONNX_CACHE_DIR=``): the default under the data dir
        return Path(value).expanduser() if isinstance(value, str | Path) else value

    @property
    def banks_dir(self) -> Path:
        """Directory holding one sub-directory per saved bank."""
        return self.data_dir / "banks"

    @property
    def onnx_cache_path(self) -> Path:
        """The folder of exported ONNX backbones every bank build uses (:mod:`expert.onnx_cache`; ``eagle warm-cache``).

        ``onnx_cache_dir`` when set (``EAGLE_ONNX_CACHE_DIR``), else ``<data_dir>/cache/onnx``.

        Example:
            >>> Settings(data_dir="/srv/eagle", onnx_cache_dir=None).onnx_cache_path.as_posix()
            '/srv/eagle/cache/onnx'
            >>> Settings(data_dir="/srv/eagle", onnx_cache_dir="/var/cache/eagle").onnx_cache_path.as_posix()
            '/var/cache/eagle'
        """
        return self.onnx_cache_dir if self.onnx_cache_dir is not None else self.data_dir / "cache" / "onnx"


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the ``EAGLE_`` key."""


def _env_key(loc: tuple) -> str:
    return "EAGLE_" + "__".join(str(part).upper() for part in loc if not isinstance(part, int))


def load_settings(**overrides) -> Settings:
    """Build :class:`Settings` from the environment, turning validation errors into one clear message.

    Raises:
        SettingsError: naming each offending key as its environment variable, e.g. ``EAGLE_CAAS__ALPHA``.
    """
    try:
        return Settings(**overrides)
    except ValidationError as err:
        lines = [f"{_env_key(e['loc'])}: {e['msg']}" for e in err.errors()]
        raise SettingsError("invalid configuration: " + "; ".join(lines)) from None
