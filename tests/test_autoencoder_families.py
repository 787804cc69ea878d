"""The dense autoencoder families without Ray: sparsity penalties, blockwise forward, the 2-d embedding plot,
and the stacked-autoencoder classifier's two phases (pretraining, then classification with a frozen or
fine-tuned encoder)."""

import numpy as np
import pytest
import torch

from genray.datasets import load_embedded
from genray.images import decode_image, to_float
from genray.models import dense_ae, sae_classifier
from genray.models import get_spec
from genray.models.data import build_dataset, fixed_batch


def _dense_cfg(**overrides) -> dense_ae.DenseAEConfig:
    return dense_ae.DenseAEConfig.tiny().model_copy(update=overrides)


def _digits_like(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 1), np.uint8)
    for image in images:
        y, x = rng.integers(0, size - 8, 2)
        image[y : y + 8, x : x + 8] = rng.integers(128, 256)
    return images


# --- dense_ae ----------------------------------------------------------------------------------------------

def test_dense_ae_forward_is_blockwise_on_any_size():
    torch.manual_seed(0)
    model = dense_ae.build(_dense_cfg()).eval()
    x = torch.rand(2, 1, 56, 30)  # 2 x 2 blocks of 28, the second column padded from 2 to 28
    with torch.no_grad():
        y = model(x)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
        # The top-left block is exactly the 28x28 model applied on its own.
        torch.testing.assert_close(y[:, :, :28, :28], model(x[:, :, :28, :28]))
        logits, code = model(x, return_code=True)
    assert code.shape == (2 * 2 * 2, 4)


def test_kl_needs_sigmoid_codes():
    with pytest.raises(ValueError, match="needs code_activation 'sigmoid'"):
        dense_ae.DenseAEConfig(sparsity="kl")
    assert dense_ae.DenseAEConfig(sparsity="kl", code_activation="sigmoid").sparsity == "kl"


def test_sparsity_penalties_raise_the_loss():
    x = torch.from_numpy(to_float(_digits_like(8), "sigmoid"))
    torch.manual_seed(0)
    model = dense_ae.build(_dense_cfg(code_activation="sigmoid"))
    plain = dense_ae.compute_losses(model, x, _dense_cfg(code_activation="sigmoid"))
    assert set(plain) == {"loss", "recon_loss"}
    for sparsity in ("l1", "kl"):
        cfg = _dense_cfg(code_activation="sigmoid", sparsity=sparsity, sparsity_weight=0.1, sparsity_target=0.05)
        losses = dense_ae.compute_losses(model, x, cfg)
        assert losses["recon_loss"].item() == pytest.approx(plain["recon_loss"].item())
        assert losses["sparsity_loss"].item() > 0
        assert losses["loss"].item() == pytest.approx(plain["loss"].item() + losses["sparsity_loss"].item())


def test_penalty_values():
    code = torch.tensor([[0.1, -0.3], [0.5, 0.0]])
    assert dense_ae.sparsity_penalty(code, _dense_cfg(sparsity="l1")).item() == pytest.approx((0.4 + 0.5) / 2)
    assert dense_ae.sparsity_penalty(code, _dense_cfg()).item() == 0.0
    kl_cfg = _dense_cfg(code_activation="sigmoid", sparsity="kl", sparsity_target=0.2)
    at_target = torch.tensor([[0.1, 0.3], [0.3, 0.1]])  # both units average 0.2
    assert dense_ae.sparsity_penalty(at_target, kl_cfg).item() == pytest.approx(0.0, abs=1e-7)
    rho, rho_hat = 0.2, 0.6
    expected = rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat))
    assert dense_ae.sparsity_penalty(torch.full((3, 1), rho_hat), kl_cfg).item() == pytest.approx(expected, rel=1e-5)


def test_l1_training_makes_codes_sparser():
    x = torch.from_numpy(to_float(_digits_like(32), "sigmoid"))
    results = {}
    for sparsity, weight in (("none", 0.0), ("l1", 0.05)):
        cfg = _dense_cfg(sparsity=sparsity, sparsity_weight=weight, latent_dim=16)
        torch.manual_seed(0)
        state = dense_ae.init_training(cfg, 5e-3)
        for _ in range(60):
            dense_ae.train_step(state, x)
        results[sparsity] = dense_ae.evaluate(state.model.eval(), list(_digits_like(16, seed=1)), None, cfg)
    assert results["l1"]["code_mean_activation"] < 0.5 * results["none"]["code_mean_activation"]
    assert results["l1"]["code_near_zero_fraction"] > results["none"]["code_near_zero_fraction"]
    for metrics in results.values():
        assert metrics["psnr_recon_db"] == pytest.approx(10 * np.log10(1 / metrics["recon_mse"]), abs=3)


def test_2d_latent_writes_embedding_png():
    cfg = _dense_cfg(latent_dim=2, code_activation="linear")
    torch.manual_seed(0)
    model = dense_ae.build(cfg).eval()
    images = list(_digits_like(30))
    files = dense_ae.extra_outputs(model, images, [i % 10 for i in range(30)], cfg)
    assert set(files) == {"embedding.png"}
    png = files["embedding.png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    plot = decode_image(png, channels=3)
    assert plot.shape[0] > 200 and plot.shape[1] > 3 * plot.shape[0] * 0.8  # three panels side by side
    assert dense_ae.extra_outputs(model, images, None, cfg).keys() == {"embedding.png"}  # unlabelled: one colour
    assert dense_ae.extra_outputs(dense_ae.build(_dense_cfg()), images, None, _dense_cfg()) == {}
    assert get_spec("dense_ae").extra_outputs is dense_ae.extra_outputs


def test_2d_embeddings_are_compared_by_knn_accuracy_on_real_digits():
    """The embedding plot's comparison is also a number: 5-NN accuracy of each 2-d embedding of held-out digits.
    On sklearn's digits t-SNE separates the classes far better than PCA (a known result, so the numbers mean
    what they say); the autoencoder's own figure is there too (untrained here: its value is not asserted)."""
    images, labels, keys = load_embedded("digits")
    held_out = [i for i, key in enumerate(keys) if key.startswith("test/")][:300]
    cfg = _dense_cfg(latent_dim=2, code_activation="linear")
    torch.manual_seed(0)
    metrics = dense_ae.evaluate(dense_ae.build(cfg).eval(), [images[i] for i in held_out],
                                [labels[i] for i in held_out], cfg)
    for name in ("autoencoder", "pca", "tsne"):
        assert 0 <= metrics[f"knn_accuracy_{name}"] <= 1
    assert metrics["knn_accuracy_tsne"] > 0.85 > metrics["knn_accuracy_pca"] > 0.3, metrics
    assert dense_ae.knn_accuracy(np.zeros((8, 2)), [0, 1] * 4) is None  # too few images per class to score
    unlabelled = dense_ae.evaluate(dense_ae.build(cfg).eval(), [images[i] for i in held_out[:20]], None, cfg)
    assert not any(k.startswith("knn_") for k in unlabelled)


# --- sae_classifier ----------------------------------------------------------------------------------------

def _three_classes(n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """16x16 images of three separable kinds (a bar at the top, middle or bottom) with noise and jitter."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 3
        image = rng.integers(0, 60, (16, 16, 1)).astype(np.uint8)
        row = 2 + 5 * label + rng.integers(-1, 2)
        image[row : row + 3, 2:14] = rng.integers(180, 256)
        images.append(image)
        labels.append(label)
    return images, labels


def _sae_cfg(**overrides) -> sae_classifier.SAEClassifierConfig:
    return sae_classifier.SAEClassifierConfig.tiny().model_copy(update={"num_classes": 3, "dropout": 0.0, **overrides})


def _run_epochs(state, batches, epochs: range) -> list[dict[str, float]]:
    out = []
    for epoch in epochs:
        state.epoch = epoch
        for batch in batches:
            out.append(sae_classifier.train_step(state, batch))
    return out


def _batches(images, labels, cfg, batch_size: int = 16):
    dataset = sae_classifier.make_dataset(images, labels, cfg)
    x, y = fixed_batch(dataset, len(dataset))
    return list(zip(x.split(batch_size), y.split(batch_size)))


def test_classifier_learns_separable_classes_after_pretraining():
    cfg = _sae_cfg(pretrain_epochs=3)
    images, labels = _three_classes(48, seed=0)
    batches = _batches(images, labels, cfg)
    torch.manual_seed(0)
    state = sae_classifier.init_training(cfg, 1e-2)
    pretrain = _run_epochs(state, batches, range(1, 4))
    assert all(set(step) == {"loss", "recon_loss"} for step in pretrain)
    assert pretrain[-1]["recon_loss"] < pretrain[0]["recon_loss"]
    classify = _run_epochs(state, batches, range(4, 14))
    assert all(set(step) == {"loss", "ce_loss", "accuracy"} for step in classify)
    assert classify[-1]["ce_loss"] < classify[0]["ce_loss"]
    held_out, held_out_labels = _three_classes(30, seed=1)
    metrics = sae_classifier.evaluate(state.model.eval(), held_out, held_out_labels, cfg)
    assert metrics["accuracy"] >= 0.9, metrics
    assert {f"f1_class_{k}" for k in range(3)} <= metrics.keys()
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_encoder_really_freezes(freeze):
    cfg = _sae_cfg(pretrain_epochs=1, freeze_encoder=freeze)
    images, labels = _three_classes(24, seed=0)
    batches = _batches(images, labels, cfg)
    torch.manual_seed(0)
    state = sae_classifier.init_training(cfg, 1e-2)
    model = state.model

    def snapshot(module):
        return {k: v.clone() for k, v in module.state_dict().items()}

    head_0, encoder_0, decoder_0 = snapshot(model.head), snapshot(model.encoder), snapshot(model.decoder)
    _run_epochs(state, batches, [1])  # pretraining: the autoencoder moves, the head does not
    assert all(torch.equal(head_0[k], v) for k, v in model.head.state_dict().items())
    assert not all(torch.equal(encoder_0[k], v) for k, v in model.encoder.state_dict().items())
    assert not all(torch.equal(decoder_0[k], v) for k, v in model.decoder.state_dict().items())
    encoder_1, decoder_1 = snapshot(model.encoder), snapshot(model.decoder)
    _run_epochs(state, batches, [2, 3])  # classification
    assert not all(torch.equal(head_0[k], v) for k, v in model.head.state_dict().items())
    encoder_same = all(torch.equal(encoder_1[k], v) for k, v in model.encoder.state_dict().items())
    assert encoder_same is freeze
    assert all(torch.equal(decoder_1[k], v) for k, v in model.decoder.state_dict().items())


def test_classifier_dataset_needs_labels():
    cfg = _sae_cfg()
    images, labels = _three_classes(6, seed=0)
    spec = get_spec("sae_classifier")
    with pytest.raises(ValueError, match="needs labelled images"):
        build_dataset(spec, images, None, cfg)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        build_dataset(spec, images, [0, 1, 2, 3, 0, 1], cfg)
    x, y = build_dataset(spec, images, labels, cfg)[0]
    assert x.shape == (1, 16, 16) and y.item() == 0


def test_classifier_forward_logits_and_evaluate_without_labels():
    cfg = sae_classifier.SAEClassifierConfig.tiny()
    model = sae_classifier.build(cfg).eval()
    with torch.no_grad():
        assert model(torch.rand(5, 1, 16, 16)).shape == (5, 10)
    with pytest.raises(ValueError, match="sae_classifier expects"):
        model(torch.rand(5, 1, 28, 28))
    images, _ = _three_classes(6, seed=0)
    metrics = sae_classifier.evaluate(model, images, None, cfg)
    assert set(metrics) == {"recon_bce", "num_eval_images"}
