"""An ASGI middleware for Ray Serve's HTTP proxy that drops the request headers with which a client could switch
off the proxy's own limits: `x-request-timeout-seconds` (0 disables the proxy timeout, a large value extends it)
and `x-request-disconnect-disabled: ?1` (the request keeps running after the client hangs up).

Ray loads it from $RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (set for the local Ray genray starts, see
genray/runtime.py; clusters set it in their node environment). Kept free of heavy imports: the proxy imports it.
"""
from __future__ import annotations

IMPORT_PATH = "genray.serving.proxy_guard:middlewares"
# Headers Ray Serve's proxy reads per request (ray/serve/_private/constants.py, http_util.parse_*_header).
STRIPPED_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})


class StripProxyOverrides:
    """Pure ASGI: removes STRIPPED_HEADERS from the scope before the proxy parses it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") in ("http", "websocket"):
            headers = scope.get("headers") or []
            kept = [(k, v) for k, v in headers if k.lower() not in STRIPPED_HEADERS]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def middlewares() -> list:
    from starlette.middleware import Middleware

    return [Middleware(StripProxyOverrides)]
