"""What the app can do on this installation (:mod:`eagle.doctor`), shown before anyone uploads anything.

The header's status line, the details panel with the exact fix for each missing part, and which actions are
disabled and why.

Example:
    >>> from eagle.doctor import Check, Report
    >>> report = Report((Check("expert_weights", "Expert weights", "missing", True, "not cached", "hf download x"),))
    >>> app_gates(report, mllm_enabled=False).build_reason
    'Building and teaching a bank needs the expert backbone weights: not cached. Fix: hf download x'
"""

from __future__ import annotations

from dataclasses import dataclass

from eagle.doctor import Check, Report

_ICON = {"ok": "✔", "warning": "⚠", "missing": "✖"}


@dataclass(frozen=True)
class AppGates:
    """Which of the app's actions cannot work here, each with the reason shown beside it (``None``: it works).

    Attributes:
        build_reason: why Build bank and Teach are disabled (no backbone weights, no disk).
        mllm_reason: why the MLLM options (prompt setting, CAAS, α, ask / explain / where it looked) do nothing.
        expert_only: the MLLM is disabled in the settings (its options are hidden, not just disabled).
    """

    build_reason: str | None
    mllm_reason: str | None
    expert_only: bool


def _blocking(report: Report, *names: str) -> list[Check]:
    return [check for check in report.checks if check.name in names and check.blocking]


def app_gates(report: Report, *, mllm_enabled: bool) -> AppGates:
    """The disabled actions and their reasons, from the capability report."""
    build = None
    missing = _blocking(report, "expert_weights", "disk")
    if missing:
        first = missing[0]
        what = "the expert backbone weights" if first.name == "expert_weights" else "free disk space"
        build = f"Building and teaching a bank needs {what}: {first.detail}. Fix: {first.fix}"
    if not mllm_enabled:
        mllm = (
            "expert-only mode (EAGLE_MLLM__ENABLED=false): no multimodal model is configured, so the prompt "
            "setting, CAAS, α and the model's answer, explanation and attention map do not apply"
        )
    else:
        blocked = _blocking(report, "mllm_weights", "gpu", "bitsandbytes")
        mllm = (
            None
            if not blocked
            else f"the multimodal model cannot load here: {blocked[0].detail}. Fix: {blocked[0].fix}"
        )
    return AppGates(build_reason=build, mllm_reason=mllm, expert_only=not mllm_enabled)


def status_markdown(report: Report, gates: AppGates) -> str:
    """The header's short status line: what works, what does not, and where the fix is."""
    parts = []
    if gates.build_reason:
        parts.append("✖ **Bank building is unavailable** (the expert backbone weights are missing)")
    if gates.expert_only:
        parts.append("**Expert-only mode**: no multimodal model is configured; verdicts come from the expert")
    elif gates.mllm_reason:
        parts.append("✖ **The multimodal model is unavailable**: verdicts come from the expert alone")
    limited = [c.title for c in report.checks if c.status == "warning"]
    if limited:
        parts.append("⚠ limited: " + ", ".join(limited))
    if not parts:
        parts.append("✔ **Ready**: everything this setup needs is here")
    return " · ".join(parts) + " — details and fixes: *What works on this installation* below."


def markdown_text(text: str) -> str:
    """``text`` for Markdown: underscores and stars outside `code spans` are escaped (``EAGLE_X__Y`` stays as is)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("\\", "\\\\").replace("_", "\\_").replace("*", "\\*")
    return "`".join(parts)


def details_markdown(report: Report) -> str:
    """The details panel: one line per check (needed or not), with the exact fix under each problem."""
    lines = []
    for check in report.checks:
        need = "needed" if check.needed else "not needed by this setup"
        detail = markdown_text(check.detail)
        lines.append(f"- {_ICON[check.status]} **{check.title}** ({check.status}, {need}): {detail}")
        if check.fix and check.status != "ok":
            lines.append(f"  - **Fix:** {markdown_text(check.fix)}")
    lines.append("")
    lines.append("The same table on the command line: `eagle doctor` (`--json` for scripts).")
    return "\n".join(lines)
