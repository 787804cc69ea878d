"""genray.model_artifact + genray.inference: a real tiny denoise_ae artefact, saved locally and to S3, run by Predictor."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genray import storage
from genray.model_artifact import ArtifactError, compute_digest, load_artifact, read_meta, save_artifact
from genray.images import to_float
from genray.inference import Predictor
from genray.metrics import psnr
from genray.models import MODELS, get_spec

SPEC = get_spec("denoise_ae")


def _shapes(height: int, width: int, channels: int = 1, seed: int = 0, count: int = 6) -> np.ndarray:
    """uint8 (H, W, C): bright rectangles on a dark, slightly noisy background (structure a denoiser keeps)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, (height, width, channels)).astype(np.uint8)
    for _ in range(count):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        h, w = rng.integers(4, max(5, height // 3)), rng.integers(4, max(5, width // 3))
        image[y : y + h, x : x + w] = rng.integers(140, 256, channels)
    return image


@functools.lru_cache(maxsize=None)
def _trained():
    """(cfg, model): the tiny denoise_ae trained for a few dozen steps, so its output has real structure."""
    cfg = SPEC.config_cls.tiny()
    batch = torch.from_numpy(to_float(np.stack([_shapes(28, 28, seed=i) for i in range(16)]), "sigmoid"))
    torch.manual_seed(0)
    state = SPEC.init_training(cfg, 1e-2)
    for _ in range(60):
        SPEC.train_step(state, batch)
    return cfg, state.model.eval()


def _save(uri: str, cfg=None, model=None) -> dict:
    trained_cfg, trained_model = _trained()
    return save_artifact(uri, SPEC, cfg or trained_cfg, model or trained_model, {"psnr_gain_db": 1.5})


def _artifact(tmp_path: Path) -> str:
    uri = str(tmp_path / "model")
    _save(uri)
    return uri


def _rewrite_meta(uri: str, **changes) -> dict:
    path = Path(uri) / "model.json"
    meta = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(meta))
    return meta


# --- saving and loading --------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    uri = _artifact(tmp_path)
    cfg, model = _trained()
    meta = read_meta(uri)
    assert meta["family"] == "denoise_ae" and meta["task"] == "denoise" and meta["value_range"] == "sigmoid"
    assert meta["config"] == cfg.model_dump(mode="json")
    assert meta["metrics"] == {"psnr_gain_db": 1.5}
    assert meta["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["digest"].startswith("sha256:")
    spec, loaded_cfg, loaded, _ = load_artifact(uri)
    assert spec is SPEC and loaded_cfg == cfg and not loaded.training
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_digest_is_stable_and_changes_with_weights_and_config(tmp_path):
    cfg, model = _trained()
    first = _save(str(tmp_path / "a"))["digest"]
    assert _save(str(tmp_path / "b"))["digest"] == first  # same weights + config -> same digest
    changed = SPEC.build(cfg)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.decoder[-1].bias += 1e-3
    assert _save(str(tmp_path / "c"), model=changed)["digest"] != first
    weights = (tmp_path / "a" / "weights.pt").read_bytes()
    other_cfg = cfg.model_copy(update={"noise_std": 0.3}).model_dump(mode="json")
    assert compute_digest(weights, "denoise_ae", other_cfg) != first


# --- Predictor on images -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(28, 28, 1), (30, 45, 1), (29, 37, 3), (3, 5, 1)])
def test_output_shape_and_dtype_match_input(tmp_path, shape):
    predictor = Predictor.from_uri(_artifact(tmp_path), device="cpu")
    image = _shapes(*shape) if min(shape[:2]) > 8 else np.full(shape, 200, np.uint8)
    (out,) = predictor([image])
    assert out.shape == image.shape and out.dtype == np.uint8


def test_denoises_noisy_input(tmp_path):
    """The uint8 <-> float rule is right end to end: the output is closer to the clean image than the input."""
    predictor = Predictor.from_uri(_artifact(tmp_path), device="cpu")
    clean = _shapes(28, 28, seed=100)
    rng = np.random.default_rng(1)
    noisy = np.clip(clean + rng.normal(0, 0.4 * 255, clean.shape), 0, 255).astype(np.uint8)
    (out,) = predictor([noisy])
    assert psnr(clean, out, 255) > psnr(clean, noisy, 255) + 1.0


def test_odd_size_matches_padded_whole_image(tmp_path):
    """30x45 is padded to 32x48 for the stride-4 model and cropped back; the kept pixels see the same inputs."""
    uri = _artifact(tmp_path)
    predictor = Predictor.from_uri(uri, device="cpu")
    image = _shapes(30, 45, seed=3)
    (out,) = predictor([image])
    padded = np.pad(image, ((0, 2), (0, 3), (0, 0)), mode="symmetric")
    _, _, model, _ = load_artifact(uri)
    with torch.no_grad():
        direct = model(torch.from_numpy(to_float(padded[None], "sigmoid")))[0, 0, :30, :45].numpy()
    assert np.abs(out[:, :, 0].astype(float) - np.rint(direct * 255)).max() <= 1


def test_rgb_image_is_processed_plane_by_plane(tmp_path):
    predictor = Predictor.from_uri(_artifact(tmp_path), device="cpu")
    rgb = _shapes(28, 36, channels=3, seed=5)
    (out,) = predictor([rgb])
    assert out.shape == rgb.shape and out.dtype == np.uint8
    planes = predictor([rgb[:, :, k : k + 1].copy() for k in range(3)])
    for k in range(3):
        assert np.abs(out[:, :, k].astype(int) - planes[k][:, :, 0]).max() <= 1
    assert not np.array_equal(out[:, :, 0], out[:, :, 1])  # colour kept, not collapsed to grey


def test_batch_of_mixed_sizes_equals_one_by_one(tmp_path):
    predictor = Predictor.from_uri(_artifact(tmp_path), device="cpu", batch_size=2)
    images = [_shapes(28, 28, seed=1), _shapes(30, 45, seed=2), _shapes(28, 28, seed=3),
              _shapes(24, 20, 3, seed=4), _shapes(28, 28, seed=5)]
    outs = predictor(images)
    assert [o.shape for o in outs] == [i.shape for i in images]
    for image, out in zip(images, outs):
        (alone,) = predictor([image])
        assert np.abs(out.astype(int) - alone).max() <= 1


def test_empty_call_and_bad_inputs(tmp_path):
    predictor = Predictor.from_uri(_artifact(tmp_path), device="cpu")
    assert predictor([]) == []
    for bad in [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 2), np.uint8), np.zeros((8, 8, 1), np.float32)]:
        with pytest.raises(ValueError, match="uint8 HWC"):
            predictor([bad])


@pytest.mark.parametrize("tile, overlap", [(64, 16), (60, 14), (50, 18)])
def test_tiled_equals_untiled(tmp_path, tile, overlap):
    """120x130 cut into tiles and stitched back. Without alignment the far-edge tiles (x=66 for tile 64) start off
    the stride-4 grid and differ by ~27 grey levels; tile/overlap that are not multiples of 4 are rounded onto it.
    The overlap must still cover the receptive field (stitch_tiles' r <= overlap // 4): 12 is 3 levels off."""
    uri = _artifact(tmp_path)
    image = _shapes(120, 130, seed=11, count=20)
    (whole,) = Predictor.from_uri(uri, device="cpu", tile=512)([image])
    (tiled,) = Predictor.from_uri(uri, device="cpu", tile=tile, tile_overlap=overlap)([image])
    assert whole.std() > 20  # a real, structured output, so "within one grey level" means something
    assert tiled.shape == whole.shape == image.shape
    assert np.abs(tiled.astype(int) - whole).max() <= 1


def test_tile_must_exceed_twice_the_overlap(tmp_path):
    with pytest.raises(ValueError, match="twice the overlap"):
        Predictor.from_uri(_artifact(tmp_path), device="cpu", tile=64, tile_overlap=32)


# --- S3 ------------------------------------------------------------------------------------------------------

def test_s3_artifact_matches_local(tmp_path, s3_bucket):
    s3_uri = f"{s3_bucket}/runs/tiny/model"
    meta = _save(s3_uri)
    assert storage.exists(f"{s3_uri}/weights.pt") and storage.exists(f"{s3_uri}/model.json")
    remote = Predictor.from_uri(s3_uri, device="cpu")
    local = Predictor.from_uri(_artifact(tmp_path), device="cpu")
    assert remote.digest == meta["digest"] == local.digest
    assert remote.task == "denoise" and remote.scale == 1
    image = _shapes(30, 45, seed=9)
    np.testing.assert_array_equal(remote([image])[0], local([image])[0])


def test_s3_prefix_without_artifact(s3_bucket):
    with pytest.raises(ArtifactError, match="not a genray model artefact"):
        Predictor.from_uri(f"{s3_bucket}/nothing/here", device="cpu")


# --- broken artefacts ----------------------------------------------------------------------------------------

def test_corrupted_weights_fail_the_digest(tmp_path):
    uri = _artifact(tmp_path)
    weights = tmp_path / "model" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="digest") as err:
        Predictor.from_uri(uri, device="cpu")
    assert uri in str(err.value)


def test_missing_weights(tmp_path):
    uri = _artifact(tmp_path)
    (tmp_path / "model" / "weights.pt").unlink()
    with pytest.raises(ArtifactError, match="cannot read weights.pt"):
        load_artifact(uri)


def test_unknown_family_lists_families(tmp_path):
    uri = _artifact(tmp_path)
    _rewrite_meta(uri, family="denoise_vae")
    with pytest.raises(ArtifactError) as err:
        Predictor.from_uri(uri, device="cpu")
    text = str(err.value)
    assert uri in text and "denoise_vae" in text and "valid families" in text
    assert all(name in text for name in MODELS)


@pytest.mark.parametrize("make", ["missing_dir", "empty_dir", "other_files"])
def test_directory_without_model_json(tmp_path, make):
    uri = str(tmp_path / "not_a_model")
    if make != "missing_dir":
        Path(uri).mkdir()
    if make == "other_files":
        (Path(uri) / "weights.pt").write_bytes(b"x")
        (Path(uri) / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactError, match="not a genray model artefact") as err:
        Predictor.from_uri(uri, device="cpu")
    assert uri in str(err.value)


@pytest.mark.parametrize("content, match", [("{not json", "not valid JSON"),
                                            ('{"family": "denoise_ae"}', "lacks family/config/digest"),
                                            ("[1, 2]", "lacks family/config/digest")])
def test_unusable_model_json(tmp_path, content, match):
    uri = _artifact(tmp_path)
    (tmp_path / "model" / "model.json").write_text(content)
    with pytest.raises(ArtifactError, match=match):
        load_artifact(uri)


def test_invalid_config_in_model_json(tmp_path):
    uri = _artifact(tmp_path)
    meta = read_meta(uri)
    _rewrite_meta(uri, config={**meta["config"], "filterz": [4, 4]})
    with pytest.raises(ArtifactError, match="filterz"):
        load_artifact(uri)


def test_weights_of_a_different_config_do_not_load(tmp_path):
    uri = _artifact(tmp_path)
    meta = read_meta(uri)
    config = {**meta["config"], "filters": [8, 4]}  # the tiny model has (4, 4): every tensor shape differs
    weights = (tmp_path / "model" / "weights.pt").read_bytes()
    _rewrite_meta(uri, config=config, digest=compute_digest(weights, "denoise_ae", config))
    with pytest.raises(ArtifactError, match="weights do not load into a denoise_ae model") as err:
        Predictor.from_uri(uri, device="cpu")
    assert "\n" not in str(err.value)  # torch's long error text is cut to its first line
