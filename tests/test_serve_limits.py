"""Limits of the Serve app over real HTTP: bounded queues answer 503 fast under overload, a request timeout
answers 504, the bearer token guards every route but the health check, and the token never comes from a config."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from helpers import save_untrained_artifact
from genray.images import encode_png
from genray.serving.auth import TOKEN_ENV, TOKEN_FILE_ENV, BearerAuth, TokenError, load_token

# A photo denoiser wide and deep enough that one 192x192 image takes a good fraction of a second on one thread.
SLOW = {"depth": 6, "width": 32}
SLOW_IMAGE = encode_png(np.random.default_rng(0).integers(0, 255, (192, 192, 3), dtype=np.uint8))


@pytest.fixture
def slow_model_uri(tmp_path) -> str:
    return save_untrained_artifact(str(tmp_path / "slow"), "photo_denoiser", **SLOW)


def timed_post(url: str, **kwargs) -> tuple[int, float, requests.Response]:
    started = time.perf_counter()
    r = requests.post(url, data=SLOW_IMAGE, timeout=120, **kwargs)
    return r.status_code, time.perf_counter() - started, r


def test_overload_answers_503_fast_and_serves_the_rest(serve_app, slow_model_uri):
    # One request at a time in the replica, two waiting: of 16 simultaneous requests most must be turned away.
    base = serve_app({"models": {"slow": {"uri": slow_model_uri, "num_cpus": 0.25, "max_batch_size": 1,
                                          "max_ongoing_requests": 1, "max_queued_requests": 2}},
                      "retry_after_s": 2})
    assert timed_post(f"{base}/slow")[0] == 200  # warm: the replica is up and has run once
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: timed_post(f"{base}/slow"), range(16)))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 503}, codes  # overload is a 503, never a crash or another 5xx
    assert codes.count(503) >= 6 and codes.count(200) >= 3, codes
    rejected = [r for code, _, r in results if code == 503]
    assert all(r.headers.get("retry-after") == "2" and "overloaded" in r.json()["detail"] for r in rejected)
    # Turned away at once, not after waiting in a queue: faster than the slowest request that was served.
    slowest_ok = max(t for code, t, _ in results if code == 200)
    assert np.median([t for code, t, _ in results if code == 503]) < slowest_ok
    assert timed_post(f"{base}/slow")[0] == 200  # and the app serves normally once the burst is over


def test_overload_status_can_be_429(serve_app, slow_model_uri):
    base = serve_app({"models": {"slow": {"uri": slow_model_uri, "num_cpus": 0.25, "max_batch_size": 1,
                                          "max_ongoing_requests": 1, "max_queued_requests": 1}},
                      "overload_status_code": 429, "retry_after_s": None})
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: timed_post(f"{base}/slow"), range(8)))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    assert all("retry-after" not in r.headers for code, _, r in results if code == 429)


def test_request_timeout_is_504(serve_app, slow_model_uri):
    base = serve_app({"models": {"slow": {"uri": slow_model_uri, "num_cpus": 0.25}}, "request_timeout_s": 0.05})
    code, seconds, r = timed_post(f"{base}/slow")
    assert code == 504 and "within 0.05 s" in r.json()["detail"], r.text
    assert seconds < 30


def test_bearer_token_guards_every_route_but_health(serve_app, serve_family_uris, tmp_path):
    token = "s3cret-" + "x" * 20
    (tmp_path / "token").write_text(token + "\n")  # a mounted secret usually ends in a newline
    base = serve_app({"models": {"denoise": {"uri": serve_family_uris["models"]["photo_denoiser"], "num_cpus": 0.1},
                                 "gan": {"uri": serve_family_uris["models"]["dcgan"], "num_cpus": 0.1}},
                      "styles": {"uris": serve_family_uris["styles"], "num_cpus": 0.1},
                      "token_file": str(tmp_path / "token")})
    upload = encode_png(np.zeros((8, 8, 3), np.uint8))
    routes = [("post", "/denoise"), ("post", "/style/a"), ("get", "/generate/gan"), ("get", "/models"),
              ("post", "/vae/gan/reconstruct"), ("get", "/vae/gan/interpolate"), ("post", "/classify/gan"),
              ("post", "/no-such-model")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                        {"Authorization": f"Basic {token}"}):
            r = getattr(requests, method)(f"{base}{path}", data=upload, headers=headers, timeout=60)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers, r.text)
    good = {"Authorization": f"Bearer {token}"}
    assert requests.post(f"{base}/denoise", data=upload, headers=good, timeout=60).status_code == 200
    assert requests.post(f"{base}/style/a", data=upload, headers=good, timeout=60).status_code == 200
    assert requests.get(f"{base}/generate/gan?n=2", headers=good, timeout=60).status_code == 200
    assert requests.get(f"{base}/-/healthz", timeout=30).status_code == 200  # load balancers need no token
    assert requests.get(f"{base}/docs", timeout=30).status_code == 200
    schemes = requests.get(f"{base}/openapi.json", timeout=30).json()["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"


def test_require_token_without_one_refuses_to_start(serve_http, serve_family_uris):
    from ray import serve

    from genray.serving.deploy import DeployError, deploy_app

    args = {"models": {"denoise": {"uri": serve_family_uris["models"]["photo_denoiser"], "num_cpus": 0.1}},
            "require_token": True, "gateway": {"num_cpus": 0.05}}
    try:
        with pytest.raises(DeployError, match="Gateway: RuntimeError: require_token is set but no bearer token"):
            deploy_app(args, name="no-token", route_prefix="/no-token")
    finally:
        serve.delete("no-token")


# -- where the token comes from (no Ray needed) ---------------------------------------------------------------

def test_token_sources_in_order(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    assert load_token(None) is None
    (tmp_path / "cfg").write_text("from-config-path\n")
    (tmp_path / "env").write_text("from-env-path")
    assert load_token(str(tmp_path / "cfg")) == "from-config-path"
    monkeypatch.setenv(TOKEN_FILE_ENV, str(tmp_path / "env"))
    assert load_token(str(tmp_path / "cfg")) == "from-env-path"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert load_token(str(tmp_path / "cfg")) == "from-env"


def test_unusable_token_file_is_an_error_not_an_open_door(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(TokenError, match="cannot read"):
        load_token(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(TokenError, match="empty"):
        load_token(str(tmp_path / "empty"))


def test_bearer_check():
    auth = BearerAuth("abc")
    assert auth.allows("Bearer abc") and auth.allows("bearer abc")
    assert not any(auth.allows(h) for h in (None, "", "Bearer", "Bearer ab", "Bearer abcd", "abc", "Basic abc"))
    assert BearerAuth(None).allows(None)  # no token configured: no check
