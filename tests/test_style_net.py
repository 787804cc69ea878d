"""genray.models.style_net: the Johnson style network, its losses and VGG loading, and Gatys optimisation. No Ray."""

import io

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from genray import storage
from genray.model_artifact import read_meta, save_artifact
from genray.images import to_float, to_uint8
from genray.inference import Predictor
from genray.models import get_spec
from genray.models import style_net as style
from genray.models.data import fixed_batch
from genray.models.vgg import VGGWeightsError

SPEC = get_spec("style_net")

pytestmark = pytest.mark.filterwarnings("ignore:USING UNTRAINED VGG19")


def _photo(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, C): coloured rectangles on a noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, channels)).astype(np.uint8)
    for _ in range(5):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        h, w = rng.integers(4, max(5, height // 2)), rng.integers(4, max(5, width // 2))
        image[y : y + h, x : x + w] = rng.integers(100, 256, channels)
    return image


def _content_batch(cfg, n: int = 4) -> torch.Tensor:
    dataset = SPEC.make_dataset([_photo(40, 48, seed=i) for i in range(n)], None, cfg)
    return fixed_batch(dataset, n)


# --- the network -------------------------------------------------------------------------------------------

def test_transformer_keeps_size_on_multiples_of_4():
    model = SPEC.build(SPEC.config_cls.tiny()).eval()
    for h, w in [(8, 8), (16, 24), (36, 20)]:
        with torch.no_grad():
            y = model(torch.rand(2, 3, h, w))
        assert y.shape == (2, 3, h, w)
        assert 0.0 <= y.min() and y.max() <= 1.0


def test_predictor_runs_odd_sizes_through_padding(tmp_path):
    cfg = SPEC.config_cls.tiny()
    torch.manual_seed(0)
    model = SPEC.build(cfg).eval()
    uri = str(tmp_path / "model")
    save_artifact(uri, SPEC, cfg, model, {"vgg_pretrained": 0.0})
    predictor = Predictor.from_uri(uri, device="cpu")
    images = [_photo(13, 19), _photo(5, 7, seed=1), _photo(11, 9, channels=1, seed=2), _photo(16, 20, seed=3)]
    outputs = predictor(images)
    assert [o.shape for o in outputs] == [im.shape for im in images]
    assert all(o.dtype == np.uint8 for o in outputs)
    # On a multiple of 4 nothing is padded: the Predictor gives exactly the model's own output.
    with torch.no_grad():
        direct = to_uint8(model(torch.from_numpy(to_float(images[3][None], "sigmoid"))).numpy(), "sigmoid")[0]
    np.testing.assert_array_equal(outputs[3], direct)
    assert read_meta(uri)["metrics"]["vgg_pretrained"] == 0.0


# --- losses ------------------------------------------------------------------------------------------------

def test_gram_matrix_of_known_tensor():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)  # C=2 channels, H=1, W=2
    expected = torch.tensor([[1 + 4, 3 + 8], [3 + 8, 9 + 16]]) / (2 * 1 * 2)  # f f^T / (C*H*W)
    torch.testing.assert_close(style.gram_matrix(features), expected[None])


def test_total_variation():
    assert style.total_variation(torch.full((2, 3, 8, 8), 0.7)).item() == 0.0
    step = torch.zeros(1, 1, 4, 4)
    step[..., 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal neighbour pairs differ by 1
    assert style.total_variation(step).item() == pytest.approx(4 / 12)


def test_builtin_styles_and_config_checks():
    for name in style.BUILTIN_STYLES:
        image = style.read_style_image(f"builtin:{name}", 24)
        assert image.shape == (24, 24, 3) and image.dtype == np.uint8 and image.std() > 20
    with pytest.raises(ValidationError, match="builtin:checkerboard"):
        SPEC.config_cls(style_image_uri="builtin:starry")
    with pytest.raises(ValidationError, match="unknown VGG layers"):
        SPEC.config_cls(style_layers=("relu9_9",))


def test_style_image_read_from_storage_and_resized(s3_bucket):
    from genray.images import encode_png

    uri = f"{s3_bucket}/styles/wide.png"
    storage.write_bytes(uri, encode_png(_photo(30, 60)))
    assert style.read_style_image(uri, 32).shape == (16, 32, 3)  # longer side -> style_size


# --- VGG weights -------------------------------------------------------------------------------------------

def test_vgg_weights_from_s3_uri(s3_bucket):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(1)
    # Exactly vgg19(weights=None).features (make_layers(cfgs["E"]) is how torchvision builds it), saved in
    # torchvision's key layout ('features.N.weight'); building the unused 120M-parameter classifier costs seconds.
    features = {f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}
    buffer = io.BytesIO()
    torch.save(features, buffer)
    uri = f"{s3_bucket}/weights/vgg19.pth"
    storage.write_bytes(uri, buffer.getvalue())

    cfg = SPEC.config_cls.tiny().model_copy(update={"vgg_weights": uri, "allow_untrained_vgg": False})
    state = SPEC.init_training(cfg, 1e-3)
    assert state.extras["vgg_source"] == uri
    torch.testing.assert_close(state.extras["vgg"].features[0].weight, features["features.0.weight"])
    assert set(state.extras["style_grams"]) == set(cfg.style_layers)
    assert "vgg" not in state.modules  # frozen helper: never checkpointed
    result = SPEC.evaluate(state.model.eval(), [_photo(20, 28)], None, cfg)
    assert result["vgg_pretrained"] == 1.0


def test_missing_vgg_weights_fail_unless_untrained_allowed(monkeypatch, tmp_path):
    cfg = SPEC.config_cls.tiny()  # allow_untrained_vgg: the run goes on, and says so
    state = SPEC.init_training(cfg, 1e-3)
    assert state.extras["vgg_source"] == "untrained"
    assert SPEC.evaluate(state.model.eval(), [_photo(16, 16)], None, cfg)["vgg_pretrained"] == 0.0

    # An empty torchvision cache. (load_vgg's per-process cache cannot hide the failure: no test loads a VGG
    # with this strict key successfully, and failures are never cached.)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    strict = cfg.model_copy(update={"allow_untrained_vgg": False, "vgg_download": False})
    with pytest.raises(VGGWeightsError, match="vgg_weights"):
        SPEC.init_training(strict, 1e-3)
    with pytest.raises(VGGWeightsError):
        SPEC.evaluate(SPEC.build(strict), [_photo(16, 16)], None, strict)


# --- training and Gatys ------------------------------------------------------------------------------------

def test_train_steps_lower_style_loss():
    cfg = SPEC.config_cls.tiny()
    batch = _content_batch(cfg)
    assert batch.shape == (4, 3, cfg.image_size, cfg.image_size)
    torch.manual_seed(0)
    state = SPEC.init_training(cfg, 1e-2)
    losses = [SPEC.train_step(state, batch) for _ in range(20)]
    assert set(losses[0]) == {"loss", "content_loss", "style_loss", "tv_loss"}
    first, last = np.mean([s["style_loss"] for s in losses[:3]]), np.mean([s["style_loss"] for s in losses[-3:]])
    assert last < 0.9 * first, f"style loss {first:.4f} -> {last:.4f}"
    assert losses[-1]["loss"] == pytest.approx(
        losses[-1]["content_loss"] + losses[-1]["style_loss"] + losses[-1]["tv_loss"], rel=1e-5)


def test_small_photos_are_scaled_up_for_crops():
    cfg = SPEC.config_cls.tiny()
    dataset = SPEC.make_dataset([_photo(12, 20)], None, cfg)
    assert dataset[0].shape == (3, cfg.image_size, cfg.image_size)


def test_gatys_transfer_lowers_its_loss():
    vgg, _ = style.load_vgg(SPEC.config_cls.tiny(), layers=style.GATYS_LAYERS)
    content, style_image = _photo(32, 32), style.builtin_style("stripes", 48)
    reports = []
    out = style.gatys_transfer(content, style_image, vgg, iterations=20,
                               progress=lambda i, loss: reports.append((i, loss)))
    assert out.shape == content.shape and out.dtype == np.uint8
    assert [i for i, _ in reports] == list(range(1, 21))
    losses = [loss for _, loss in reports]
    assert losses[-1] < 0.8 * losses[0], losses
    assert not np.array_equal(out, content)
    grey = style.gatys_transfer(_photo(16, 24, channels=1), style_image, vgg, iterations=2)
    assert grey.shape == (16, 24, 1) and grey.dtype == np.uint8


def test_gatys_transfer_refuses_a_vgg_without_its_layers():
    vgg, _ = style.load_vgg(SPEC.config_cls.tiny())
    with pytest.raises(ValueError, match="relu4_2"):
        style.gatys_transfer(_photo(32, 32), _photo(32, 32), vgg, iterations=1)
