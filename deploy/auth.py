"""Who may talk to the service: a bearer token, and the rule that an exposed service must have one.

* Every ``/v1`` endpoint and ``/metrics`` require ``Authorization: Bearer <token>`` when a token is configured
  (``EAGLE_SERVICE__TOKEN``). The comparison is constant-time (:func:`hmac.compare_digest`).
* Without a token the service only starts on a loopback address (``127.0.0.1``, ``::1``, ``localhost``):
  :func:`check_bind` refuses anything else, before a socket is opened.

Example:
    >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0"), is_loopback("[::1]")
    (True, False, True)
    >>> try:
    ...     check_bind("0.0.0.0", None)
    ... except InsecureBindError as err:
    ...     print(str(err)[:50])
    refusing to listen on 0.0.0.0 without a token: set
"""

from __future__ import annotations

import hmac
import ipaddress

from pydantic import SecretStr
from starlette.requests import Request

from deploy.errors import Unauthorized

MIN_TOKEN_LENGTH = 16
"""Shorter tokens are refused on a non-loopback address (guessable)."""


class InsecureBindError(RuntimeError):
    """The service was asked to listen on a non-loopback address without a (strong enough) token."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or the name ``localhost``); unknown host names are not."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def token_value(token: SecretStr | str | None) -> str | None:
    """The token as plain text, or ``None`` when unset or blank."""
    if token is None:
        return None
    text = token.get_secret_value() if isinstance(token, SecretStr) else token
    text = text.strip()
    return text or None


def check_bind(host: str, token: SecretStr | str | None) -> None:
    """Refuse to expose the service without a token.

    Raises:
        InsecureBindError: ``host`` is not loopback and the token is missing or shorter than
            :data:`MIN_TOKEN_LENGTH` characters.
    """
    if is_loopback(host):
        return
    value = token_value(token)
    if value is None:
        raise InsecureBindError(
            f"refusing to listen on {host} without a token: set EAGLE_SERVICE__TOKEN (or --token-file), "
            "or listen on 127.0.0.1"
        )
    if len(value) < MIN_TOKEN_LENGTH:
        raise InsecureBindError(
            f"refusing to listen on {host} with a {len(value)}-character token: use at least "
            f'{MIN_TOKEN_LENGTH} characters (e.g. `python -c "import secrets; print(secrets.token_urlsafe(32))"`)'
        )


class BearerAuth:
    """A FastAPI dependency checking ``Authorization: Bearer <token>``; a no-op when no token is configured.

    Args:
        token: the expected token (``None`` or blank: authentication disabled, loopback only).
    """

    def __init__(self, token: SecretStr | str | None) -> None:
        value = token_value(token)
        self._expected = value.encode("utf-8") if value is not None else None

    @property
    def enabled(self) -> bool:
        """Whether requests must carry the token."""
        return self._expected is not None

    def __call__(self, request: Request) -> None:
        """Raise :class:`~deploy.errors.Unauthorized` unless the request carries the right token."""
        if self._expected is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
        supplied = credentials.strip().encode("utf-8", errors="surrogateescape")
        if not hmac.compare_digest(supplied, self._expected):
            raise Unauthorized("invalid bearer token")
