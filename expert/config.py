"""Configuration of the PatchCore expert: a plain pydantic model, owned by this package.

The application composes it into its settings root (``EAGLE_EXPERT__*``); the expert itself
reads no environment and imports nothing from the layers above it.

Example:
    >>> from expert.config import ExpertSettings
    >>> ExpertSettings(kappa=2.5).kappa
    2.5
    >>> from pydantic import ValidationError
    >>> try:
    ...     ExpertSettings(crop=300, resize=256)
    ... except ValidationError as err:
    ...     print(err.errors()[0]["msg"])
    Value error, crop (300) must not exceed resize (256)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from expert.coreset import StartMethod
from expert.dbt import DBTSearch, ThresholdMethod
from expert.search import Distance

__all__ = ["BoxMerge", "ExpertSettings", "Precision", "WeightsSource"]

WeightsSource = Literal["hub", "file", "random"]
"""Where backbone weights come from (also recorded in a bank's metadata)."""

Precision = Literal["fp32", "int8"]
"""Numeric precision of the patch embedder's ONNX graph (also recorded in a bank's metadata)."""

BoxMerge = Literal["eagle", "reference"]
"""Box-merge rules (:data:`expert.boxes.MERGE_RULES`)."""


class ExpertSettings(BaseModel):
    """PatchCore expert: backbone, preprocessing, coreset, DBT threshold, anomaly map and the visual prompt's boxes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backbone: str = Field("wide_resnet50_2.tv_in1k", description="timm model name of the backbone.")
    weights: WeightsSource = Field(
        "hub",
        description="Where backbone weights come from: the Hugging Face hub (cached; HF_HUB_OFFLINE honoured), "
        "a local file (`weights_path`), or random weights (tests and smoke runs only; recorded in the bank).",
    )
    weights_path: Path | None = Field(None, description="Local weights file (.safetensors) when weights='file'.")
    seed: int = Field(0, description="Seed for random weights, projection and coreset starts.")
    resize: int = Field(256, ge=32, description="Shorter side is resized to this before cropping.")
    crop: int = Field(224, ge=32, description="Center-crop size fed to the backbone (the network input size).")
    center_crop: bool = Field(True, description="False: resize the whole image to crop×crop (no border hidden).")
    normalize_mean: tuple[float, float, float] | None = Field(
        None,
        description="RGB mean the network input is normalised with, (pixel/255 - mean)/std; None: the backbone's "
        "timm pretrained_cfg value (ImageNet's for the default). Recorded in the bank; a bank built with other "
        "values is refused.",
    )
    normalize_std: tuple[float, float, float] | None = Field(
        None, description="RGB std (all > 0) of the input normalisation; None: the backbone's pretrained_cfg value."
    )
    runtime: Literal["onnx", "torch"] = Field("onnx", description="Inference runtime for the feature extractor.")
    precision: Precision = Field(
        "fp32",
        description="Precision of the bank's ONNX feature extractor: fp32 (exact), or int8 (statically quantised, "
        "calibrated on the bank's own reference images; ~2-3x faster embedding on CPUs with VNNI). Recorded in the "
        "bank: a bank is only inspected with the precision it was built with. int8 needs runtime='onnx'.",
    )
    batch_size: int = Field(8, ge=1, description="Images per forward pass while building a bank.")
    coreset_ratio: float = Field(0.1, gt=0.0, le=1.0, description="Share of training patches kept in the bank.")
    coreset_projection_dim: int = Field(128, ge=1, description="Random projection size for coreset distances.")
    coreset_starts: int = Field(10, ge=1, description="Number of starting points for greedy k-center.")
    coreset_start_method: StartMethod = Field(
        "center_farthest",
        description="Greedy k-center starts: center_farthest (reference code: the patch nearest the mean plus the "
        "patches farthest from THAT patch), mean_farthest (farthest from the mean), random (PatchCore).",
    )
    distance: Distance = Field(
        "sqeuclidean", description="Patch score distance: squared L2 (reference code) or L2 (paper Eq. 3)."
    )
    threshold_method: ThresholdMethod = Field("k_sigma")
    kappa: float = Field(3.0, description="k_sigma: tau = mean + kappa * std (population std).")
    quantile: float = Field(0.99, gt=0.0, lt=1.0, description="quantile: tau = this quantile of training scores.")
    mad_k: float = Field(3.0, description="mad: tau = median + mad_k * MAD.")
    evt_quantile: float = Field(0.99, gt=0.0, lt=1.0, description="evt: tau = this quantile of a GEV fit.")
    min_unsampled_patches: int = Field(
        32, ge=1, description="A training image with fewer unsampled patches is skipped by DBT (reference: 32)."
    )
    dbt_search: DBTSearch = Field(
        "leave_own_out",
        description="DBT training scores: leave_own_out (reference code: an image's unsampled patches are searched "
        "in the coreset minus that image's own entries) or whole_bank (paper Algorithm 1: the whole memory bank).",
    )
    min_references: int = Field(2, ge=1, description="Fewest reference images a bank may be built from.")
    recommended_references: int = Field(20, ge=1, description="Below this a bank is built with a warning.")
    gaussian_sigma: float = Field(4.0, ge=0.0, description="Gaussian smoothing of the anomaly map (pixels).")
    max_boxes: int = Field(3, ge=1)
    box_merge: BoxMerge = Field(
        "eagle",
        description="How defect boxes are merged: eagle (repeated; centres closer than half the smaller box's "
        "diagonal) or reference (the reference code's one pass: IoU > 0.3 or centres within 20 px).",
    )
    reference_max_side: int = Field(
        1024,
        ge=64,
        description="Longest side of the reference copies a bank keeps (never upscaled). They are the MLLM's "
        "template images, so they must not be smaller than the query's pixel budget (EAGLE_MLLM__MAX_PIXELS).",
    )

    @field_validator("normalize_mean", "normalize_std")
    @classmethod
    def _finite(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and not all(math.isfinite(v) for v in value):
            raise ValueError(f"must be three finite numbers (R, G, B), got {list(value)}")
        return value

    @field_validator("normalize_std")
    @classmethod
    def _positive(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and not all(v > 0 for v in value):
            raise ValueError(f"every std must be > 0, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> ExpertSettings:
        if self.crop > self.resize and self.center_crop:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if self.precision == "int8" and self.runtime == "torch":
            raise ValueError(
                "precision 'int8' runs the bank's quantised ONNX graph, which the torch runtime cannot: set "
                "EAGLE_EXPERT__RUNTIME=onnx, or EAGLE_EXPERT__PRECISION=fp32 to run in torch"
            )
        if self.weights == "file" and self.weights_path is None:
            raise ValueError("weights='file' needs weights_path (EAGLE_EXPERT__WEIGHTS_PATH)")
        return self
