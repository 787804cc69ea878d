"""The gateway's optional bearer token. It never comes from a config file (configs end up in git, in Ray's
dashboard and in `serve status`): only from the ingress replica's environment or a secret file.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

TOKEN_ENV = "GENRAY_SERVE_TOKEN"  # the token itself
TOKEN_FILE_ENV = "GENRAY_SERVE_TOKEN_FILE"  # or a file holding it (e.g. a mounted Kubernetes secret)


class TokenError(RuntimeError):
    """A token source is configured but unusable; the gateway refuses to start rather than serve unprotected."""


def load_token(token_file: str | None = None) -> str | None:
    """$GENRAY_SERVE_TOKEN, else the file named by $GENRAY_SERVE_TOKEN_FILE, else `token_file`; None if none.

    A source that is set but blank (an empty or whitespace variable, file name or file) is a TokenError, never
    "no token": a secret that failed to render must not silently turn the check off."""
    if TOKEN_ENV in os.environ:
        value = os.environ[TOKEN_ENV].strip()
        if not value:
            raise TokenError(f"${TOKEN_ENV} is set but blank; unset it or give the token")
        return value
    if TOKEN_FILE_ENV in os.environ:
        path = os.environ[TOKEN_FILE_ENV].strip()
        if not path:
            raise TokenError(f"${TOKEN_FILE_ENV} is set but blank; unset it or name the token file")
    elif token_file is not None:
        path = token_file.strip()
        if not path:
            raise TokenError("token_file is blank; remove it or name the token file")
    else:
        return None
    try:
        value = Path(path).read_text().strip()
    except OSError as err:
        raise TokenError(f"cannot read the bearer token file {path}: {err.strerror or err}") from None
    if not value:
        raise TokenError(f"the bearer token file {path} is empty")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


def open_access_error(host: str | None, token: str | None, insecure: bool) -> str | None:
    """Why the gateway must not start: it would listen on `host` beyond loopback with no token (None if fine)."""
    if token is not None or insecure or host is None or is_loopback(host):
        return None
    return (f"listening on {host} without a bearer token: anyone who can reach the port could use the models; "
            f"set {TOKEN_ENV} or {TOKEN_FILE_ENV} (or token_file), or pass --insecure / set insecure: true to "
            "serve it open on purpose")


class BearerAuth:
    """Checks `Authorization: Bearer <token>` in constant time; a no-op when no token is configured."""

    def __init__(self, token: str | None):
        self._expected = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def allows(self, authorization: str | None) -> bool:
        if self._expected is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest on equal-type bytes: the time taken does not reveal how much of the token matched.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._expected)
