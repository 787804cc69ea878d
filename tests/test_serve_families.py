"""Every model family over real HTTP: one Serve app (tests/conftest.py `serve_families`) with untrained tiny artefacts."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from genray.model_artifact import read_meta
from genray.images import decode_image, encode_png
from genray.models import MODELS
from genray.tasks import TASKS


def image(seed: int, shape) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8))


def png_shape(r: requests.Response) -> tuple[int, ...]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return decode_image(r.content, channels=None).shape


def grid_side(count: int, side: int, padding: int = 2) -> int:
    return count * (side + padding) + padding


@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_registered_family_answers_on_its_route(serve_families, family):
    """The registry decides what is served: a family registered in MODELS gets the routes of its task's kind."""
    base, _ = serve_families
    spec = MODELS[family]
    cfg = spec.config_cls.tiny()
    channels = spec.in_channels(cfg)
    route = TASKS[spec.task].route
    if route == "image":
        r = requests.post(f"{base}/tiny-{family}", data=image(0, (16, 20, channels)), timeout=60)
        assert png_shape(r) == (16 * spec.scale, 20 * spec.scale, channels)
    elif route == "generator":
        side = spec.image_size(cfg)
        r = requests.get(f"{base}/generate/tiny-{family}", params={"n": 1, "seed": 0}, timeout=60)
        assert png_shape(r) == (grid_side(1, side), grid_side(1, side), channels)
    else:
        r = requests.post(f"{base}/classify/tiny-{family}", data=image(0, (16, 20, channels)), timeout=60)
        assert r.status_code == 200 and len(r.json()["probabilities"]) == cfg.num_classes, r.text


@pytest.mark.parametrize("endpoint, shape, expected", [
    ("tiny-photo_denoiser", (40, 52, 3), (40, 52, 3)),  # photo denoiser: any size, RGB
    ("tiny-photo_denoiser", (33, 20, 1), (33, 20, 1)),  # grey in, grey out
    ("tiny-srgan", (12, 16, 3), (48, 64, 3)),  # x4
    ("tiny-dense_ae", (30, 30, 1), (30, 30, 1)),  # dense AE on 28x28 blocks, any size
])
def test_image_models_answer_png_of_the_right_size(serve_families, endpoint, shape, expected):
    base, _ = serve_families
    assert png_shape(requests.post(f"{base}/{endpoint}", data=image(0, shape), timeout=60)) == expected


def test_styles_are_multiplexed_over_one_deployment(serve_families):
    from ray import serve

    base, _ = serve_families
    upload = image(1, (24, 32, 3))
    outputs = {}
    for style in ("a", "b"):
        r = requests.post(f"{base}/style/{style}", data=upload, timeout=60)
        assert png_shape(r) == (24, 32, 3)
        outputs[style] = r.content
    assert outputs["a"] != outputs["b"]  # two style networks (different weights) ...
    deployments = serve.status().applications["families"].deployments
    # ... behind one deployment (model-tiny-style_net is a single style network served on its own route)
    assert [d for d in deployments if d.startswith("style")] == ["styles"]
    pool = requests.get(f"{base}/models", timeout=30).json()["styles"]
    assert pool["loaded_on_replica"] == ["a", "b"] and set(pool["styles"]) == {"a", "b", "c"}
    # A third style is loaded on demand and evicts the least recently used one (max_styles_per_replica=2).
    assert png_shape(requests.post(f"{base}/style/c", data=upload, timeout=60)) == (24, 32, 3)
    pool_after = requests.get(f"{base}/models", timeout=30).json()["styles"]
    assert pool_after["loaded_on_replica"] == ["b", "c"]
    assert pool_after["num_loads"] == pool["num_loads"] + 1
    # Reloading an evicted style gives the same result as before.
    assert requests.post(f"{base}/style/a", data=upload, timeout=60).content == outputs["a"]


def test_style_requests_are_batched_per_style(serve_families):
    base, _ = serve_families
    uploads = [image(i, (16, 16, 3)) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda b: requests.post(f"{base}/style/b", data=b, timeout=60).status_code, uploads))
    assert codes == [200] * 12
    sizes = requests.get(f"{base}/models", timeout=30).json()["styles"]["recent_batch_sizes"]
    assert max(sizes) > 1, sizes


@pytest.mark.parametrize("model, side, channels", [("tiny-dcgan", 28, 1), ("tiny-vae", 16, 1)])
def test_generate_is_a_seeded_png_grid(serve_families, model, side, channels):
    base, _ = serve_families
    first = requests.get(f"{base}/generate/{model}", params={"n": 16, "seed": 3}, timeout=60)
    assert png_shape(first) == (grid_side(4, side), grid_side(4, side), channels)
    assert first.headers["x-seed"] == "3"
    again = requests.get(f"{base}/generate/{model}", params={"n": 16, "seed": 3}, timeout=60)
    other = requests.get(f"{base}/generate/{model}", params={"n": 16, "seed": 4}, timeout=60)
    assert again.content == first.content and other.content != first.content
    # No seed: a random one, reported so the image can be made again.
    r = requests.get(f"{base}/generate/{model}", params={"n": 3}, timeout=60)
    assert png_shape(r) == (grid_side(2, side), grid_side(2, side), channels)
    replay = requests.get(f"{base}/generate/{model}", params={"n": 3, "seed": r.headers["x-seed"]}, timeout=60)
    assert replay.content == r.content


def test_vae_reconstructs_and_interpolates(serve_families):
    base, _ = serve_families
    buf = io.BytesIO()  # a JPEG photo of another size and colour: resized to the VAE's 16x16 grey
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
    assert png_shape(requests.post(f"{base}/vae/tiny-vae/reconstruct", data=buf.getvalue(), timeout=60)) == (
        16, 16, 1)
    r = requests.get(f"{base}/vae/tiny-vae/interpolate", params={"steps": 5, "seed": 1}, timeout=60)
    assert png_shape(r) == (grid_side(1, 16), grid_side(5, 16), 1)
    assert requests.get(f"{base}/vae/tiny-vae/interpolate", params={"steps": 5, "seed": 1},
                        timeout=60).content == r.content


def test_classifier_answers_probabilities(serve_families):
    base, _ = serve_families
    r = requests.post(f"{base}/classify/tiny-sae_classifier", data=image(3, (28, 28, 1)), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-4
    assert body["label"] == int(np.argmax(body["probabilities"]))


@pytest.mark.parametrize("method, path, params, status, says", [
    ("get", "/generate/tiny-photo_denoiser", {}, 404, "tiny-dcgan"),  # not a generator: the 404 lists the generators
    ("get", "/vae/tiny-dcgan/interpolate", {}, 404, "tiny-vae"),  # a generator, but not a VAE
    ("post", "/style/nope", {}, 404, "a, b, c"),
    ("post", "/tiny-dcgan", {}, 404, "tiny-photo_denoiser"),  # generators have no POST /<name>
    ("post", "/classify/tiny-photo_denoiser", {}, 404, "tiny-sae_classifier"),
    ("get", "/generate/tiny-dcgan", {"n": 0}, 400, "between 1 and 32"),
    ("get", "/generate/tiny-dcgan", {"n": 33}, 400, "between 1 and 32"),
    ("get", "/generate/tiny-dcgan", {"n": "many"}, 400, "n"),
    ("get", "/generate/tiny-dcgan", {"seed": -1}, 400, "seed"),
    ("get", "/vae/tiny-vae/interpolate", {"steps": 1}, 400, "between 2 and 32"),
])
def test_wrong_routes_and_parameters(serve_families, method, path, params, status, says):
    base, _ = serve_families
    r = getattr(requests, method)(f"{base}{path}", params=params, data=image(0, (8, 8, 1)), timeout=60)
    assert r.status_code == status and says in r.json()["detail"], r.text


def test_output_pixel_cap_is_413(serve_families):
    base, _ = serve_families
    # 0.36 Mpx in is under max_pixels (1 M), but x4 super-resolution would make 5.76 Mpx (cap 4 M).
    r = requests.post(f"{base}/tiny-srgan", data=image(0, (600, 600, 1)), timeout=60)
    assert r.status_code == 413 and "output would be 2400x2400" in r.json()["detail"]


def test_models_lists_every_artefact_and_docs_every_route(serve_families, serve_family_uris):
    base, _ = serve_families
    listing = requests.get(f"{base}/models", timeout=30).json()
    kinds = {f"tiny-{name}": TASKS[spec.task].route for name, spec in MODELS.items()}  # every family
    assert {name: m["kind"] for name, m in listing["models"].items()} == kinds
    for name, uri in serve_family_uris["models"].items():
        assert listing["models"][f"tiny-{name}"]["digest"] == read_meta(uri)["digest"]
        assert listing["models"][f"tiny-{name}"]["uri"] == uri
    for name, uri in serve_family_uris["styles"].items():
        assert listing["styles"]["styles"][name]["digest"] == read_meta(uri)["digest"]
    paths = requests.get(f"{base}/openapi.json", timeout=30).json()["paths"]
    assert {"/models", "/style/{style}", "/generate/{model}", "/vae/{model}/reconstruct",
            "/vae/{model}/interpolate", "/classify/{model}", "/{name}"} <= set(paths)
    assert requests.get(f"{base}/docs", timeout=30).status_code == 200


def test_bad_and_oversized_bodies(serve_families):
    base, _ = serve_families
    truncated = image(0, (64, 64, 3))[:200]
    for path in ("/tiny-photo_denoiser", "/style/a", "/vae/tiny-vae/reconstruct", "/classify/tiny-sae_classifier"):
        r = requests.post(f"{base}{path}", data=truncated, timeout=60)
        assert r.status_code == 400 and r.json()["detail"].startswith("bad image"), (path, r.text)
    # Chunked upload (no Content-Length): counted as it streams in, refused once over max_body_bytes (2 MB).
    r = requests.post(f"{base}/tiny-photo_denoiser", data=(b"\0" * 100_000 for _ in range(30)), timeout=60)
    assert r.status_code == 413 and "2000000-byte limit" in r.json()["detail"]
    r = requests.post(f"{base}/tiny-photo_denoiser", data=image(0, (1001, 1000, 1)), timeout=60)  # 1.001 Mpx > max_pixels
    assert r.status_code == 413 and "1000x1001" in r.json()["detail"]
