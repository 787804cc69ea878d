"""The Serve front holds (issue 17), over real HTTP and raw sockets: blank tokens and open hosts refuse to start,
a trickled upload is cut off (408), client headers cannot switch off the proxy's timeout/disconnect handling, a
timed-out forward stops, and uploads get the bulk jobs' decode limits (format allowlist, 16-bit)."""
from __future__ import annotations

import io
import socket
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from genray.images import encode_png
from genray.serving.auth import TOKEN_ENV, TOKEN_FILE_ENV, TokenError, load_token, open_access_error

from helpers import genray, image_bytes, save_untrained_artifact

SLOW = {"depth": 6, "width": 32}  # a photo denoiser slow enough that requests overlap (as in test_serve_limits)
SLOW_IMAGE = encode_png(np.random.default_rng(0).integers(0, 255, (192, 192, 3), dtype=np.uint8))


# -- tokens and open hosts (no Ray needed) -----------------------------------------------------------------

@pytest.mark.parametrize("name", [TOKEN_ENV, TOKEN_FILE_ENV])
def test_a_blank_token_source_is_an_error_not_no_token(monkeypatch, name):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    monkeypatch.setenv(name, " \t ")
    with pytest.raises(TokenError, match=f"\\${name} is set but blank"):
        load_token(None)


def test_a_blank_token_file_setting_is_an_error(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(TokenError, match="token_file is blank"):
        load_token("  ")


def test_the_gateway_refuses_an_open_host_without_a_token_unless_insecure():
    assert "listening on 0.0.0.0 without a bearer token" in open_access_error("0.0.0.0", None, insecure=False)
    assert "without a bearer token" in open_access_error("serve.example.com", None, insecure=False)
    assert open_access_error("0.0.0.0", None, insecure=True) is None
    assert open_access_error("0.0.0.0", "tok", insecure=False) is None
    assert open_access_error("127.0.0.1", None, insecure=False) is None
    assert open_access_error("::1", None, insecure=False) is None


@pytest.mark.integration  # the genray CLI as a subprocess
def test_cli_refuses_blank_token_and_open_host_before_starting_ray():
    blank = genray("serve", "configs/serve/denoise.yaml", env={TOKEN_ENV: "   "}, timeout=120)
    assert blank.returncode == 2 and f"${TOKEN_ENV} is set but blank" in blank.stderr, blank.stderr
    open_host = genray("serve", "configs/serve/denoise.yaml", "--host", "0.0.0.0",
                       timeout=120)
    assert open_host.returncode == 2 and "without a bearer token" in open_host.stderr, open_host.stderr
    assert "--insecure" in open_host.stderr  # the error says how to serve it open on purpose


def test_insecure_config_key_lets_an_open_host_pass_the_check(monkeypatch):
    from genray.config import ServeFileConfig, load_config
    from genray.serving.deploy import open_access_warning

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    path = "configs/serve/denoise.yaml"
    assert open_access_warning(load_config(path, ["http_options.host=0.0.0.0"], cls=ServeFileConfig))
    insecure = load_config(path, ["http_options.host=0.0.0.0", "applications.0.args.insecure=true"],
                           cls=ServeFileConfig)
    assert open_access_warning(insecure) is None


# -- one app for the HTTP checks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hard_app(serve_http, serve_family_uris, tmp_path_factory):
    from ray import serve

    from genray.serving.app import build_app

    slow = save_untrained_artifact(str(tmp_path_factory.mktemp("slow") / "slow"), "photo_denoiser", **SLOW)
    args = {
        "models": {"denoise": {"uri": serve_family_uris["models"]["photo_denoiser"], "num_cpus": 0.05},
                   "slow": {"uri": slow, "num_cpus": 0.25, "max_batch_size": 1, "max_ongoing_requests": 1,
                            "max_queued_requests": 64}},
        "gateway": {"num_cpus": 0.05},
        "body_read_timeout_s": 2,
        "max_pixels": 200_000,
    }
    serve.run(build_app(args), name="hard", route_prefix="/hard")
    yield f"{serve_http}/hard"
    serve.delete("hard")


def _connect(base: str) -> tuple[socket.socket, str]:
    url = urlsplit(base)
    return socket.create_connection((url.hostname, url.port), timeout=5), url.path


def _read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        got = sock.recv(4096)
        if not got:
            break
        data += got
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def test_a_trickled_upload_is_cut_off_with_408(hard_app):
    sock, path = _connect(hard_app)
    declared = 1_000_000  # at 100 bytes per 0.2 s the whole body would take over half an hour
    sock.sendall(f"POST {path}/denoise HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode())
    sock.setblocking(False)
    started, status = time.monotonic(), None
    while time.monotonic() - started < 90:  # generous: the limit is 2 s
        try:
            sock.sendall(b"\0" * 100)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        time.sleep(0.2)
        try:
            if sock.recv(1, socket.MSG_PEEK):
                break
        except BlockingIOError:
            continue
        except ConnectionResetError:
            break
    sock.setblocking(True)
    sock.settimeout(10)
    status = _read_status(sock)
    sock.close()
    assert status == 408, status
    # The server is fine afterwards.
    ok = requests.post(f"{hard_app}/denoise", data=encode_png(np.zeros((16, 16, 3), np.uint8)), timeout=60)
    assert ok.status_code == 200


def test_client_timeout_header_does_not_reach_the_proxy(hard_app):
    # Ray Serve's proxy reads x-request-timeout-seconds per request; a tiny value would make it answer 408 at
    # once (and 0 would switch its timeout off). The proxy guard strips it, so the request is served normally.
    r = requests.post(f"{hard_app}/slow", data=SLOW_IMAGE, timeout=120, headers={"x-request-timeout-seconds": "0.001"})
    assert r.status_code == 200, r.text


def _processed(base: str) -> int:
    """Images the slow model's replica has run since it started (with max_batch_size 1: its forwards)."""
    return requests.get(f"{base}/models", timeout=60).json()["models"]["slow"]["num_images"]


BIG_SLOW_IMAGE = encode_png(np.random.default_rng(2).integers(0, 255, (384, 384, 3), dtype=np.uint8))


def _fire_then_hang_up(base: str, n: int, headers: dict[str, str]) -> None:
    """n requests for the slow model on n connections, all sent, then all clients leave at once."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    socks = []
    for _ in range(n):
        sock, path = _connect(base)
        sock.sendall(f"POST {path}/slow HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(BIG_SLOW_IMAGE)}\r\n"
                     f"\r\n".encode() + BIG_SLOW_IMAGE)
        socks.append(sock)
    time.sleep(1.0)  # every request reaches the gateway; the replica takes one at a time, the rest queue
    for sock in socks:
        sock.close()


def test_disconnect_disabled_header_does_not_keep_abandoned_requests_running(hard_app):
    started = time.monotonic()
    assert requests.post(f"{hard_app}/slow", data=BIG_SLOW_IMAGE, timeout=300).status_code == 200  # warm
    one = time.monotonic() - started  # about one forward (plus HTTP): the replica runs one at a time
    before = _processed(hard_app)
    # The replica gets through ~1.5 s / one requests before the clients leave (the 1 s they are given to arrive,
    # plus sending): n is four times that, so "cancelled" (about n/4) and "kept" (n) stay apart on a fast machine.
    n = min(60, max(8, round(4 * 1.5 / one)))
    _fire_then_hang_up(hard_app, n, {"x-request-disconnect-disabled": "?1"})
    time.sleep(1.5 * n * one + 5)  # room for all n to run one after the other, had they been kept
    processed = _processed(hard_app) - before
    # Honoured, the header would keep all n abandoned requests running to the end; stripped, the disconnects
    # cancel the queued ones.
    assert processed <= n // 2, processed


# -- decode limits as in bulk jobs -------------------------------------------------------------------------

def test_16_bit_uploads_are_bounded_and_decoded(hard_app):
    big = Image.fromarray(np.full((500, 500), 40000, np.uint16))  # 250,000 px > max_pixels 200,000
    r = requests.post(f"{hard_app}/denoise", data=image_bytes(big, "PNG"), timeout=60)
    assert r.status_code == 413 and "limit 200,000" in r.json()["detail"], r.text
    small = Image.fromarray(np.full((64, 64), 40000, np.uint16))
    r = requests.post(f"{hard_app}/denoise", data=image_bytes(small, "PNG"), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    floats = Image.fromarray(np.full((500, 500), 0.5, np.float32))  # float TIFF over the pixel cap
    r = requests.post(f"{hard_app}/denoise", data=image_bytes(floats, "TIFF"), timeout=60)
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("fmt", ["PCX", "TGA", "PPM", "SGI"])
def test_formats_outside_the_allowlist_are_refused(hard_app, fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format=fmt)
    r = requests.post(f"{hard_app}/denoise", data=buffer.getvalue(), timeout=60)
    assert r.status_code == 400 and "bad image" in r.json()["detail"], r.text


# -- a timed-out forward stops ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["image", "style"])
def test_a_timed_out_forward_stops_between_tiles(serve_app, tmp_path, kind):
    """An image model's replica and the multiplexed style pool's: a 504 cancels the request, and the forward
    running for it in the replica's thread stops at its next tile batch instead of holding the replica."""
    tiles = {"num_cpus": 0.25, "max_batch_size": 1, "tile": 64, "tile_overlap": 8}
    if kind == "image":
        # Wider and deeper than SLOW: a fast 2-core CI machine ran SLOW's 196 tiles of this image within the
        # timeout. 1024x1024 in 64-px tiles, one tile per forward: ~360 forward calls (~1.2 GFLOP each), far
        # beyond the 0.5 s timeout on any CPU.
        slow = save_untrained_artifact(str(tmp_path / "slow"), "photo_denoiser", depth=8, width=64)
        app, route = {"models": {"slow": {"uri": slow, **tiles}}}, "slow"
    else:  # Johnson's widths: ~3 GFLOP per 80-px tile
        slow = save_untrained_artifact(str(tmp_path / "slow-style"), "style_net", widths=(64, 128, 256),
                                       num_residual=5)
        app, route = {"styles": {"uris": {"slow": slow}, **tiles}}, "style/slow"
    base = serve_app({**app, "gateway": {"num_cpus": 0.05}, "request_timeout_s": 0.5}, name=f"cancel-{kind}")
    def replica() -> dict:
        info = requests.get(f"{base}/models", timeout=60).json()
        return info["models"]["slow"] if kind == "image" else info["styles"]

    small = encode_png(np.zeros((16, 16, 3), np.uint8))
    # The style pool loads a style on its first request (which may itself time out): load it first.
    assert requests.post(f"{base}/{route}", data=small, timeout=120).status_code in (200, 504)
    for _ in range(60):
        if kind == "image" or replica()["loaded_on_replica"] == ["slow"]:
            break
        time.sleep(1)
    time.sleep(1)  # a timed-out warm-up's forward (16 px: one tile) has ended
    before = replica()["num_abandoned_forwards"]
    big = encode_png(np.random.default_rng(1).integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
    r = requests.post(f"{base}/{route}", data=big, timeout=120)
    assert r.status_code == 504, r.text
    for _ in range(60):  # generous: the forward notices at its next tile
        if replica()["num_abandoned_forwards"] > before:
            break
        time.sleep(1)
    assert replica()["num_abandoned_forwards"] == before + 1
    assert requests.post(f"{base}/{route}", data=small, timeout=120).status_code == 200  # the replica is free again
