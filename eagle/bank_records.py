"""The result records of bank operations, shared by the CLI, the app and the edge service.

One way to describe a result: each record is a frozen pydantic model with a description per field, so the CLI's
``--json`` output, the service's responses and its ``/openapi.json`` all come from the same definition.

* :class:`BankSummary`: a saved bank, read from its meta.json (``eagle bank list/show``, ``GET /v1/banks``, a
  bank-build job's result, a rollback's answer);
* :class:`BankVersion`: one kept version of a bank (``eagle bank history``, ``GET /v1/banks/{name}/versions``);
* :class:`TeachResult` and :class:`TaughtImage`: what teaching a bank changed (``eagle bank add``,
  ``POST /v1/banks/{name}/references``).

The inspection record lives in :mod:`eagle.records`.

Example:
    >>> version = BankVersion(
    ...     version=2, current=True, bank_id="ab12", created="2025-01-31T12:00:00+00:00",
    ...     tau=0.41, s_max=0.52, n_references=12, action="teach", note="added part.png",
    ... )
    >>> version.model_dump()["action"]
    'teach'
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from expert.config import Precision

__all__ = ["BankSummary", "BankVersion", "TaughtImage", "TeachResult"]


class _Record(BaseModel):
    """A frozen result record (unknown keys, e.g. in a job status saved by another release, are ignored)."""

    model_config = ConfigDict(frozen=True)


class BankSummary(_Record):
    """What people need to know about a saved bank, read from its meta.json alone."""

    name: str = Field(description="The bank's name.")
    bank_id: str = Field(description="16 hex digits of a SHA-256 over the bank's tensors and meta.json.")
    created: str = Field(description="When the bank (its current version) was built, ISO 8601 in UTC.")
    n_references: int = Field(description="Reference images the bank was built from.")
    n_patches: int = Field(description="Patches embedded (references × patch grid).")
    coreset_size: int = Field(description="Patch features kept in the memory bank.")
    coreset_ratio: float = Field(description="Share of all patches kept in the memory bank.")
    threshold_method: str = Field(description="How τ was derived: k_sigma, quantile, mad or evt.")
    tau: float = Field(description="τ: a query is anomalous iff its score ≥ τ.")
    s_max: float = Field(description="Largest training score; [τ, s_max] is the low-confidence band.")
    backbone: str = Field(description="The backbone's timm model name.")
    weights_source: str = Field(description="Where the backbone's weights came from: hub, file or random.")
    distance: str = Field(description="The unit of every score: sqeuclidean or euclidean.")
    precision: Precision = Field(
        "fp32",
        description="The feature extractor's precision: fp32, or int8 (a quantised copy; EAGLE_EXPERT__PRECISION).",
    )
    warning: str | None = Field(None, description="Built from fewer references than recommended; None: enough.")
    build_warnings: tuple[str, ...] = Field(
        (), description="The build's warnings (meta.json 'warnings', e.g. few references, an empty CAAS band)."
    )
    mask: str | None = Field(
        None, description="The inspection mask, e.g. '412 of 784 patches (png:mask.png 640x480)'; None: no mask."
    )


class BankVersion(_Record):
    """One kept version of a bank, read from its meta.json and its note."""

    version: int = Field(description="The version number (0: a bank saved before versions were kept).")
    current: bool = Field(description="Whether this is the version the bank uses now.")
    bank_id: str = Field(description="The version's bank_id (16 hex digits).")
    created: str = Field(description="When the version was built, ISO 8601 in UTC.")
    tau: float = Field(description="The version's τ.")
    s_max: float = Field(description="The version's s_max.")
    n_references: int = Field(description="Reference images of the version.")
    action: str = Field(description="What made the version: build, teach, import, adopted or unversioned.")
    note: str = Field(description="One line for people, e.g. which images were taught.")


class TaughtImage(_Record):
    """One image taught to a bank: its score against the bank before and after, and whether it passes."""

    name: str = Field(description="The image's file name.")
    score_before: float = Field(description="Its score against the bank before it was taught.")
    score_after: float = Field(description="Its score against the new version.")
    passed_before: bool = Field(description="Whether it scored below the old τ.")
    passes_now: bool = Field(description="Whether the new version finds it normal.")


class TeachResult(_Record):
    """What teaching a bank changed: versions, τ and s_max before → after, the taught images."""

    bank: str = Field(description="The bank's name.")
    version_before: int | None = Field(description="The version taught; None: the bank was unversioned.")
    version: int = Field(description="The new version, now current.")
    tau_before: float = Field(description="τ before.")
    tau_after: float = Field(description="τ of the new version.")
    s_max_before: float = Field(description="s_max before.")
    s_max_after: float = Field(description="s_max of the new version.")
    references_before: int = Field(description="Reference images before.")
    references_after: int = Field(description="Reference images of the new version.")
    taught: list[TaughtImage] = Field(default_factory=list, description="The images taught, in the order given.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the API's and ``eagle bank add --json``'s answer)."""
        return self.model_dump()

    def describe(self) -> str:
        """One paragraph for people: ``τ 0.41 → 0.47 (version 3 → 4); part.png: 0.52 → 0.31, passes now``."""
        lines = [
            f"bank {self.bank!r}: version {self.version_before or 'unversioned'} → {self.version}, "
            f"references {self.references_before} → {self.references_after}, "
            f"τ {self.tau_before:.4g} → {self.tau_after:.4g}, s_max {self.s_max_before:.4g} → {self.s_max_after:.4g}"
        ]
        for image in self.taught:
            verdict = "passes now" if image.passes_now else "would still be flagged"
            lines.append(f"  {image.name}: score {image.score_before:.4g} → {image.score_after:.4g}, {verdict}")
        return "\n".join(lines)
