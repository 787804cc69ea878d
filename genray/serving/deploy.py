"""Run a Serve config file (the same file `serve run` / `serve deploy` read) on the connected Ray."""
from __future__ import annotations

import os
from typing import Any

from ray import serve

from genray.config import ServeFileConfig
from genray.serving.app import build_app
from genray.serving.auth import TOKEN_ENV, TOKEN_FILE_ENV, is_loopback  # noqa: F401 (is_loopback re-exported)


class DeployError(RuntimeError):
    """An application failed to deploy; the message carries each failed deployment's own reason."""


def deploy_app(args: dict[str, Any], name: str = "genray", route_prefix: str = "/") -> None:
    """serve.run(build_app(args)), with the reason a deployment failed in the error (Serve's own error only says
    which deployments failed; the why sits in `serve status`)."""
    try:
        serve.run(build_app(args), name=name, route_prefix=route_prefix)
    except RuntimeError as err:
        app = serve.status().applications.get(name)
        reasons = [f"{d}: {s.message.strip().splitlines()[-1]}" for d, s in (app.deployments if app else {}).items()
                   if s.status == "DEPLOY_FAILED" and s.message.strip()]
        raise DeployError("; ".join([str(err), *reasons])) from None


def run_serve_config(cfg: ServeFileConfig) -> str:
    """Start Serve's HTTP proxy as configured and deploy every application; returns the base URL."""
    serve.start(proxy_location=cfg.proxy_location, http_options=cfg.http_options.model_dump())
    for app in cfg.applications:
        deploy_app(app.args.model_dump(mode="json"), app.name, app.route_prefix)
    return f"http://{cfg.http_options.host}:{cfg.http_options.port}"


def open_access_warning(cfg: ServeFileConfig) -> str | None:
    """Why this config must not start as it is: it listens beyond loopback with no token anywhere in sight (the
    gateway reads the token in its own replica; on a local Ray that replica inherits this environment). None when
    the host is loopback, a token source is set, or every application says `insecure: true`."""
    if is_loopback(cfg.http_options.host) or os.environ.get(TOKEN_ENV, "").strip() \
            or os.environ.get(TOKEN_FILE_ENV, "").strip():
        return None
    if all(app.args.token_file or app.args.require_token or app.args.insecure for app in cfg.applications):
        return None
    return (f"listening on {cfg.http_options.host} without a bearer token: anyone who can reach the port can use "
            f"the models (set {TOKEN_ENV} or {TOKEN_FILE_ENV}, and require_token: true; or --insecure to serve it "
            "open on purpose)")
