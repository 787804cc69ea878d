"""Per-route request counts and latencies of the gateway as Ray Serve custom metrics (`ray.serve.metrics`), which
Ray exports with every other metric on each node's metrics port (Prometheus format, `ray_` prefixed):

    ray_genray_requests_total{route="/{name}", model="x4", status="200", deployment=..., replica=..., ...}
    ray_genray_request_latency_ms_bucket{route=..., model=..., status=..., le=...}

`route` is the route template (`/{name}`, `/style/{style}`, `/generate/{model}`, ...), `model` the served model or
style it named ("" until the gateway has found the name served, so clients cannot grow the label set with made-up
names), `status` the HTTP status (499: the client went away first). Recorded by a pure ASGI middleware around the
whole app, so 400/401/404/406/413 answers are counted as well as the model's.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

# Milliseconds: from an early 4xx answer to a large x4 image on a CPU (the request timeout is 60 s by default).
LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
TAG_KEYS = ("route", "model", "status")
MODEL_KEY = "genray.model"  # set in the ASGI scope by the gateway once a route's model or style is known to be served
CLIENT_CLOSED = 499


def label_model(scope: dict[str, Any], name: str) -> None:
    """Called by the gateway for a name it serves: only such names reach the `model` label."""
    scope[MODEL_KEY] = name


def labels(scope: dict[str, Any], status: int) -> dict[str, str]:
    route = scope.get("route")  # filled in place by the router on the way in
    return {"route": getattr(route, "path", "unmatched"), "model": scope.get(MODEL_KEY, ""), "status": str(status)}


class RouteMetricsMiddleware:
    """Pure ASGI (no response wrapping, unlike Starlette's BaseHTTPMiddleware): notes the status as it is sent and
    records the request once the app is done with it. The metrics are created on the first request, in the gateway
    replica; outside Ray (the gateway under TestClient) nothing is recorded."""

    def __init__(self, app):
        self.app = app
        self.requests: Any = None
        self.latency: Any = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500  # an exception that escapes the app becomes a 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            self.record(labels(scope, status), time.perf_counter() - started)

    def record(self, tags: dict[str, str], seconds: float) -> None:
        if self.requests is None and not self._create():
            return
        self.requests.inc(1, tags=tags)
        self.latency.observe(seconds * 1000.0, tags=tags)

    def _create(self) -> bool:
        import ray

        if not ray.is_initialized():
            return False
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("genray_requests", tag_keys=TAG_KEYS,
                                description="HTTP requests to the genray gateway by route, model and status")
        self.latency = Histogram("genray_request_latency_ms", boundaries=LATENCY_BOUNDARIES_MS, tag_keys=TAG_KEYS,
                                 description="Time from request to the end of the answer in the gateway, in ms")
        return True
