"""The model zoo shipped in genray/zoo: every model loads by its zoo: URI, matches the digest and config digest in
the index, and reproduces its recorded held-out metrics (re-measured here, nothing re-trained); `genray zoo list`
and a bulk job with `--model zoo:...` through the real CLI and S3 server, with no training."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from genray import storage, zoo
from genray.config import load_config, read_yaml
from genray.datasets import export_dataset, load_embedded
from genray.images import decode_image, encode_png, resize
from genray.model_artifact import ArtifactError, load_artifact
from genray.pipeline.stages import digest_of

from helpers import genray, read_manifest_table

REPO = Path(__file__).resolve().parent.parent
NAMES = sorted(zoo.index())
# The tolerances: 0.05 dB on PSNRs, 0.5 % on everything else.
DB_TOLERANCE, RELATIVE_TOLERANCE = 0.05, 0.005


def test_the_zoo_ships_the_promised_models():
    assert {"srresnet-x4", "photo-denoiser-s25", "digits-denoise-ae", "digits-vae", "digits-dcgan",
            "digits-classifier"} <= set(NAMES)
    total = sum(entry["bytes"] for entry in zoo.index().values())
    assert total < 8e6, f"the zoo is {total / 1e6:.1f} MB: keep it a few MB"


@pytest.fixture(scope="module")
def embedded_data(tmp_path_factory) -> Path:
    """The embedded datasets as the training configs read them (s3://genray-data/<name>/...), on local disk."""
    root = tmp_path_factory.mktemp("genray-data")
    for name in ("digits", "photos"):
        export_dataset(name, str(root / name), split="test")
    return root


@pytest.mark.parametrize("name", NAMES)
def test_a_zoo_model_loads_matches_its_index_and_reproduces_its_metrics(name, embedded_data):
    entry = zoo.index()[name]
    spec, model_cfg, model, meta = load_artifact(f"zoo:{name}")  # checks weights.pt against model.json's digest
    assert (meta["digest"], spec.name, spec.task) == (entry["digest"], entry["family"], entry["task"])
    folder = Path(zoo.resolve(f"zoo:{name}"))
    assert sum(f.stat().st_size for f in folder.iterdir()) == entry["bytes"]
    # The training config in the repository is the one the model was trained with.
    assert digest_of(read_yaml(REPO / entry["config"])) == entry["config_digest"], \
        f"{entry['config']} changed since {name} was built: rebuild it (scripts/build_zoo.py {name})"

    measured = zoo.held_out_metrics(f"zoo:{name}", REPO / entry["config"], str(embedded_data))
    assert entry["metric"] in measured
    compared = sorted(k for k in measured if k in entry["metrics"] and k != "num_eval_images")
    assert entry["metric"] in compared
    for key in compared:
        recorded, now = entry["metrics"][key], measured[key]
        if key.endswith("_db"):
            assert abs(now - recorded) <= DB_TOLERANCE, (key, recorded, now)
        else:
            assert abs(now - recorded) <= RELATIVE_TOLERANCE * max(abs(recorded), 1e-6), (key, recorded, now)


def test_an_unknown_zoo_name_says_what_is_shipped():
    with pytest.raises(ArtifactError, match=r"zoo:nope: no such model in genray's zoo \(shipped: .*srresnet-x4"):
        load_artifact("zoo:nope")


@pytest.mark.integration
def test_zoo_list_and_a_bulk_job_with_a_zoo_model_through_the_cli(s3_bucket):
    listed = genray("zoo", "list")
    assert listed.returncode == 0, listed.stderr
    for name in NAMES:
        assert f"zoo:{name}" in listed.stdout
    assert json.loads(genray("zoo", "list", "--json").stdout)["srresnet-x4"]["family"] == "srgan"

    rng = np.random.default_rng(0)
    for i in range(3):
        storage.write_bytes(f"{s3_bucket}/lr/{i}.png", encode_png(rng.integers(0, 256, (24, 32, 3), np.uint8)))
    # The command: the zoo's x4 model, then a resize to x2 overall, written as WebP.
    run = genray("process", "superres", "-i", f"{s3_bucket}/lr/", "-o", f"{s3_bucket}/x4/",
                 "--model", "zoo:srresnet-x4", "--ext", "webp", "--outscale", "2", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_manifest_table(f"{s3_bucket}/x4").to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok"] * 3
    assert {r["model_digest"] for r in rows} == {zoo.index()["srresnet-x4"]["digest"]}
    assert sorted(r["output_key"] for r in rows) == ["0.webp", "1.webp", "2.webp"]
    webp = storage.read_bytes(f"{s3_bucket}/x4/0.webp")
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    assert decode_image(webp).shape == (48, 64, 3)


@pytest.mark.integration
def test_configs_serve_zoo_serves_the_shipped_models(serve_app, tmp_path):
    """configs/serve/zoo.yaml as shipped (on the test session's Serve): real HTTP to every endpoint, each answering
    with the zoo artefact's digest; then the page at / in headless Chromium super-resolves a held-out photo."""
    import requests

    from genray.config import ServeFileConfig

    [app] = load_config(REPO / "configs/serve/zoo.yaml", cls=ServeFileConfig).applications
    base = serve_app(app.args.model_dump(mode="json"), name="zoo")
    index = zoo.index()
    photo = np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8)
    r = requests.post(f"{base}/superres", data=encode_png(photo), timeout=120)
    assert r.status_code == 200, r.text
    assert decode_image(r.content).shape == (96, 128, 3)
    assert r.headers["x-genray-model-digest"] == index["srresnet-x4"]["digest"]
    digit = np.zeros((28, 28, 1), np.uint8)
    digit[6:22, 12:16] = 255  # a "1"
    r = requests.post(f"{base}/classify/digits", data=encode_png(digit), timeout=120)
    assert r.status_code == 200 and len(r.json()["probabilities"]) == 10, r.text
    for route in ("denoise", "digits-denoise"):
        image = photo if route == "denoise" else digit
        r = requests.post(f"{base}/{route}", data=encode_png(image), timeout=120)
        assert r.status_code == 200 and decode_image(r.content).shape[:2] == image.shape[:2], (route, r.text)
    for name in ("digits-vae", "digits-dcgan"):
        r = requests.get(f"{base}/generate/{name}", params={"n": 4, "seed": 0}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", (name, r.text)
        assert r.headers["x-genray-model-digest"] == index[name]["digest"]

    # The page, as a user meets it: the zoo's x4 model on a quarter-size crop of a held-out photo.
    from browser import upload_through_the_page

    images, _, keys = load_embedded("photos")
    cat = images[keys.index("test/chelsea.png")][40:232, 100:356]  # 256x192 around the cat's face
    upload = tmp_path / "chelsea-quarter.png"
    upload.write_bytes(encode_png(resize(cat, 64, 48)))
    page, seen = upload_through_the_page(base, "superres", str(upload), height=700)
    assert page.errors == [] and seen["after"] == [256, 192], (page.errors, seen)
    assert index["srresnet-x4"]["digest"][:19] in seen["caption"]
    if os.environ.get("GENRAY_SCREENSHOT_DIR"):  # how docs/serve-page.png is made
        (Path(os.environ["GENRAY_SCREENSHOT_DIR"]) / "serve-page.png").write_bytes(page.screenshot)
