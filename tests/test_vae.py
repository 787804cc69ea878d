"""genray.models.vae without Ray: the ELBO decomposition, seeded sampling, interpolation endpoints, reconstruct,
evaluate and the sample grid, on the tiny config."""

import numpy as np
import pytest
import torch

from genray.images import to_float
from genray.models import get_spec, vae

SPEC = get_spec("vae")


def _cfg(**overrides) -> vae.VAEConfig:
    return vae.VAEConfig.tiny().model_copy(update=overrides)


def _images(cfg, n: int = 6) -> np.ndarray:
    """uint8 (n, S, S, C): a bright square at a different place in each image."""
    s = cfg.image_size
    images = np.zeros((n, s, s, cfg.channels), np.uint8)
    for i, image in enumerate(images):
        y = x = i % (s - 4)
        image[y : y + 4, x : x + 4] = 255
    return images


def _batch(cfg, n: int = 6) -> torch.Tensor:
    return torch.from_numpy(to_float(_images(cfg, n), "sigmoid"))


def _model(cfg, seed: int = 0) -> vae.VAE:
    torch.manual_seed(seed)
    return vae.build(cfg).eval()


@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_train_step_loss_is_recon_plus_beta_kl(beta):
    cfg = _cfg(beta=beta)
    torch.manual_seed(0)
    state = vae.init_training(cfg, 1e-3)
    for _ in range(3):
        out = vae.train_step(state, _batch(cfg))
        assert out["loss"] == pytest.approx(out["recon"] + beta * out["kl"], rel=1e-5)
        assert out["recon"] > 0 and out["kl"] >= 0


def test_elbo_terms_match_closed_forms():
    x = torch.tensor([[[[0.0, 1.0]]]])  # (1, 1, 1, 2)
    logits = torch.zeros_like(x)  # p = 0.5 everywhere: BCE = log 2 per pixel
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, np.log(4.0)]])
    recon, kl = vae.elbo_terms(logits, x, mu, logvar)
    assert recon.item() == pytest.approx(2 * np.log(2.0))
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 (s^2 + mu^2 - 1 - log s^2), summed over dims
    assert kl.item() == pytest.approx(0.5 * 1.0 + 0.5 * (4.0 - 1.0 - np.log(4.0)))
    _, zero = vae.elbo_terms(logits, x, torch.zeros(1, 2), torch.zeros(1, 2))
    assert zero.item() == 0.0


def test_forward_is_deterministic_reconstruction_and_training_forward_samples():
    cfg = _cfg()
    model, x = _model(cfg), _batch(cfg)
    with torch.no_grad():
        y = model(x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        mu, _ = model.encode(x)
        torch.testing.assert_close(y, model.decode(mu))
        logits_a, mu_a, logvar_a = model(x, return_all=True)
        logits_b, _, _ = model(x, return_all=True)
        assert mu_a.shape == logvar_a.shape == (len(x), cfg.latent_dim)
        assert not torch.equal(logits_a, logits_b)  # fresh eps each call
    with pytest.raises(ValueError, match="VAE expects"):
        model(torch.rand(2, 1, cfg.image_size + 1, cfg.image_size + 1))


@pytest.mark.parametrize("size", [16, 25, 28])
def test_odd_image_sizes_decode_to_their_size(size):
    model = _model(_cfg(image_size=size))
    out = vae.generate(model, 3, seed=0)
    assert out.shape == (3, size, size, 1) and out.dtype == np.uint8


def test_generate_is_seeded():
    cfg = _cfg()
    model = _model(cfg)
    a, b, c = (vae.generate(model, 5, seed, cfg) for seed in (3, 3, 4))
    assert a.shape == (5, cfg.image_size, cfg.image_size, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert SPEC.generate is vae.generate


def test_interpolate_endpoints_decode_the_endpoint_latents():
    cfg = _cfg()
    model = _model(cfg)
    path = vae.interpolate(model, steps=7, seed=11)
    assert path.shape == (7, cfg.image_size, cfg.image_size, 1) and path.dtype == np.uint8
    z0, z1 = torch.randn(2, cfg.latent_dim, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ends = (model.decode(torch.stack([z0, z1])).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(path[0], ends[0].transpose(1, 2, 0))
    np.testing.assert_array_equal(path[-1], ends[1].transpose(1, 2, 0))
    # The endpoint latents are the first two draws of that seed, so they are also generate()'s first two samples.
    np.testing.assert_array_equal(path[[0, -1]], vae.generate(model, 2, seed=11))
    np.testing.assert_array_equal(vae.interpolate(model, 7, 11), path)
    with pytest.raises(ValueError, match="steps >= 2"):
        vae.interpolate(model, 1, 0)


def test_reconstruct_shape_and_matches_forward():
    cfg = _cfg()
    model, images = _model(cfg), _images(cfg, 4)
    out = vae.reconstruct(model, images)
    assert out.shape == images.shape and out.dtype == np.uint8
    with torch.no_grad():
        expected = model(torch.from_numpy(to_float(images, "sigmoid")))
    np.testing.assert_array_equal(out, (expected.numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1))


def test_training_lowers_neg_elbo_and_evaluate_is_repeatable():
    cfg = _cfg()
    images = list(_images(cfg, 8))
    torch.manual_seed(0)
    state = vae.init_training(cfg, 1e-2)
    before = vae.evaluate(state.model.eval(), images, None, cfg)
    state.model.train()
    for _ in range(60):
        vae.train_step(state, _batch(cfg, 8))
    model = state.model.eval()
    after = vae.evaluate(model, images, None, cfg)
    assert after["neg_elbo"] < 0.7 * before["neg_elbo"], (before, after)
    assert after["neg_elbo"] == pytest.approx(after["recon"] + after["kl"])
    assert vae.evaluate(model, images, None, cfg) == after  # fixed noise: comparable across runs
    assert after["num_eval_images"] == 8.0 and "frechet_distance" not in after  # 16x16: no FD


def test_evaluate_frechet_distance_on_28x28_digits():
    pytest.importorskip("genray.fid", reason="genray.fid is not written yet")
    cfg = _cfg(image_size=28)
    result = vae.evaluate(_model(cfg), list(_images(cfg, 32)), None, cfg)
    assert np.isfinite(result["frechet_distance"]) and result["frechet_distance"] >= 0


def test_sample_grid_rows_originals_reconstructions_samples():
    cfg = _cfg()
    model, x = _model(cfg), _batch(cfg, 4)
    grid = vae.sample_grid({"model": model}, x, cfg)
    s, pad = cfg.image_size, 2
    assert grid.dtype == np.uint8 and grid.shape == (3 * (s + pad) + pad, 4 * (s + pad) + pad, 1)
    np.testing.assert_array_equal(grid[pad : pad + s, pad : pad + s], _images(cfg, 4)[0])
    samples_row = grid[2 * (s + pad) + pad : 3 * (s + pad), pad : pad + s]
    np.testing.assert_array_equal(samples_row, vae.generate(model, 4, vae.SAMPLE_SEED)[0])
    np.testing.assert_array_equal(vae.sample_grid({"model": model}, x, cfg), grid)
