"""The expert's one error base: every failure of ``expert/`` carries a stable machine ``code``.

The expert knows nothing of HTTP or exit codes: the composition root (:func:`eagle.errors.as_eagle_error`) maps
:class:`ExpertError` by its ``code`` to what the front ends show. Each error class keeps its builtin base too
(``ValueError``, ``RuntimeError``), so callers that catch those still do.

Example:
    >>> from expert.bank_schema import BankError
    >>> err = BankError("bank.safetensors is damaged")
    >>> isinstance(err, ExpertError), isinstance(err, ValueError), err.code
    (True, True, 'bank_unusable')
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["ExpertError"]


class ExpertError(Exception):
    """A failure of the expert, with a stable ``code`` (each subclass sets its own)."""

    code: ClassVar[str] = "expert_error"
