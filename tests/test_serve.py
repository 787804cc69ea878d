"""Real HTTP requests to the genray Serve app on a local Ray."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from genray.images import decode_image, encode_png


@pytest.fixture
def denoise_url(serve_app, tiny_model):
    _, trained = tiny_model
    base = serve_app({
        "models": {"denoise": {"uri": trained.model_uri, "num_cpus": 0.25, "max_batch_size": 8,
                               "batch_wait_timeout_s": 0.05}},
        "max_body_bytes": 200_000,
        "max_pixels": 1_000_000,
    })
    return base, trained


def digit(seed: int = 0, shape=(28, 28, 1)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_post_png_returns_png_of_same_size(denoise_url):
    base, _ = denoise_url
    r = requests.post(f"{base}/denoise", data=encode_png(digit()), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert decode_image(r.content, channels=None).shape == (28, 28, 1)
    # JPEG in, PNG out; RGB keeps its channels and size.
    buf = io.BytesIO()
    Image.fromarray(digit(1, (40, 52, 3))).save(buf, format="JPEG")
    r = requests.post(f"{base}/denoise", data=buf.getvalue(), timeout=30)
    assert r.status_code == 200 and decode_image(r.content, channels=None).shape == (40, 52, 3)


def test_bad_bodies_get_400_413_404(denoise_url):
    base, _ = denoise_url
    r = requests.post(f"{base}/denoise", data=b"definitely not an image", timeout=30)
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    r = requests.post(f"{base}/denoise", data=b"", timeout=30)
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = requests.post(f"{base}/denoise", data=b"x" * 300_000, timeout=30)  # over max_body_bytes
    assert r.status_code == 413
    big = encode_png(np.zeros((1200, 1000, 1), np.uint8))  # small file, 1.2 Mpx decoded: over max_pixels
    r = requests.post(f"{base}/denoise", data=big, timeout=30)
    assert r.status_code == 413 and "1000" in r.json()["detail"]
    r = requests.post(f"{base}/nope", data=encode_png(digit()), timeout=30)
    assert r.status_code == 404 and "denoise" in r.json()["detail"]


def test_health_docs_and_models(denoise_url):
    base, trained = denoise_url
    assert requests.get(f"{base}/-/healthz", timeout=30).status_code == 200
    assert requests.get(f"{base}/docs", timeout=30).status_code == 200
    spec = requests.get(f"{base}/openapi.json", timeout=30).json()
    assert "/{name}" in spec["paths"]
    models = requests.get(f"{base}/models", timeout=30).json()["models"]
    from genray.model_artifact import read_meta

    assert models["denoise"]["digest"] == read_meta(trained.model_uri)["digest"]
    assert models["denoise"]["task"] == "denoise" and models["denoise"]["kind"] == "image"
    assert models["denoise"]["metrics"] == read_meta(trained.model_uri)["metrics"]


def test_concurrent_requests_share_batches(denoise_url):
    base, _ = denoise_url
    payloads = [encode_png(digit(i)) for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda p: requests.post(f"{base}/denoise", data=p, timeout=60).status_code, payloads))
    assert statuses == [200] * 24
    sizes = requests.get(f"{base}/models", timeout=30).json()["models"]["denoise"]["recent_batch_sizes"]
    assert max(sizes) > 1, sizes  # @serve.batch merged concurrent requests into one forward pass
