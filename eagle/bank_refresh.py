"""Grow a bank from confirmed good parts: propose recent kept inspections, and teach the approved ones.

A proposal (:func:`propose`) lists, newest first, at most ``count`` audited inspections of the bank's CURRENT
version (its bank id) whose image is kept (:mod:`eagle.kept_images`) and that are good by one of two rules:

* ``operator_good``: the latest operator feedback gives ``no_defect`` as the right verdict;
* ``margin``: the verdict was ``no_defect``, the expert said normal and the score is at most ``margin × τ``.

A row whose latest feedback says ``defect`` is never proposed; the same picture appears once (its newest row).
:func:`apply` teaches the approved candidates through :meth:`eagle.pipeline.Pipeline.add_references` (a new bank
version; ``eagle bank rollback`` undoes it) and appends one line per refresh to ``<data_dir>/bank-refresh.jsonl``
(who approved it, the versions, the images). ``eagle bank refresh``, ``GET``/``POST /v1/banks/{name}/refresh``
and the app's Line health tab are the front ends.

Example:
    >>> proposal = propose_for(pipeline, settings, "screws", audit, kept, count=10)  # doctest: +SKIP
    >>> result = apply(pipeline, "screws", proposal.candidates, kept, data_dir=settings.data_dir,
    ...                approved_by="cli")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from eagle.audit import AuditFilter, AuditLog
from eagle.bank_records import TeachResult
from eagle.errors import EagleError
from eagle.kept_images import KeptImages

__all__ = [
    "REFRESH_LOG",
    "RefreshCandidate",
    "RefreshError",
    "RefreshProposal",
    "apply",
    "describe_proposal",
    "propose",
    "propose_for",
    "read_refresh_log",
    "select",
]

REFRESH_LOG = "bank-refresh.jsonl"
"""The append-only log of refreshes under the data directory (one JSON object per line)."""

Reason = Literal["operator_good", "margin"]


class RefreshError(EagleError, ValueError):
    """A refresh request that the bank's current proposal cannot honour (nothing to teach, an image not proposed now).

    HTTP 409: the request is well formed, but the proposal it names has changed (or never held those images).
    """

    code, http_status = "invalid_refresh", 409


class RefreshCandidate(BaseModel):
    """One proposed inspection: its audit row and why it is good."""

    model_config = ConfigDict(frozen=True)

    inspection_id: int = Field(description="The audit row's id.")
    run_id: str = Field(description="The inspection's run id.")
    time: str = Field(description="When it was inspected, ISO 8601 in UTC.")
    source: str = Field(description="Which front end inspected it: api, watch or app.")
    image_name: str = Field(description="The inspected file's name ('' when none was given).")
    image_sha256: str = Field(description="The image's sha256 (the kept file's name).")
    score: float = Field(description="The expert's score.")
    tau: float = Field(description="The bank's τ at inspection.")
    reason: Reason = Field(description="operator_good (an operator said no_defect) or margin (score ≤ margin × τ).")
    why: str = Field(description="The reason in words, e.g. 'score 0.31 ≤ 0.8 × τ 0.52'.")


class RefreshProposal(BaseModel):
    """What a refresh would teach a bank."""

    model_config = ConfigDict(frozen=True)

    bank: str = Field(description="The bank's name.")
    bank_id: str = Field(description="The current version's bank id (only its inspections are proposed).")
    tau: float = Field(description="The current version's τ.")
    margin: float = Field(description="Expert passes with score ≤ margin × τ are proposed.")
    count: int = Field(description="Most candidates proposed.")
    keeping: bool = Field(description="Whether inspected images are kept (EAGLE_KEEP_IMAGES__ENABLED).")
    candidates: list[RefreshCandidate] = Field(description="The proposed inspections, newest first.")


def propose(
    audit: AuditLog,
    kept: KeptImages,
    bank: str,
    bank_id: str,
    tau: float,
    *,
    count: int,
    margin: float,
    keeping: bool = True,
) -> RefreshProposal:
    """The proposal for bank ``bank`` at version ``bank_id`` (rules in the module docstring).

    Args:
        audit: The audit log.
        kept: The kept images (only inspections whose image is kept are proposed).
        bank: The bank's name.
        bank_id: Its current version's bank id.
        tau: Its current τ.
        count: Most candidates.
        margin: The share of τ below which an expert pass counts as good.
        keeping: Whether keeping is on now (reported in the proposal).

    Returns:
        The :class:`RefreshProposal`, candidates newest first.
    """
    feedback = audit.latest_feedback()
    rows = audit.query(AuditFilter(bank=bank, status="ok"))
    seen: set[str] = set()
    found: list[RefreshCandidate] = []
    for row in reversed(rows):  # newest first
        if len(found) >= count:
            break
        sha256 = row["image_sha256"]
        if row["bank_id"] != bank_id or row["score"] is None or sha256 in seen:
            continue
        correct = (feedback.get(int(row["id"])) or {}).get("correct_verdict")
        score, row_tau = float(row["score"]), float(row["tau"] if row["tau"] is not None else tau)
        if correct == "defect":
            continue
        if correct == "no_defect":
            reason: Reason = "operator_good"
            why = f"an operator said no defect (score {score:.4g}, τ {row_tau:.4g})"
        elif row["verdict"] == "no_defect" and row["decision"] == "normal" and score <= margin * row_tau:
            reason = "margin"
            why = f"score {score:.4g} ≤ {margin:g} × τ {row_tau:.4g}"
        else:
            continue
        if not kept.has(sha256):
            continue
        seen.add(sha256)
        found.append(
            RefreshCandidate(
                inspection_id=int(row["id"]),
                run_id=str(row["run_id"]),
                time=str(row["time"]),
                source=str(row["source"]),
                image_name=str(row["image_name"] or ""),
                image_sha256=sha256,
                score=score,
                tau=row_tau,
                reason=reason,
                why=why,
            )
        )
    return RefreshProposal(
        bank=bank, bank_id=bank_id, tau=float(tau), margin=margin, count=count, keeping=keeping, candidates=found
    )


def propose_for(
    pipeline: Any,
    settings: Any,
    name: str,
    audit: AuditLog,
    kept: KeptImages,
    *,
    count: int | None = None,
    margin: float | None = None,
) -> RefreshProposal:
    """:func:`propose` for bank ``name``'s current version (``pipeline.banks``), ``settings.keep_images``' defaults.

    Raises:
        BankNotFoundError: no bank named ``name``.
    """
    from eagle.banks import BankNotFoundError, validate_bank_name

    validate_bank_name(name)
    keep = settings.keep_images
    kept.prune()  # the retention limits hold even after keeping was turned off (nothing new is kept then)
    summary = next((s for s in pipeline.banks.list() if s.name == name), None)
    if summary is None:
        raise BankNotFoundError(f"no bank named {name!r}")
    return propose(
        audit,
        kept,
        name,
        summary.bank_id,
        summary.tau,
        count=keep.refresh_count if count is None else count,
        margin=keep.refresh_margin if margin is None else margin,
        keeping=keep.enabled,
    )


def select(proposal: RefreshProposal, sha256s: Sequence[str]) -> list[RefreshCandidate]:
    """The candidates of ``proposal`` named by ``sha256s``, in the proposal's order.

    Raises:
        RefreshError: no image named, or one that the proposal does not list.
    """
    if not sha256s:
        raise RefreshError("approve at least one proposed image (none named)")
    by_sha = {c.image_sha256: c for c in proposal.candidates}
    unknown = [s for s in sha256s if s not in by_sha]
    if unknown:
        raise RefreshError(
            f"not proposed for bank {proposal.bank!r} now: {', '.join(str(s)[:16] for s in unknown[:5])} "
            "(propose again: only listed images can be taught)"
        )
    wanted = set(sha256s)
    return [c for c in proposal.candidates if c.image_sha256 in wanted]


def _name_of(candidate: RefreshCandidate) -> str:
    base = Path(candidate.image_name).name if candidate.image_name else ""
    return base or f"kept-{candidate.image_sha256[:12]}.png"


def apply(
    pipeline: Any,
    name: str,
    candidates: Sequence[RefreshCandidate],
    kept: KeptImages,
    *,
    data_dir: Path,
    approved_by: str,
    progress: Any = None,
) -> TeachResult:
    """Teach bank ``name`` the candidates' kept images (one new version) and log the refresh.

    Args:
        pipeline: The pipeline (its public ``add_references`` teaches).
        name: The bank.
        candidates: The approved candidates.
        kept: The kept images (each is re-checked and decoded before teaching).
        data_dir: The data directory (the refresh log goes there).
        approved_by: Who approved it, for the log: ``cli``, ``api``, ``app`` or ``auto``.
        progress: Optional ``progress(stage, fraction)``.

    Returns:
        The teach's :class:`~eagle.bank_records.TeachResult` (τ before → after, the new version).

    Raises:
        RefreshError: no candidates. KeptImageError: a kept image is gone or altered (nothing is taught).
    """
    if not candidates:
        raise RefreshError(f"nothing to teach bank {name!r}: no approved candidates")
    datas = [kept.read(c.image_sha256) for c in candidates]
    result: TeachResult = pipeline.add_references(
        datas, name, names=[_name_of(c) for c in candidates], progress=progress
    )
    _log_refresh(Path(data_dir), name, candidates, result, approved_by)
    return result


def _log_refresh(
    data_dir: Path, name: str, candidates: Sequence[RefreshCandidate], result: TeachResult, approved_by: str
) -> None:
    """Append one line to ``<data_dir>/bank-refresh.jsonl`` (``O_APPEND``, never through a link)."""
    entry = {
        "time": dt.datetime.now(dt.UTC).isoformat(),
        "bank": name,
        "approved_by": approved_by,
        "version_before": result.version_before,
        "version": result.version,
        "tau_before": result.tau_before,
        "tau_after": result.tau_after,
        "images": [
            {"image_sha256": c.image_sha256, "run_id": c.run_id, "reason": c.reason, "score": c.score}
            for c in candidates
        ],
    }
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(data_dir / REFRESH_LOG, flags, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def read_refresh_log(data_dir: Path) -> list[dict[str, Any]]:
    """The refresh log's entries, oldest first (empty when there is none)."""
    path = Path(data_dir) / REFRESH_LOG
    if path.is_symlink() or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def describe_proposal(proposal: RefreshProposal) -> str:
    """The proposal as a table for a terminal: time, image name, score vs τ, why."""
    head = (
        f"bank {proposal.bank!r} (bank id {proposal.bank_id}, τ {proposal.tau:.4g}): "
        f"{len(proposal.candidates)} candidate{'' if len(proposal.candidates) == 1 else 's'}"
    )
    if not proposal.keeping:
        head += " (keeping inspected images is off: EAGLE_KEEP_IMAGES__ENABLED=true keeps new ones)"
    lines = [head]
    for c in proposal.candidates:
        lines.append(f"  {c.time[:19]}  {(c.image_name or c.image_sha256[:16])[:32]:<32} {c.score:>9.4g}  {c.why}")
    return "\n".join(lines)
