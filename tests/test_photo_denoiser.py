"""Photo denoiser family (genray.models.photo_denoiser): tiny DnCNN on CPU, no Ray."""

import functools

import numpy as np
import pytest
import torch

from genray.model_artifact import save_artifact
from genray.datasets import load_embedded
from genray.inference import Predictor
from genray.models import get_spec
from genray.models.data import fixed_batch
from genray.models.photo_denoiser import PhotoDenoiserConfig, add_noise

SPEC = get_spec("photo_denoiser")


@functools.lru_cache(maxsize=None)
def _photos() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, test) embedded photos."""
    images, _, keys = load_embedded("photos")
    train = [im for im, key in zip(images, keys) if key.startswith("train/")]
    test = [im for im, key in zip(images, keys) if key.startswith("test/")]
    return train, test


def test_architecture_is_dncnn():
    model = SPEC.build(PhotoDenoiserConfig())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 17 and len(norms) == 15
    assert convs[0].in_channels == 3 and convs[-1].out_channels == 3


@pytest.mark.parametrize("channels", [1, 3])
def test_keeps_size_on_odd_shapes_and_range(channels):
    model = SPEC.build(PhotoDenoiserConfig.tiny().model_copy(update={"channels": channels})).eval()
    for h, w in [(7, 13), (31, 5), (1, 1)]:
        with torch.no_grad():
            y = model(torch.rand(2, channels, h, w))
        assert y.shape == (2, channels, h, w) and 0 <= y.min() and y.max() <= 1


def test_output_is_input_minus_predicted_noise():
    model = SPEC.build(PhotoDenoiserConfig.tiny()).eval()
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(x), (x - model(x, return_noise=True)).clamp(0, 1))


def test_noise_has_requested_sigma():
    clean = torch.full((1, 3, 64, 64), 0.5)
    noisy = add_noise(clean, 25, torch.Generator().manual_seed(0))
    assert (noisy - clean).std().item() == pytest.approx(25 / 255, rel=0.05)


def test_training_on_one_photo_gains_psnr():
    """A few hundred steps on patches of one photo give a real PSNR gain on held-out photos."""
    train, test = _photos()
    cfg = PhotoDenoiserConfig(depth=5, width=16, patch=32, crops_per_image=64)
    dataset = SPEC.make_dataset(train[:1], None, cfg)
    torch.manual_seed(0)
    state = SPEC.init_training(cfg, 2e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)  # 4 batches per epoch
    for step in range(200):
        if step % len(loader) == 0:
            dataset.set_epoch(step // len(loader))  # fresh random patches
            batches = iter(loader)
        SPEC.train_step(state, next(batches))
    assert state.model.training  # evaluate must see eval mode from the caller, as the trainer gives it
    result = SPEC.evaluate(state.model.eval(), [im[:128, :128] for im in test], None, cfg)
    assert result["psnr_gain_db"] > 1.0, result
    assert result["ssim_denoised"] > result["ssim_noisy"], result


def test_evaluate_is_deterministic_and_consistent():
    _, test = _photos()
    cfg = PhotoDenoiserConfig.tiny()
    model = SPEC.build(cfg).eval()
    images = [test[0][:301, :257], test[1]]
    result = SPEC.evaluate(model, images, None, cfg)
    assert set(result) >= {"psnr_noisy_db", "psnr_denoised_db", "psnr_gain_db", "ssim_noisy", "ssim_denoised"}
    assert result["psnr_gain_db"] == pytest.approx(result["psnr_denoised_db"] - result["psnr_noisy_db"])
    assert 18 < result["psnr_noisy_db"] < 23  # sigma 25 on 0..255: about 20.2 dB (a little more from clipping)
    assert SPEC.evaluate(model, images, None, cfg) == result  # fixed-seed noise


def test_sample_grid_rows():
    train, _ = _photos()
    cfg = PhotoDenoiserConfig.tiny()
    batch = fixed_batch(SPEC.make_dataset(train[:2], None, cfg), 3)
    grid = SPEC.sample_grid({"model": SPEC.build(cfg).eval()}, batch, cfg)
    assert grid.shape == (3 * (16 + 2) + 2, 3 * (16 + 2) + 2, 3) and grid.dtype == np.uint8


def test_predictor_keeps_size_of_odd_photo(tmp_path):
    train, _ = _photos()
    cfg = PhotoDenoiserConfig.tiny()
    uri = str(tmp_path / "model")
    save_artifact(uri, SPEC, cfg, SPEC.build(cfg).eval(), {})
    image = train[0][:37, :53]
    out = Predictor.from_uri(uri, device="cpu", tile=24, tile_overlap=8)([image, image[:, :, :1]])
    assert out[0].shape == (37, 53, 3) and out[1].shape == (37, 53, 1)


def test_augmented_patches_are_symmetries_of_the_plain_ones():
    photo = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    cfg = PhotoDenoiserConfig.tiny().model_copy(update={"crops_per_image": 8})
    plain = SPEC.make_dataset([photo], None, cfg)
    augmented = SPEC.make_dataset([photo], None, cfg.model_copy(update={"augment": True}))
    changed = 0
    for i in range(len(plain)):
        a, b = plain[i], augmented[i]  # (C, S, S): the same crop position, then rotated / mirrored
        variants = [torch.rot90(a, k, (1, 2)) for k in range(4)]
        variants += [v.flip(2) for v in variants]
        assert any(torch.equal(b, v) for v in variants)
        changed += not torch.equal(a, b)
    assert changed > 0
