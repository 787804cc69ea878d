"""The Serve gateway's own answers (400, 404, 413), in process with FastAPI's TestClient: the checks that happen
before any model is called, without starting Ray. tests/test_serve_families.py sends the same requests over real
HTTP through Serve's proxy."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from fastapi.testclient import TestClient

from genray.images import encode_png
from genray.serving.gateway import Gateway, api

ROUTES = {  # what build_app hands the gateway (app.py), for one model of each kind
    "denoise": {"kind": "image", "family": "photo_denoiser", "task": "denoise", "scale": 1, "reconstructs": False},
    "x4": {"kind": "image", "family": "srgan", "task": "superres", "scale": 4, "reconstructs": False},
    "gan": {"kind": "generator", "family": "dcgan", "task": "generate", "scale": 1, "reconstructs": False},
    "faces": {"kind": "generator", "family": "vae", "task": "generate", "scale": 1, "reconstructs": True},
    "digits": {"kind": "classifier", "family": "sae_classifier", "task": "classify", "scale": 1,
               "reconstructs": False},
}
LIMITS = {"max_body_bytes": 100_000, "max_pixels": 10_000, "max_output_pixels": 40_000, "max_images": 8}


def _servable_dependencies():
    """The dependency through which Serve's ingress hands every route its Gateway instance (the replica's)."""
    def walk(router):
        for route in router.routes:
            if hasattr(route, "original_router"):  # FastAPI >= 0.137 nests included routers
                yield from walk(route.original_router)
            elif hasattr(route, "endpoint"):
                yield route
    for route in walk(api):
        parameter = inspect.signature(route.endpoint).parameters.get("self")
        if parameter is not None:
            yield parameter.default.dependency


@pytest.fixture(scope="module")
def client():
    """The gateway class itself (no Ray: the model handles are never reached by these requests) behind TestClient."""
    gateway_cls = Gateway.func_or_class.__mro__[1]  # the class as written, under Serve's ASGI ingress wrapper
    models = {name: {"uri": f"/unused/{name}"} for name in ROUTES}  # never loaded: build_app reads them, not this
    gateway = gateway_cls({"models": models, **LIMITS}, ROUTES, dict.fromkeys(ROUTES), None)
    for dependency in set(_servable_dependencies()):
        api.dependency_overrides[dependency] = lambda: gateway
    with TestClient(api) as test_client:
        yield test_client
    api.dependency_overrides.clear()


def png(shape) -> bytes:
    return encode_png(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))


@pytest.mark.parametrize("method, path, says", [
    ("post", "/nope", "no image model 'nope'; served: denoise, x4"),
    ("post", "/gan", "no image model 'gan'; served: denoise, x4"),  # a generator has no POST /<name>
    ("get", "/generate/denoise", "no generator model 'denoise'; served: faces, gan"),
    ("get", "/vae/gan/interpolate", "no vae model 'gan'; served: faces"),
    ("post", "/classify/x4", "no classifier model 'x4'; served: digits"),
    ("post", "/style/any", "no style 'any'; served: none"),
])
def test_unknown_or_wrong_kind_of_model_is_404_listing_what_fits(client, method, path, says):
    r = client.request(method, path, content=png((4, 4, 3)))
    assert r.status_code == 404 and r.json()["detail"] == says


@pytest.mark.parametrize("path", ["/denoise", "/vae/faces/reconstruct", "/classify/digits"])
@pytest.mark.parametrize("body, says", [
    (b"", "bad image"), (b"not an image at all", "bad image"), (png((8, 8, 3))[:60], "bad image"),
])
def test_undecodable_upload_is_400(client, path, body, says):
    r = client.post(path, content=body)
    assert r.status_code == 400 and r.json()["detail"].startswith(says), r.text


def test_oversized_uploads_are_413_before_any_model(client):
    r = client.post("/denoise", content=b"\0" * 100_001)  # declared length over max_body_bytes
    assert r.status_code == 413 and "100000-byte limit" in r.json()["detail"]
    r = client.post("/denoise", content=(b"\0" * 10_000 for _ in range(11)))  # chunked: counted as it arrives
    assert r.status_code == 413 and "100000-byte limit" in r.json()["detail"]
    r = client.post("/denoise", content=png((101, 100, 1)))  # 10,100 px > max_pixels, from the header
    assert r.status_code == 413 and "100x101" in r.json()["detail"]
    r = client.post("/x4", content=png((60, 60, 1)))  # 3,600 px in, but x4 out is 57,600 > max_output_pixels
    assert r.status_code == 413 and "output would be 240x240" in r.json()["detail"]


@pytest.mark.parametrize("path, params, says", [
    ("/generate/gan", {"n": 0}, "between 1 and 8"), ("/generate/gan", {"n": 9}, "between 1 and 8"),
    ("/generate/gan", {"n": "many"}, "n"), ("/generate/gan", {"seed": -1}, "seed"),
    ("/vae/faces/interpolate", {"steps": 1}, "between 2 and 8"), ("/vae/faces/interpolate", {"seed": 2**63}, "seed"),
])
def test_bad_query_parameters_are_400(client, path, params, says):
    r = client.get(path, params=params)
    assert r.status_code == 400 and says in r.json()["detail"], r.text
