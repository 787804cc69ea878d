"""configs/serve/all.yaml as shipped (only artefact URIs and the port changed), run by `genray serve` and by Ray's
own `serve run`, each on its own fresh local Ray: every family answers over HTTP behind the bearer token."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from helpers import free_port
from genray.images import decode_image, encode_png

pytestmark = pytest.mark.integration  # drives the genray CLI or jobs as subprocesses

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
# all.yaml's endpoint -> the family whose test artefact it serves (tests/conftest.py serve_family_uris).
ARTEFACT_FOR = {"denoise": "photo_denoiser", "superres": "srgan", "digits-ae": "dense_ae", "digits-gan": "dcgan",
                "faces-gan": "dcgan", "digits-vae": "vae", "faces-vae": "vae", "digits-classifier": "sae_classifier",
                "digits-denoise": "denoise_ae"}


def demo_config(tmp_path: Path, family_uris: dict, port: int) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "serve" / "all.yaml").read_text())
    data["http_options"]["port"] = port
    args = data["applications"][0]["args"]
    for name, model in args["models"].items():
        model["uri"] = family_uris["models"][ARTEFACT_FOR[name]]
    args["styles"]["uris"] = dict(zip(args["styles"]["uris"], family_uris["styles"].values()))
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", ["genray serve", "serve run"])
def test_demo_config_serves_every_family(command, serve_family_uris, tmp_path):
    port, token = free_port(), "demo-token"
    config = demo_config(tmp_path, serve_family_uris, port)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"GENRAY_SERVE_TOKEN": token}
    argv = [str(BIN / "genray"), "serve", str(config)] if command == "genray serve" else [
        str(BIN / "serve"), "run", str(config)]
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 600
        while True:  # every replica of every family starts on a fresh Ray: this takes a while on a busy machine
            try:
                if requests.get(f"{base}/models", headers=auth, timeout=10).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or the proxy holds requests until the app is up
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        listing = requests.get(f"{base}/models", headers=auth, timeout=30).json()
        assert set(listing["models"]) == set(ARTEFACT_FOR)
        assert set(listing["styles"]["styles"]) == {"starry", "waves"}
        assert requests.get(f"{base}/models", timeout=30).status_code == 401
        assert requests.get(f"{base}/-/healthz", timeout=30).status_code == 200

        photo = encode_png(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8))
        calls = {("post", "/denoise"): (24, 20, 3), ("post", "/superres"): (96, 80, 3),
                 ("post", "/digits-denoise"): (24, 20, 3), ("post", "/digits-ae"): (24, 20, 3),
                 ("post", "/style/starry"): (24, 20, 3), ("post", "/style/waves"): (24, 20, 3),
                 ("get", "/generate/faces-gan?n=4&seed=1"): (62, 62, 1),
                 ("post", "/vae/digits-vae/reconstruct"): (16, 16, 1),
                 ("get", "/vae/faces-vae/interpolate?steps=3&seed=1"): (20, 56, 1)}
        for (method, path), shape in calls.items():
            r = getattr(requests, method)(f"{base}{path}", data=photo, headers=auth, timeout=120)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", (path, r.text)
            assert decode_image(r.content, channels=None).shape == shape, path
        r = requests.post(f"{base}/classify/digits-classifier", data=photo, headers=auth, timeout=120)
        assert r.status_code == 200 and len(r.json()["probabilities"]) == 10
    finally:
        # genray serve stops on SIGTERM, serve run on Ctrl-C; both shut Serve down and exit.
        proc.send_signal(signal.SIGTERM if command == "genray serve" else signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
