"""Ray Jobs entry point for serving: `genray serve CONFIG` on the cluster, running until the job is stopped.

    ray job submit --working-dir . -- python jobs/serve.py configs/serve/denoise.yaml --set ...

(On Kubernetes a RayService is the better home: cluster/kuberay/ray-service.genray.yaml holds the same config.)
`--smoke-test [CONFIG] [--set ...] [--port N] [--output URI]` deploys the config's applications, waits for
GET <route>/-/healthz to answer 200, then deletes them (and Serve, if nothing else is deployed) and exits 0: the
config, its artefacts and the cluster's Serve all work, and nothing is left running. Without a CONFIG it serves a
seeded, untrained tiny denoising autoencoder written under <output> (default: a temp dir; s3:// on a multi-node
cluster) at POST /denoise and also sends it one digit.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

from genray.cli import main as genray_main


def smoke_config(output: str, port: int | None):
    """A Serve config with one denoise endpoint over a seeded untrained tiny model written under `output`."""
    import torch

    from genray import storage
    from genray.model_artifact import save_artifact
    from genray.config import ServeFileConfig
    from genray.models import get_spec

    spec = get_spec("denoise_ae")
    cfg = spec.config_cls.tiny()
    torch.manual_seed(0)
    uri = storage.join_uri(output, "smoke-model")
    save_artifact(uri, spec, cfg, spec.build(cfg).eval(), {})
    return ServeFileConfig.model_validate({
        "http_options": {"host": "127.0.0.1", "port": port or 8000},
        "applications": [{"name": "genray-smoke", "route_prefix": "/",
                          "args": {"models": {"denoise": {"uri": uri, "num_cpus": 0.25}}}}],
    })


def smoke_test(argv: list[str]) -> int:
    import requests

    from genray.config import ServeFileConfig, load_config
    from genray.runtime import init_ray
    from genray.serving.deploy import run_serve_config

    p = argparse.ArgumentParser(prog="jobs/serve.py --smoke-test")
    p.add_argument("config", nargs="?")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--port", type=int)
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.config:
        overrides = list(args.set or []) + ([f"http_options.port={args.port}"] if args.port else [])
        cfg = load_config(args.config, overrides, cls=ServeFileConfig)
    else:
        cfg = smoke_config(args.output or tempfile.mkdtemp(prefix="genray-smoke-serve-"), args.port)
    init_ray()
    from ray import serve

    run_serve_config(cfg)
    host = "127.0.0.1" if cfg.http_options.host in ("0.0.0.0", "::") else cfg.http_options.host
    base = f"http://{host}:{cfg.http_options.port}"
    try:
        for app in cfg.applications:
            url = base + app.route_prefix.rstrip("/") + "/-/healthz"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if requests.get(url, timeout=10).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    print(f"[genray] smoke test: {url} did not answer 200 within 120 s", file=sys.stderr)
                    return 1
                time.sleep(1)
            print(f"[genray] smoke test: {app.name} healthy at {url}", flush=True)
        if not args.config:  # our own model: one real request through it
            from genray.datasets import load_embedded
            from genray.images import decode_image, encode_png

            digit = load_embedded("digits")[0][0]
            r = requests.post(f"{base}/denoise", data=encode_png(digit), timeout=60)
            r.raise_for_status()
            print(f"[genray] smoke test: POST /denoise -> {r.status_code} "
                  f"{decode_image(r.content, channels=None).shape}", flush=True)
    finally:
        for app in cfg.applications:
            serve.delete(app.name)
        if not serve.status().applications:
            serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke-test" in argv:
        from genray.cli import _user_errors

        argv.remove("--smoke-test")
        try:
            return smoke_test(argv)
        except _user_errors() as err:  # one line, as the genray command says it
            print(f"genray: error: {err}", file=sys.stderr)
            return 2
    return genray_main(["serve", *argv])


if __name__ == "__main__":
    sys.exit(main())
