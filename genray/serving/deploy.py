"""Run a Serve config file (the same file `serve run` reads) on the connected Ray."""
from __future__ import annotations

from ray import serve

from genray.config import ServeFileConfig
from genray.serving.app import build_app


def run_serve_config(cfg: ServeFileConfig) -> str:
    """Start Serve's HTTP proxy as configured and deploy every application; returns the base URL."""
    serve.start(proxy_location=cfg.proxy_location, http_options=cfg.http_options.model_dump())
    for app in cfg.applications:
        serve.run(build_app(app.args.model_dump(mode="json")), name=app.name, route_prefix=app.route_prefix)
    return f"http://{cfg.http_options.host}:{cfg.http_options.port}"
