"""SRGAN family (genray.models.srgan) and genray.metrics.ssim: tiny models on CPU, no Ray."""

import functools

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from genray import metrics
from genray.model_artifact import save_artifact
from genray.datasets import load_embedded
from genray.images import tile_positions
from genray.inference import Predictor
from genray.models import get_spec
from genray.models.data import fixed_batch
from genray.models import srgan
from genray.models.srgan import Discriminator, SRGANConfig, bicubic_downscale, in_pretraining
from genray.models.vgg import VGGWeightsError

SPEC = get_spec("srgan")


@functools.lru_cache(maxsize=None)
def _photos() -> list[np.ndarray]:
    images, _, keys = load_embedded("photos")
    return [im for im, key in zip(images, keys) if key.startswith("train/")]


def _train(cfg: SRGANConfig, batch, steps: int, epoch: int, lr: float = 5e-3):
    """(state, per-step losses) after `steps` updates at `epoch` (the loop's 1-based epoch; it picks the phase)."""
    torch.manual_seed(0)
    state = SPEC.init_training(cfg, lr)
    state.epoch = epoch
    return state, [SPEC.train_step(state, batch) for _ in range(steps)]


def _cfg(**changes) -> SRGANConfig:
    return SRGANConfig.tiny().model_copy(update=changes)


def _batch(cfg: SRGANConfig, n: int = 4):
    return fixed_batch(SPEC.make_dataset(_photos()[:2], None, cfg), n)


def test_generator_is_x4_on_odd_sizes():
    model = SPEC.build(SRGANConfig.tiny()).eval()
    for h, w in [(5, 7), (13, 3), (1, 1)]:
        with torch.no_grad():
            y = model(torch.rand(2, 3, h, w) * 2 - 1)
        assert y.shape == (2, 3, 4 * h, 4 * w)
        assert y.abs().max() <= 1


def test_default_architecture_follows_the_paper():
    cfg = SRGANConfig()
    g, d = SPEC.build(cfg), Discriminator(cfg)
    assert len(g.body) == 16 and g.head[0].kernel_size == (9, 9) and g.tail.kernel_size == (9, 9)
    widths = [block.conv.out_channels for block in d.features]
    strides = [block.conv.stride[0] for block in d.features]
    assert widths == [64, 64, 128, 128, 256, 256, 512, 512] and strides == [1, 2] * 4
    assert d.classifier[1].out_features == 1024
    # Adaptive pooling: the discriminator takes any crop size.
    with torch.no_grad():
        assert d.eval()(torch.zeros(1, 3, 40, 56)).shape == (1,)


def test_dataset_pairs_are_bicubic_x4_downscales():
    cfg = _cfg(hr_crop=32)
    lr, hr = SPEC.make_dataset(_photos()[:1], None, cfg)[0]
    assert hr.shape == (3, 32, 32) and lr.shape == (3, 8, 8)
    hr_uint8 = np.rint((hr.numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
    expected = bicubic_downscale(hr_uint8).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(lr.numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        SRGANConfig(hr_crop=30)


def test_pretrain_steps_lower_mse():
    cfg = _cfg(pretrain_epochs=1)
    assert in_pretraining(cfg, 1)
    state, losses = _train(cfg, _batch(cfg), steps=25, epoch=1)
    assert set(losses[0]) == {"loss", "mse"}
    assert np.mean([x["mse"] for x in losses[-5:]]) < 0.7 * np.mean([x["mse"] for x in losses[:5]])
    # The discriminator is untouched while pretraining: no gradients, its optimizer never stepped.
    assert all(p.grad is None for p in state.modules["discriminator"].parameters())
    assert not state.optimizers["discriminator"].state


def test_gan_step_updates_discriminator_and_generator():
    cfg = _cfg(pretrain_epochs=1)
    assert not in_pretraining(cfg, 2)
    torch.manual_seed(0)
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in SPEC.init_training(cfg, 1e-3).modules.items()}
    state, (losses,) = _train(cfg, _batch(cfg), steps=1, epoch=2, lr=1e-3)
    assert {"loss", "mse", "loss_d", "loss_adv"} <= set(losses) and "loss_vgg" not in losses
    assert losses["loss"] == pytest.approx(losses["mse"] + cfg.adversarial_weight * losses["loss_adv"], rel=1e-5)
    for name, module in state.modules.items():
        changed = [not torch.equal(a, b) for a, b in zip(before[name], module.parameters())]
        assert all(changed), f"{name}: {changed.count(False)} parameters did not move"


def _save_vgg(path) -> str:
    """A seeded VGG19 state_dict in torchvision's layout ('features.N.weight'). Built with torchvision's own
    make_layers(cfgs["E"]) (what vgg19() uses for .features): vgg19() would also initialise 120M classifier
    weights that the feature loss never reads, which costs seconds on a busy CPU."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}, path)
    return str(path)


def test_vgg_content_loss_loads_weights_from_uri(tmp_path):
    uri = _save_vgg(tmp_path / "vgg19.pth")
    cfg = _cfg(content="mse+vgg", vgg_weights=uri, vgg_download=False, pretrain_epochs=0)
    state = SPEC.init_training(cfg, 1e-3)
    assert state.extras["vgg_source"] == uri
    assert "vgg" not in state.modules and "vgg" not in state.optimizers  # frozen: neither checkpointed nor trained
    assert not any(p.requires_grad for p in state.extras["vgg"].parameters())
    losses = SPEC.train_step(state, _batch(cfg, n=2))
    assert losses["loss_vgg"] > 0 and np.isfinite(losses["loss"])
    expected = losses["mse"] + losses["loss_vgg"] + cfg.adversarial_weight * losses["loss_adv"]
    assert losses["loss"] == pytest.approx(expected, rel=1e-5)


def test_missing_vgg_weights_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torchvision cache
    cfg = _cfg(content="vgg", vgg_download=False)
    with pytest.raises(VGGWeightsError, match="vgg_weights"):
        SPEC.init_training(cfg, 1e-3)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        state = SPEC.init_training(cfg.model_copy(update={"allow_untrained_vgg": True}), 1e-3)
    assert state.extras["vgg_source"] == "untrained"
    # Content "mse" never touches VGG.
    assert "vgg" not in SPEC.init_training(_cfg(content="mse"), 1e-3).extras


def test_predictor_upscales_x4_and_tiles_match(tmp_path):
    cfg = _cfg(pretrain_epochs=1)
    state, _ = _train(cfg, _batch(cfg), steps=10, epoch=1)  # a few steps: the output is no near-constant image
    uri = str(tmp_path / "model")
    save_artifact(uri, SPEC, cfg, state.model.eval(), {})
    image = _photos()[0][100:120, 200:230]  # (20, 30, 3)
    whole = Predictor.from_uri(uri, device="cpu", tile=64)([image])[0]
    assert whole.shape == (80, 120, 3) and whole.dtype == np.uint8
    # Two 20x20 tiles overlapping by 10 LR pixels, about tiny G's receptive-field radius (~10 LR pixels).
    assert len(tile_positions(20, 30, 20, 9)) == 2
    tiled = Predictor.from_uri(uri, device="cpu", tile=20, tile_overlap=9)([image])[0]
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


def test_evaluate_reports_sr_and_bicubic():
    cfg = SRGANConfig.tiny()
    model = SPEC.build(cfg).eval()
    result = SPEC.evaluate(model, [_photos()[0][:301, :203], _photos()[1]], None, cfg)
    assert set(result) >= {"psnr_sr_db", "psnr_bicubic_db", "psnr_gain_over_bicubic_db", "ssim_sr", "ssim_bicubic"}
    assert result["psnr_gain_over_bicubic_db"] == pytest.approx(result["psnr_sr_db"] - result["psnr_bicubic_db"])
    assert 20 < result["psnr_bicubic_db"] < 50 and 0 < result["ssim_bicubic"] <= 1
    # Luma PSNR as SR papers report it: Y of the same uint8 images, 4-px border crop.
    assert result["psnr_y_gain_over_bicubic_db"] == pytest.approx(result["psnr_y_sr_db"] - result["psnr_y_bicubic_db"])
    hr = srgan.center_crop(_photos()[1], srgan.EVAL_MAX_SIDE, srgan.SCALE)
    bicubic = srgan.bicubic_upscale(bicubic_downscale(hr))
    y_hr, y_bicubic = (metrics.rgb_to_y(x[4:-4, 4:-4]) for x in (hr, bicubic))
    assert result["psnr_y_bicubic_db"] != result["psnr_bicubic_db"]
    assert 20 < metrics.psnr(y_hr, y_bicubic, 255) < 50


def test_sample_grid_has_three_rows():
    cfg = SRGANConfig.tiny()
    batch = _batch(cfg, n=3)
    grid = SPEC.sample_grid({"model": SPEC.build(cfg).eval()}, batch, cfg)
    assert grid.shape == (3 * (16 + 2) + 2, 3 * (16 + 2) + 2, 3)


# --- metrics.rgb_to_y ----------------------------------------------------------------------------------------

def test_rgb_to_y_matches_skimage_rgb2ycbcr():
    from skimage.color import rgb2ycbcr

    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [255, 0, 0]]
    y = metrics.rgb_to_y(rgb)
    assert y.dtype == np.float64 and y.shape == (17, 23)
    np.testing.assert_allclose(y, rgb2ycbcr(rgb)[..., 0], atol=1e-9)
    np.testing.assert_allclose(metrics.rgb_to_y(rgb / 255.0), y, atol=1e-9)  # float input: already in [0, 1]
    assert y[0, 0] == pytest.approx(16) and y[0, 1] == pytest.approx(235)


# --- metrics.ssim --------------------------------------------------------------------------------------------

def _ssim_pairs():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (33, 41, 3), dtype=np.uint8)
    noisy = np.clip(rgb.astype(int) + rng.integers(-25, 26, rgb.shape), 0, 255).astype(np.uint8)
    grey = rng.random((20, 27))
    return [(rgb, noisy, 255, -1), (rgb[:, :, 1], noisy[:, :, 1], 255, None), (grey, grey ** 2, 1.0, None),
            (np.moveaxis(rgb, -1, 0), np.moveaxis(noisy, -1, 0), 255, 0)]


PAPER_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)  # Wang et al. / BasicSR


@pytest.mark.parametrize("index", range(4))
def test_ssim_matches_skimage(index):
    """The default is the paper SSIM (skimage with Gaussian weights); "uniform7" is skimage's own default."""
    reference, test, data_range, channel_axis = _ssim_pairs()[index]
    paper = structural_similarity(reference, test, data_range=data_range, channel_axis=channel_axis, **PAPER_SSIM)
    uniform = structural_similarity(reference, test, data_range=data_range, channel_axis=channel_axis)
    assert metrics.ssim(reference, test, data_range, channel_axis) == pytest.approx(paper, abs=1e-6)
    assert metrics.ssim(reference, test, data_range, channel_axis, window="uniform7") == pytest.approx(uniform, abs=1e-6)
    assert abs(paper - uniform) > 1e-4  # the two windows really differ on these images
    assert metrics.ssim(reference, reference, data_range, channel_axis) == pytest.approx(1.0)


def test_ssim_is_basicsr_valid_gaussian_filtering():
    """BasicSR's calculate_ssim: an explicit 11x11 Gaussian kernel (sigma 1.5) applied with 'valid' filtering,
    written out here with numpy, independent of scipy and skimage."""
    reference, test, data_range, _ = _ssim_pairs()[1]
    x, y = reference.astype(np.float64), test.astype(np.float64)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(g / g.sum(), g / g.sum())

    def valid(image):
        patches = np.lib.stride_tricks.sliding_window_view(image, (11, 11))
        return np.einsum("ijkl,kl->ij", patches, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = valid(x), valid(y)
    sxx, syy, sxy = valid(x * x) - mu_x**2, valid(y * y) - mu_y**2, valid(x * y) - mu_x * mu_y
    basicsr = np.mean((2 * mu_x * mu_y + c1) * (2 * sxy + c2) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)))
    assert metrics.ssim(reference, test, 255) == pytest.approx(basicsr, abs=1e-6)
    with pytest.raises(ValueError, match="window must be one of"):
        metrics.ssim(reference, test, 255, window="box")


def test_mean_ssim_is_mean_of_per_image():
    reference, test, data_range, _ = _ssim_pairs()[0]
    pairs = [(reference, test), (reference[:20], test[:20])]
    expected = np.mean([structural_similarity(r, t, data_range=255, channel_axis=-1, **PAPER_SSIM) for r, t in pairs])
    assert metrics.mean_ssim([p[0] for p in pairs], [p[1] for p in pairs], 255, channel_axis=-1) == pytest.approx(
        expected, abs=1e-3)


def test_bicubic_skip_starts_at_bicubic_and_trains_the_residual():
    cfg = _cfg(bicubic_skip=True, pretrain_epochs=1)
    lr = torch.rand(2, 3, 6, 7) * 1.6 - 0.8
    expected = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        assert torch.equal(SPEC.build(cfg).eval()(lr), expected)  # untrained: exactly bicubic
    _, losses = _train(cfg, _batch(cfg), steps=25, epoch=1, lr=1e-3)
    assert np.mean([x["mse"] for x in losses[-5:]]) < np.mean([x["mse"] for x in losses[:5]])
