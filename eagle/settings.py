"""One settings tree for the whole product, read from the environment (prefix ``EAGLE_``) and ``.env``.

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
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "eagle"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExpertSettings(_Group):
    """PatchCore expert, DBT and the visual prompt (DESIGN.md: Expert, DBT, Visual prompt)."""

    backbone: str = Field("wide_resnet50_2.tv_in1k", description="timm model name of the backbone.")
    weights: Literal["hub", "file", "random"] = Field(
        "hub",
        description="Where backbone weights come from: the Hugging Face hub (cached; HF_HUB_OFFLINE honoured), "
        "a local file (`weights_path`), or random weights (tests and smoke runs only; recorded in the bank).",
    )
    weights_path: Path | None = Field(None, description="Local weights file (.safetensors) when weights='file'.")
    seed: int = Field(0, description="Seed for random weights, projection and coreset starts.")
    resize: int = Field(256, ge=32, description="Shorter side is resized to this before cropping.")
    crop: int = Field(224, ge=32, description="Center-crop size fed to the backbone (the network input size).")
    center_crop: bool = Field(True, description="False: resize the whole image to crop×crop (no border hidden).")
    runtime: Literal["onnx", "torch"] = Field("onnx", description="Inference runtime for the feature extractor.")
    batch_size: int = Field(8, ge=1, description="Images per forward pass while building a bank.")
    coreset_ratio: float = Field(0.1, gt=0.0, le=1.0, description="Share of training patches kept in the bank.")
    coreset_projection_dim: int = Field(128, ge=1, description="Random projection size for coreset distances.")
    coreset_starts: int = Field(10, ge=1, description="Number of starting points for greedy k-center.")
    coreset_start_method: Literal["center_farthest", "mean_farthest", "random"] = Field(
        "center_farthest",
        description="Greedy k-center starts: center_farthest (reference code: the patch nearest the mean plus the "
        "patches farthest from THAT patch), mean_farthest (farthest from the mean), random (PatchCore).",
    )
    distance: Literal["sqeuclidean", "euclidean"] = Field(
        "sqeuclidean", description="Patch score distance: squared L2 (reference code) or L2 (paper Eq. 3)."
    )
    threshold_method: Literal["k_sigma", "quantile", "mad", "evt"] = Field("k_sigma")
    kappa: float = Field(3.0, description="k_sigma: tau = mean + kappa * std (population std).")
    quantile: float = Field(0.99, gt=0.0, lt=1.0, description="quantile: tau = this quantile of training scores.")
    mad_k: float = Field(3.0, description="mad: tau = median + mad_k * MAD.")
    evt_quantile: float = Field(0.99, gt=0.0, lt=1.0, description="evt: tau = this quantile of a GEV fit.")
    min_unsampled_patches: int = Field(
        32, ge=1, description="A training image with fewer unsampled patches is skipped by DBT (reference: 32)."
    )
    dbt_search: Literal["leave_own_out", "whole_bank"] = Field(
        "leave_own_out",
        description="DBT training scores: leave_own_out (reference code: an image's unsampled patches are searched "
        "in the coreset minus that image's own entries) or whole_bank (paper Algorithm 1: the whole memory bank).",
    )
    min_references: int = Field(2, ge=1, description="Fewest reference images a bank may be built from.")
    recommended_references: int = Field(20, ge=1, description="Below this a bank is built with a warning.")
    gaussian_sigma: float = Field(4.0, ge=0.0, description="Gaussian smoothing of the anomaly map (pixels).")
    max_boxes: int = Field(3, ge=1)
    reference_max_side: int = Field(
        1024,
        ge=64,
        description="Longest side of the reference copies a bank keeps (never upscaled). They are the MLLM's "
        "template images, so they must not be smaller than the query's pixel budget (EAGLE_MLLM__MAX_PIXELS).",
    )

    @model_validator(mode="after")
    def _check(self) -> ExpertSettings:
        if self.crop > self.resize and self.center_crop:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if self.weights == "file" and self.weights_path is None:
            raise ValueError("weights='file' needs weights_path (EAGLE_EXPERT__WEIGHTS_PATH)")
        return self


class MLLMSettings(_Group):
    """The multimodal LLM (DESIGN.md: Prompt)."""

    enabled: bool = Field(True, description="False: expert-only mode, the MLLM stack is never imported.")
    preset: str = Field("qwen2.5-vl-7b", description="Model preset name (see `mllm.presets`).")
    model_id: str | None = Field(None, description="Hub id or local directory; overrides the preset's hub id.")
    quantization: Literal["auto", "4bit", "8bit", "bf16", "fp32"] = Field(
        "auto", description="auto: 4-bit NF4 on CUDA, fp32 on a CPU-only host (with a warning)."
    )
    attn_implementation: str = Field("sdpa")
    device: str = Field("auto", description="auto, cuda, cuda:N or cpu.")
    trust_remote_code: bool = Field(False, description="Needed by presets with remote code (MiniCPM-V). Opt-in.")
    max_pixels: int | None = Field(
        None,
        ge=28 * 28,
        description="Pixel budget of EVERY image sent (template, query, boxed query: min = max = this for "
        "Qwen2.5-VL); None: the preset's (Qwen2.5-VL: 512*28*28, as the reference code).",
    )
    max_new_tokens: int = Field(8, ge=1)
    explanation_max_new_tokens: int = Field(160, ge=8)


class CAASSettings(_Group):
    """Confidence-Aware Attention Scaling (DESIGN.md: CAAS)."""

    policy: Literal["auto", "off", "on"] = Field("auto", description="auto: active iff tau <= s_img <= s_max.")
    mode: Literal["logit", "weight", "weight_raw"] = Field("logit")
    alpha: float = Field(0.6, ge=0.0)
    layer_start: int = Field(9, ge=0, description="First decoder layer (0-based, inclusive).")
    layer_end: int = Field(15, ge=0, description="Last decoder layer (0-based, inclusive).")
    tokens: Literal["all", "query"] = Field("all", description="Visual tokens scaled: every image's or the query's.")

    @model_validator(mode="after")
    def _check(self) -> CAASSettings:
        if self.layer_end < self.layer_start:
            raise ValueError(f"layer_end ({self.layer_end}) < layer_start ({self.layer_start})")
        return self


class PromptSettings(_Group):
    """Which hints the MLLM gets (paper Table 3 settings) and whether it explains."""

    setting: Literal["baseline", "visual", "textual", "full"] = Field("full")
    explain: bool = Field(False, description="Ask a second turn for the defect's type, location and cause.")


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


class Settings(BaseSettings):
    """The root of all configuration. Build with :func:`load_settings` to get clear errors."""

    model_config = SettingsConfigDict(
        env_prefix="EAGLE_", env_nested_delimiter="__", env_file=".env", extra="ignore", validate_assignment=True
    )

    data_dir: Path = Field(default_factory=_default_data_dir, description="Banks, audit log and app state.")
    max_image_pixels: int = Field(64_000_000, ge=1, description="Larger images are refused (decompression-bomb guard).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    expert: ExpertSettings = Field(default_factory=ExpertSettings)
    mllm: MLLMSettings = Field(default_factory=MLLMSettings)
    caas: CAASSettings = Field(default_factory=CAASSettings)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    app: AppSettings = Field(default_factory=AppSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def banks_dir(self) -> Path:
        """Directory holding one sub-directory per saved bank."""
        return self.data_dir / "banks"

    @property
    def onnx_cache_dir(self) -> Path:
        """Exported ONNX backbones shared by every bank build (:mod:`expert.onnx_cache`; ``eagle warm-cache``)."""
        return self.data_dir / "cache" / "onnx"


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
