"""Serve for browsers and clients: multipart uploads beside raw bodies, the output format by `?format=` or `Accept`,
provenance in headers and in the image, and per-route request metrics that reach Ray's Prometheus export.

The first tests need no Ray (negotiation, encoding, form parsing); the rest send real HTTP to the app serving every
family (tests/conftest.py `serve_families`).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from genray import __version__
from genray.images import decode_image, encode_image, encode_png, read_metadata
from genray.model_artifact import read_meta
from genray.serving.outputs import negotiate, provenance_headers
from genray.serving.uploads import FormImage, UploadError, body_reader

BROWSER_IMG_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"  # what <img src> sends
MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}
PROVENANCE_HEADERS = ("x-genray-model", "x-genray-model-family", "x-genray-model-digest", "x-genray-version")


def noise(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def form(files: dict, data: dict | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type as `requests` (a real client) encodes them."""
    prepared = requests.Request("POST", "http://x/", files=files, data=data).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def format_of(data: bytes) -> str:
    return next(fmt for fmt, magic in MAGIC.items() if data.startswith(magic))


# -- no Ray: the pieces ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("accept, expected", [
    (None, "png"), ("", "png"), ("*/*", "png"),
    (BROWSER_IMG_ACCEPT, "png"),  # webp, png and jpeg all at q=1: ties go to lossless PNG
    ("image/webp", "webp"), ("IMAGE/JPEG", "jpeg"),
    ("image/jpeg, image/png;q=0.5", "jpeg"), ("image/*;q=0.5, image/webp", "webp"),
    ("image/png;q=0, */*", "webp"),  # PNG refused outright: the next preference
    ("image/jpeg;q=oops, image/png;q=0.1", "png"),  # a malformed q counts as 0, not as an error
    ("text/html, image/webp;q=0.9, application/json", "webp"),
])
def test_accept_header_picks_the_output_format(accept, expected):
    assert negotiate(accept) == expected


@pytest.mark.parametrize("accept", ["image/gif", "application/json", "*/*;q=0", "image/png;q=0, image/*;q=0"])
def test_accept_without_a_servable_format_is_406(accept):
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as caught:
        negotiate(accept)
    assert caught.value.status_code == 406 and "image/png, image/jpeg or image/webp" in caught.value.detail


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_encoded_images_carry_their_provenance(fmt, channels):
    metadata = {"genray:model": 'odd "name" <&>', "genray:model-digest": "sha256:" + "ab" * 32,
                "genray:version": __version__}
    data = encode_image(noise(0, (20, 30, channels)), fmt, metadata=metadata)
    assert format_of(data) == fmt and read_metadata(data) == metadata
    assert decode_image(data, channels=None).shape[:2] == (20, 30)
    if fmt != "png":  # EXIF too, where most viewers look
        from PIL import Image
        import io

        exif = Image.open(io.BytesIO(data)).getexif()
        assert exif[0x0131] == f"genray {__version__}" and "sha256:abab" in exif[0x010E]
    assert read_metadata(encode_image(noise(0, (4, 4, 3)), fmt)) == {}  # nothing asked, nothing written


def test_provenance_header_names():
    assert provenance_headers({"genray:model": "x4", "genray:model-digest": "sha256:1", "genray:version": "1"}) == {
        "X-Genray-Model": "x4", "X-Genray-Model-Digest": "sha256:1", "X-Genray-Version": "1"}


def test_openapi_documents_form_uploads_and_output_formats():
    from genray.serving.gateway import api

    paths = api.openapi()["paths"]
    for path in ("/{name}", "/style/{style}", "/vae/{model}/reconstruct", "/classify/{model}"):
        body = paths[path]["post"]["requestBody"]["content"]
        assert body["multipart/form-data"]["schema"]["required"] == ["image"] and "image/*" in body
    for path, method in (("/{name}", "post"), ("/generate/{model}", "get"), ("/vae/{model}/interpolate", "get")):
        operation = paths[path][method]
        assert set(operation["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
        assert {"format", "quality"} <= {p["name"] for p in operation["parameters"]}


def feed(content_type: str, body: bytes, step: int) -> bytes:
    reader = body_reader(content_type)
    for i in range(0, len(body), step):
        reader.write(body[i:i + step])
    return reader.result()


@pytest.mark.parametrize("step", [1, 7, 1 << 20])  # the boundary may fall anywhere between network chunks
def test_form_image_is_found_however_the_body_is_chunked(step):
    png = encode_png(noise(1, (9, 11, 3)))
    other = encode_png(noise(2, (3, 3, 3)))
    body, ctype = form({"thumbnail": ("t.png", other, "image/png"), "image": ("x.png", png, "image/png")},
                       data={"note": "a text field"})
    assert feed(ctype, body, step) == png  # the part named `image` wins over another file
    body, ctype = form({"file": ("photo.png", png, "image/png")}, data={"submit": "go"})
    assert feed(ctype, body, step) == png  # no `image` field: the form's only file (what a plain HTML form sends)
    assert feed("application/octet-stream", png, step) == png  # a raw body is the image itself


@pytest.mark.parametrize("files, data, says", [
    ({"note": (None, "text only")}, None, "no image"),  # (None, ...): a field without a filename
    ({"a": ("a.png", b"1"), "b": ("b.png", b"2")}, None, "2 files and none named `image`"),
    ({"image": ("a.png", b"1")}, {"image": "again"}, "2 `image` fields"),
])
def test_forms_without_one_clear_image_are_refused(files, data, says):
    body, ctype = form(files, data)
    with pytest.raises(UploadError, match=says):
        feed(ctype, body, 1 << 20)


def test_malformed_forms_are_refused():
    with pytest.raises(UploadError, match="boundary"):
        FormImage("multipart/form-data")
    with pytest.raises(UploadError, match="malformed"):
        feed("multipart/form-data; boundary=xyz", b"--xyz\r\nno-colon-header\r\n\r\ndata\r\n--xyz--\r\n", 1 << 20)
    body, ctype = form({f"f{i}": (f"{i}.png", b"x") for i in range(70)})
    with pytest.raises(UploadError, match="more than 64 parts"):
        feed(ctype, body, 1 << 20)


# -- over real HTTP, through Serve's proxy ----------------------------------------------------------------------

# Every route that takes an upload, and how to compare two answers to the same image.
UPLOAD_ROUTES = ["/tiny-photo_denoiser", "/tiny-srgan", "/style/a", "/vae/tiny-vae/reconstruct",
                 "/classify/tiny-sae_classifier"]


@pytest.mark.parametrize("path", UPLOAD_ROUTES)
def test_multipart_upload_answers_like_the_raw_body(serve_families, path):
    base, _ = serve_families
    png = encode_png(noise(3, (12, 16, 3)))
    raw = requests.post(f"{base}{path}", data=png, timeout=60)
    curl_f = requests.post(f"{base}{path}", files={"image": ("x.png", png, "image/png")}, timeout=60)
    html_form = requests.post(f"{base}{path}", files={"file": ("photo.png", png, "image/png")},
                              data={"endpoint": path}, timeout=60)
    assert raw.status_code == curl_f.status_code == html_form.status_code == 200, (raw.text, curl_f.text)
    if path.startswith("/classify"):
        assert curl_f.json() == raw.json() == html_form.json()
    else:
        assert curl_f.headers["content-type"] == "image/png"
        expected = decode_image(raw.content, channels=None)
        assert np.array_equal(decode_image(curl_f.content, channels=None), expected)
        assert np.array_equal(decode_image(html_form.content, channels=None), expected)


def test_multipart_limits_and_errors(serve_families):
    base, args = serve_families
    limit = args["max_body_bytes"]
    not_an_image = b"\x01" * (limit + 1000)  # 413 from the size, never "bad image": nothing was decoded
    r = requests.post(f"{base}/tiny-photo_denoiser", files={"image": ("big.png", not_an_image)}, timeout=60)
    assert r.status_code == 413 and f"{limit}-byte limit" in r.json()["detail"], r.text
    body, ctype = form({"image": ("big.png", not_an_image)})
    chunked = (body[i:i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: counted as it streams
    r = requests.post(f"{base}/style/a", data=chunked, headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == 413 and f"{limit}-byte limit" in r.json()["detail"], r.text
    big_pixels = encode_png(np.zeros((1001, 1000, 1), np.uint8))  # a small file that decodes over max_pixels
    r = requests.post(f"{base}/tiny-photo_denoiser", files={"image": ("x.png", big_pixels)}, timeout=60)
    assert r.status_code == 413 and "1000x1001" in r.json()["detail"]
    r = requests.post(f"{base}/tiny-photo_denoiser", files={"image": ("x.png", b"not an image")}, timeout=60)
    assert r.status_code == 400 and r.json()["detail"].startswith("bad image")
    r = requests.post(f"{base}/tiny-photo_denoiser", data={"image": ""}, files={"other": ("x.txt", b"1")},
                      timeout=60)  # an `image` field that is empty text, beside another file
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = requests.post(f"{base}/tiny-photo_denoiser", files={"a": ("a.png", b"1"), "b": ("b.png", b"2")}, timeout=60)
    assert r.status_code == 400 and "curl -F image=@" in r.json()["detail"]


@pytest.mark.parametrize("path, method, params, shape", [
    ("/tiny-srgan", "post", {}, (48, 64, 3)),
    ("/style/b", "post", {}, (12, 16, 3)),
    ("/vae/tiny-vae/reconstruct", "post", {}, (16, 16, 1)),
    ("/generate/tiny-dcgan", "get", {"n": 4, "seed": 5}, (62, 62, 1)),
    ("/vae/tiny-vae/interpolate", "get", {"steps": 3, "seed": 5}, (20, 56, 1)),
])
def test_output_format_follows_accept_or_format(serve_families, path, method, params, shape):
    base, _ = serve_families
    upload = encode_png(noise(4, (12, 16, 3)))

    def ask(accept: str | None = None, **query) -> requests.Response:
        headers = {"Accept": accept} if accept is not None else {}
        return getattr(requests, method)(f"{base}{path}", params={**params, **query}, headers=headers,
                                         data=upload if method == "post" else None, timeout=60)

    answers = {"png": ask(), "jpeg": ask("image/jpeg"), "webp": ask("image/webp, image/png;q=0.5")}
    for fmt, r in answers.items():
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == f"image/{fmt}" and format_of(r.content) == fmt
        assert r.headers["vary"] == "Accept"
        decoded = decode_image(r.content, channels=shape[2])  # WebP stores grey as RGB: read it back as grey
        assert decoded.shape == shape
    assert ask(BROWSER_IMG_ACCEPT).headers["content-type"] == "image/png"
    # ?format= overrides Accept; jpg is jpeg; quality trades size for fidelity.
    r = ask("image/webp", format="jpg", quality=95)
    assert r.headers["content-type"] == "image/jpeg" and format_of(r.content) == "jpeg"
    assert len(ask(format="jpeg", quality=5).content) < len(r.content)
    # Nothing acceptable: 406 at once (the upload is not even read); a bad ?format= is 400.
    r = ask("image/gif")
    assert r.status_code == 406 and "image/png, image/jpeg or image/webp" in r.json()["detail"]
    assert ask(format="gif").status_code == 400 and ask(format="png", quality=0).status_code == 400


def test_outputs_carry_the_models_provenance(serve_families, serve_family_uris):
    base, _ = serve_families
    upload = encode_png(noise(5, (12, 16, 3)))
    cases = [  # (request, the model name it answers as, the artefact)
        (lambda fmt: requests.post(f"{base}/tiny-srgan", data=upload, params={"format": fmt}, timeout=60),
         "tiny-srgan", serve_family_uris["models"]["srgan"]),
        (lambda fmt: requests.post(f"{base}/style/c", files={"image": ("x.png", upload)}, params={"format": fmt},
                                   timeout=60), "c", serve_family_uris["styles"]["c"]),
        (lambda fmt: requests.get(f"{base}/generate/tiny-vae", params={"n": 2, "seed": 7, "format": fmt}, timeout=60),
         "tiny-vae", serve_family_uris["models"]["vae"]),
    ]
    for ask, name, uri in cases:
        meta = read_meta(uri)
        for fmt in ("png", "jpeg", "webp"):
            r = ask(fmt)
            assert r.status_code == 200, r.text
            headers = {h: r.headers[h] for h in PROVENANCE_HEADERS}
            assert headers == {"x-genray-model": name, "x-genray-model-family": meta["family"],
                               "x-genray-model-digest": meta["digest"], "x-genray-version": __version__}
            embedded = read_metadata(r.content)  # the same, inside the file (PNG text chunks / XMP)
            assert {f"x-{k.replace(':', '-')}": v for k, v in embedded.items() if k != "genray:seed"} == headers
            if "x-seed" in r.headers:  # a sample also records the seed that draws it again
                assert embedded["genray:seed"] == r.headers["x-seed"] == "7"
    r = requests.post(f"{base}/classify/tiny-sae_classifier", data=upload, timeout=60)  # JSON: headers only
    assert r.headers["x-genray-model-digest"] == read_meta(serve_family_uris["models"]["sae_classifier"])["digest"]


def metric_series(text: str, family: str, **labels: str) -> dict[tuple, float]:
    """The series of a Prometheus counter (its total) or histogram (its count) whose labels include `labels`, by
    their full label set (one series per replica)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {tuple(sorted(sample.labels.items())): sample.value
            for metric in text_string_to_metric_families(text) if metric.name == family
            for sample in metric.samples
            if sample.name in (f"{family}_total", f"{family}_count")
            and all(sample.labels.get(k) == v for k, v in labels.items())}


def test_route_metrics_reach_rays_prometheus_export(serve_families):
    """The gateway's Counter and Histogram (ray.serve.metrics) as Prometheus scrapes them: from this node's metrics
    export port, where Ray's agent publishes what every worker recorded (every ~10 s)."""
    import ray

    base, _ = serve_families
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{port}/metrics"
    ok = {"route": "/{name}", "model": "tiny-dense_ae", "status": "200", "application": "families"}
    refused = {"route": "/{name}", "model": "tiny-dense_ae", "status": "406"}
    unknown = {"route": "/{name}", "model": "", "status": "404"}

    queries = [("ray_genray_requests", ok), ("ray_genray_requests", refused), ("ray_genray_requests", unknown),
               ("ray_genray_request_latency_ms", ok)]

    def scrape() -> list[dict[tuple, float]]:
        text = requests.get(url, timeout=10).text
        return [metric_series(text, family, **labels) for family, labels in queries]

    def rises(now: list[dict], then: list[dict]) -> list[float]:
        # Per series: a replica of an app an earlier test module deleted may still be listed, or drop out.
        return [sum(value - old.get(key, 0.0) for key, value in new.items()) for new, old in zip(now, then)]

    before = scrape()
    upload = encode_png(noise(6, (28, 28, 1)))
    for _ in range(3):
        assert requests.post(f"{base}/tiny-dense_ae", data=upload, timeout=60).status_code == 200
    assert requests.post(f"{base}/tiny-dense_ae", data=upload, headers={"Accept": "image/gif"},
                         timeout=60).status_code == 406
    for made_up in ("no-such-model", "nor-this-one"):  # unserved names share one label value: ""
        assert requests.post(f"{base}/{made_up}", data=upload, timeout=60).status_code == 404
    expected = [3, 1, 2, 3]  # requests answered 200 (counted, and timed), 406, 404; latencies observed for the 200s
    deadline = time.monotonic() + 60
    while (seen := rises(scrape(), before)) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert seen == expected, (before, seen)
    text = requests.get(url, timeout=10).text
    assert 'model="no-such-model"' not in text and 'ray_genray_request_latency_ms_bucket{' in text


def test_the_upload_page_works_in_chromium(serve_families, tmp_path):
    """The gateway's page at its root, in headless Chromium: it lists the served endpoints from GET models, a user
    picks the x4 model and a file, presses Run, and the page shows the model's answer next to the upload; no
    console errors or failed requests on the way."""
    from browser import upload_through_the_page

    base, _ = serve_families
    upload = tmp_path / "photo.png"
    upload.write_bytes(encode_png(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)))
    page, seen = upload_through_the_page(base, "tiny-srgan", str(upload))
    assert page.errors == [] and page.title == "genray"
    assert {"tiny-srgan", "tiny-photo_denoiser"} <= set(seen["options"]) and any(
        o.startswith("style/") for o in seen["options"])
    assert seen["before"] == 32 and seen["after"] == [128, 96]  # x4 of the 32x24 upload, through the page
    assert "PNG" in seen["caption"] and "sha256:" in seen["caption"]
    # docs/serve-page.png is the same page on the zoo's models (tests/test_zoo.py).
