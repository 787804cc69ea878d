"""DCGAN options and the Fréchet-distance tools, tiny and on CPU, without Ray (the battery in test_models.py covers
the registry contract; tests/test_training.py-style Ray runs are the lead's)."""

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from genray import fid
from genray.datasets import load_embedded
from genray.models import dcgan, get_spec
from genray.models.data import RandomCrops

OPTIONS = {
    "bce": {},
    "wgan_gp": {"loss": "wgan_gp", "critic_steps": 2},
    "spectral_norm": {"spectral_norm": True},
    "ema": {"ema_decay": 0.9},
    "cifar32_wgan_gp_sn": {"variant": "cifar32", "loss": "wgan_gp", "spectral_norm": True, "d_dropout": 0.0},
}


def _cfg(**update) -> dcgan.DCGANConfig:
    return dcgan.DCGANConfig.model_validate({**dcgan.DCGANConfig.tiny().model_dump(), **update})


def _real_batch(cfg, n: int = 6) -> torch.Tensor:
    side, channels, _ = dcgan.VARIANTS[cfg.variant]
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _digits(split: str) -> tuple[list[np.ndarray], list[int]]:
    images, labels, keys = load_embedded("digits")
    chosen = [i for i, key in enumerate(keys) if key.startswith(split + "/")]
    return [images[i] for i in chosen], [labels[i] for i in chosen]




@pytest.mark.parametrize("variant, shape", [("mnist28", (1, 28, 28)), ("cifar32", (3, 32, 32))])
def test_variant_shapes(variant, shape):
    cfg = _cfg(variant=variant)
    g, d = dcgan.build(cfg).eval(), dcgan.Discriminator(cfg).eval()
    with torch.no_grad():
        images = g(torch.randn(3, cfg.latent_dim))
        logits = d(images)
    assert images.shape == (3, *shape) and images.min() >= -1 and images.max() <= 1
    assert logits.shape == (3,)
    assert get_spec("dcgan").in_channels(cfg) == shape[0]


def test_seed_widths():
    """The default config is the seeds' network: dense to 7x7x256 (mnist28) or 8x8x256 (cifar32), latent 100."""
    for variant, start in [("mnist28", 7), ("cifar32", 8)]:
        g = dcgan.build(dcgan.DCGANConfig(variant=variant))
        assert g.start_shape == (256, start, start) and g.project[0].in_features == 100


@pytest.mark.parametrize("name", OPTIONS)
def test_options_train_with_finite_losses(name):
    cfg = _cfg(**OPTIONS[name])
    torch.manual_seed(0)
    state = dcgan.init_training(cfg, 2e-3)
    real = _real_batch(cfg)
    for _ in range(3):
        out = dcgan.train_step(state, real)
        assert {"loss", "loss_d", "loss_g"} <= set(out) and out["loss"] == out["loss_g"]
        assert all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
    assert ("gp" in out) == (cfg.loss == "wgan_gp")
    assert set(state.modules) == ({"model", "generator", "discriminator"} if cfg.ema_decay else {"model", "discriminator"})
    if cfg.spectral_norm:
        assert any("parametrizations" in k for k in state.modules["discriminator"].state_dict())


def test_wgan_gp_defaults_to_five_critic_steps_and_has_no_batchnorm_in_d():
    cfg = _cfg(loss="wgan_gp")
    assert cfg.num_critic_steps == 5 and _cfg().num_critic_steps == 1
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in dcgan.Discriminator(cfg).modules())


def test_ema_differs_from_generator_and_moves_towards_it():
    cfg = _cfg(ema_decay=0.5)
    torch.manual_seed(0)
    state = dcgan.init_training(cfg, 1e-2)
    ema, g = state.modules["model"], state.modules["generator"]
    assert ema is not g and all(not p.requires_grad for p in ema.parameters())
    real = _real_batch(cfg)
    dcgan.train_step(state, real)  # G moves away from its init; EMA follows halfway

    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    before = flat(ema)
    dcgan.train_step(state, real)
    after, g_now = flat(ema), flat(g)
    assert not torch.equal(after, g_now)
    torch.testing.assert_close(after, 0.5 * before + 0.5 * g_now)
    assert (after - g_now).norm() < (before - g_now).norm()
    # BatchNorm statistics are copied, not averaged.
    for e, b in zip(ema.buffers(), g.buffers()):
        assert torch.equal(e, b)
    # The artefact's network (modules["model"]) loads into build(cfg).
    dcgan.build(cfg).load_state_dict(ema.state_dict())


def test_generate_is_seeded_and_leaves_mode_alone():
    cfg = _cfg()
    torch.manual_seed(0)
    model = dcgan.build(cfg).train()
    a, b, c = (dcgan.generate(model, 5, seed, cfg) for seed in (3, 3, 4))
    assert a.dtype == np.uint8 and a.shape == (5, 28, 28, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert model.training
    assert np.array_equal(dcgan.generate(model, 2, 3, cfg), a[:2])  # batch-independent (eval-mode BatchNorm)
    assert dcgan.generate(model, 0, 3, cfg).shape == (0, 28, 28, 1)


def test_sample_grid_uses_fixed_noise():
    cfg = _cfg()
    torch.manual_seed(0)
    modules = {"model": dcgan.build(cfg).eval()}
    first = dcgan.sample_grid(modules, _real_batch(cfg), cfg)
    second = dcgan.sample_grid(modules, _real_batch(cfg, n=2), cfg)
    assert np.array_equal(first, second) and first.shape == (8 * 30 + 2, 8 * 30 + 2, 1)


def test_make_dataset_resizes_faces_and_crops_photos():
    faces = [np.full((25, 25, 1), 200, np.uint8)] * 3
    ds = dcgan.make_dataset(faces, None, _cfg())
    assert len(ds) == 3 and ds[0].shape == (1, 28, 28) and ds[0].min() >= -1 and ds[0].max() <= 1
    photos = [np.zeros((60, 80, 3), np.uint8), np.zeros((50, 50, 3), np.uint8)]
    crops = dcgan.make_dataset(photos, None, _cfg(variant="cifar32", crops_per_image=4))
    assert isinstance(crops, RandomCrops) and len(crops) == 8 and crops[0].shape == (3, 32, 32)
    digits = [np.zeros((28, 28, 1), np.uint8)] * 2
    assert dcgan.make_dataset(digits, [0, 1], _cfg())[1].shape == (1, 28, 28)  # unconditional: bare tensors


# --- Fréchet distance -----------------------------------------------------------------------------------------

def _reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * np.real(linalg.sqrtm(s_a @ s_b))))


def test_frechet_distance_matches_direct_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    assert fid.frechet_distance(a, b) == pytest.approx(_reference_frechet(a, b), rel=1e-6)
    # Two 1-D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2.
    x, y = rng.normal(size=(20000, 1)), rng.normal(2.0, 3.0, size=(20000, 1))
    assert fid.frechet_distance(x, y) == pytest.approx(4.0 + 4.0, rel=0.05)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_the_same_formula():
    """The small-sample route (an SVD of the Na x Nb product of centred features, as for 2048-d Inception
    features of a few hundred images) gives the direct sqrtm formula's value."""
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(40, 120))
    a = rng.normal(size=(60, 40)) @ mix
    b = rng.normal(size=(90, 40)) @ mix * 0.7 + 0.2
    assert fid.frechet_distance(a, b) == pytest.approx(_reference_frechet(a, b), rel=1e-6)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_identical_is_zero_shift_is_larger():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 8))
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid.frechet_distance(a, a + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)
    assert fid.frechet_distance(a, a + 1.0) > fid.frechet_distance(a, a + 0.5)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(2)
    few = rng.normal(size=(3, 16))  # fewer samples than dimensions: rank-2 covariances
    value = fid.frechet_distance(few, rng.normal(size=(4, 16)))
    assert math.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="feature sets"):
        fid.frechet_distance(few[:1], few)


# --- the digits classifier (cached per process and on disk) ---------------------------------------------------

def test_digits_classifier_accuracy_and_features():
    images, labels = _digits("test")
    assert fid.classifier_accuracy(images, labels) >= 0.95
    assert fid.digits_classifier() is fid.digits_classifier()
    feats = fid.classifier_features(np.stack(images[:10]))
    assert feats.shape == (10, fid.NUM_FEATURES) and np.isfinite(feats).all()
    assert np.array_equal(fid.classifier_features(images[:10]), feats)  # a list works too
    with pytest.raises(ValueError, match="uint8"):
        fid.classifier_features(np.zeros((2, 32, 32, 3), np.uint8))


def test_digit_fid_ranks_real_over_noise_and_evaluate_reports_it():
    train, _ = _digits("train")
    test, _ = _digits("test")
    noise = list(np.random.default_rng(0).integers(0, 256, (200, 28, 28, 1), dtype=np.uint8))
    assert fid.frechet_distance_images(train, test) < fid.frechet_distance_images(noise, test)
    cfg = _cfg()
    torch.manual_seed(0)
    result = dcgan.evaluate(dcgan.build(cfg).eval(), test, None, cfg)
    assert set(result) == {"num_eval_images", "fid", "fid_real_floor"}
    assert result["num_eval_images"] == float(len(test))
    assert result["fid"] > result["fid_real_floor"] > 0  # an untrained generator is far from the real digits


def test_evaluate_other_data_reports_pixel_frechet():
    cfg = _cfg(variant="cifar32")
    torch.manual_seed(0)
    photos = list(np.random.default_rng(0).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8))
    result = dcgan.evaluate(dcgan.build(cfg).eval(), photos, None, cfg)
    assert set(result) == {"num_eval_images", "pixel_frechet_8x8"} and math.isfinite(result["pixel_frechet_8x8"])
