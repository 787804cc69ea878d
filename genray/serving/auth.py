"""The gateway's optional bearer token. It never comes from a config file (configs end up in git, in Ray's
dashboard and in `serve status`): only from the ingress replica's environment or a secret file.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_ENV = "GENRAY_SERVE_TOKEN"  # the token itself
TOKEN_FILE_ENV = "GENRAY_SERVE_TOKEN_FILE"  # or a file holding it (e.g. a mounted Kubernetes secret)


class TokenError(RuntimeError):
    """A token source is configured but unusable; the gateway refuses to start rather than serve unprotected."""


def load_token(token_file: str | None = None) -> str | None:
    """$GENRAY_SERVE_TOKEN, else the file named by $GENRAY_SERVE_TOKEN_FILE, else `token_file`; None if none."""
    value = os.environ.get(TOKEN_ENV, "").strip()
    if value:
        return value
    path = os.environ.get(TOKEN_FILE_ENV) or token_file
    if not path:
        return None
    try:
        value = Path(path).read_text().strip()
    except OSError as err:
        raise TokenError(f"cannot read the bearer token file {path}: {err.strerror or err}") from None
    if not value:
        raise TokenError(f"the bearer token file {path} is empty")
    return value


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
