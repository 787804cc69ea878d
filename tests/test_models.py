"""The registry-driven battery: every family in genray.models.MODELS, built from its tiny() config, on CPU.

A newly registered family is tested here without editing this file.
"""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from genray import metrics
from genray.models import MODELS, get_spec, register_model
from genray.models.data import build_dataset, fixed_batch
from genray.tasks import TASKS

FAMILIES = sorted(MODELS)


def _side(spec, cfg) -> int:
    """A small input side (16 for the tiny configs' fixed-size families) that is a multiple of the size multiple."""
    m = spec.size_multiple
    return m * max(1, -(-16 // m))


def _uint8_batch(spec, cfg, n: int = 8) -> np.ndarray:
    """n fixed images, uint8 (n, S, S, C): bright rectangles of random size and grey level on a dark background."""
    rng = np.random.default_rng(0)
    side = _side(spec, cfg)
    images = np.full((n, side, side, spec.in_channels(cfg)), 10, np.uint8)
    for image in images:
        for _ in range(2):
            y, x = rng.integers(0, side - 4, 2)
            h, w = rng.integers(3, side // 2, 2)
            image[y : y + h, x : x + w] = rng.integers(120, 256, image.shape[2])
    return images


def _labels(n: int) -> list[int]:
    return [i % 3 for i in range(n)]


def _float_batch(spec, cfg, n: int = 8):
    """A training batch as the loop builds it: the family's dataset over n images, collated."""
    dataset = build_dataset(spec, list(_uint8_batch(spec, cfg, n)), _labels(n), cfg)
    return fixed_batch(dataset, n)


def _images(batch) -> torch.Tensor:
    return batch if torch.is_tensor(batch) else batch[0]


def _train(spec, cfg, batch: torch.Tensor, steps: int, seed: int, lr: float = 5e-3):
    torch.manual_seed(seed)
    state = spec.init_training(cfg, lr)
    losses = [spec.train_step(state, batch) for _ in range(steps)]
    return state, losses


def _require_image_forward(spec):
    if not TASKS[spec.task].image_to_image:
        pytest.skip(f"{spec.name}: task {spec.task!r} does not map images to images")


# --- the battery ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_spec_answers_what_its_task_needs(name):
    """What eval and Serve ask of a family comes from its spec: a generator generates, fixed-size models say their
    size, denoisers their training noise, reconstruct/interpolate come together."""
    spec = MODELS[name]
    cfg = spec.config_cls.tiny()
    route = TASKS[spec.task].route
    assert (route == "generator") <= (spec.generate is not None)
    assert (route in ("generator", "classifier")) <= (spec.image_size is not None)
    assert (spec.task == "denoise") <= (spec.noise_sigma is not None and spec.noise_sigma(cfg) > 0)
    assert (spec.reconstruct is None) == (spec.interpolate is None)
    assert spec.task in spec.eval_tasks or not TASKS[spec.task].evaluated


@pytest.mark.parametrize("name", FAMILIES)
def test_spec_is_consistent(name):
    spec = MODELS[name]
    cfg = spec.config_cls.tiny()
    assert spec.name == name and get_spec(name) is spec
    assert cfg.family == name
    assert spec.value_range in ("tanh", "sigmoid")
    assert spec.scale >= 1 and spec.size_multiple >= 1
    assert spec.in_channels(cfg) in (1, 3)
    # The tiny config survives the JSON round trip that model.json and train_loop_config put it through.
    assert spec.config_cls.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_shapes(name):
    spec = MODELS[name]
    _require_image_forward(spec)
    cfg = spec.config_cls.tiny()
    model = spec.build(cfg).eval()
    c, m, s = spec.in_channels(cfg), spec.size_multiple, spec.scale
    for h, w in [(_side(spec, cfg), _side(spec, cfg)), (2 * m, 3 * m * 2)]:
        x = torch.rand(2, c, h, w) if spec.value_range == "sigmoid" else torch.rand(2, c, h, w) * 2 - 1
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, c, h * s, w * s)
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        low = 0.0 if spec.value_range == "sigmoid" else -1.0
        assert y.min() >= low and y.max() <= 1.0


@pytest.mark.parametrize("name", FAMILIES)
def test_train_steps_finite_losses_and_gradients(name):
    spec = MODELS[name]
    cfg = spec.config_cls.tiny()
    state, losses = _train(spec, cfg, _float_batch(spec, cfg), steps=3, seed=0)
    for step in losses:
        assert step and all(isinstance(v, float) and math.isfinite(v) for v in step.values()), step
    for module_name, module in state.modules.items():
        for param_name, p in module.named_parameters():
            assert p.grad is not None, f"{module_name}.{param_name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{module_name}.{param_name} has a non-finite gradient"
            assert torch.isfinite(p).all()
    assert state.model is state.modules["model"]


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_goes_down_on_one_batch(name):
    spec = MODELS[name]
    cfg = spec.config_cls.tiny()
    if not spec.loss_decreases:
        pytest.skip(f"{spec.name}: adversarial losses need not fall")
    _, losses = _train(spec, cfg, _float_batch(spec, cfg), steps=30, seed=0, lr=1e-2)
    values = [step["loss"] for step in losses]
    # Fresh noise every step makes single steps jumpy; compare the first and last five.
    first, last = np.mean(values[:5]), np.mean(values[-5:])
    assert last < 0.9 * first, f"loss {first:.4f} -> {last:.4f}"


def _probe(spec, cfg, model) -> torch.Tensor:
    """What a model computes, to compare two copies: a generator's samples from a fixed seed; for the rest, the
    forward on fixed images (an image batch, or a classifier's logits)."""
    if spec.generate is not None:
        return torch.from_numpy(spec.generate(model, 3, 0, cfg))
    return model(_images(_float_batch(spec, cfg, n=3)))


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_round_trip(name):
    spec = MODELS[name]
    cfg = spec.config_cls.tiny()
    state, _ = _train(spec, cfg, _float_batch(spec, cfg), steps=2, seed=0)
    trained = state.model.eval()
    torch.manual_seed(123)  # a different init, so the copy only matches if the state_dict loaded
    fresh = spec.build(cfg).eval()
    with torch.no_grad():
        assert not torch.equal(_probe(spec, cfg, fresh), _probe(spec, cfg, trained))
        fresh.load_state_dict(trained.state_dict())
        torch.testing.assert_close(_probe(spec, cfg, fresh), _probe(spec, cfg, trained), rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_seeded_determinism(name):
    spec = MODELS[name]
    cfg = spec.config_cls.tiny()
    batch = _float_batch(spec, cfg)
    state_a, losses_a = _train(spec, cfg, batch, steps=4, seed=7)
    state_b, losses_b = _train(spec, cfg, batch, steps=4, seed=7)
    state_c, _ = _train(spec, cfg, batch, steps=4, seed=8)
    assert losses_a == losses_b
    for key in state_a.modules:
        sd_a, sd_b, sd_c = (s.modules[key].state_dict() for s in (state_a, state_b, state_c))
        for tensor_name in sd_a:
            assert torch.equal(sd_a[tensor_name], sd_b[tensor_name]), f"{key}.{tensor_name} differs with one seed"
        assert any(not torch.equal(sd_a[t], sd_c[t]) for t in sd_a), f"{key}: seed 8 gave seed 7's weights"


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_grid_is_uint8_hwc(name):
    spec = MODELS[name]
    cfg = spec.config_cls.tiny()
    state = spec.init_training(cfg, 1e-3)
    batch = _float_batch(spec, cfg, n=4)
    grid = spec.sample_grid({k: m.eval() for k, m in state.modules.items()}, batch, cfg)
    assert isinstance(grid, np.ndarray) and grid.dtype == np.uint8
    assert grid.ndim == 3 and grid.shape[2] in (1, 3)
    side = _images(batch).shape[-1]
    assert grid.shape[0] > side and grid.shape[1] >= 2 * side  # several tiles


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluate_returns_finite_floats(name):
    spec = MODELS[name]
    cfg = spec.config_cls.tiny()
    model = spec.build(cfg).eval()
    result = spec.evaluate(model, list(_uint8_batch(spec, cfg, n=6)), _labels(6), cfg)
    assert result
    for key, value in result.items():
        assert isinstance(key, str) and isinstance(value, float) and math.isfinite(value), (key, value)


def test_denoise_ae_evaluate_reports_gain():
    spec = get_spec("denoise_ae")
    cfg = spec.config_cls.tiny()
    model = spec.build(cfg).eval()
    images = list(_uint8_batch(spec, cfg, n=6))
    result = spec.evaluate(model, images, None, cfg)
    assert result["num_eval_images"] == 6.0
    assert result["psnr_gain_db"] == pytest.approx(result["psnr_denoised_db"] - result["psnr_noisy_db"])
    assert spec.evaluate(model, images, None, cfg) == result  # fixed evaluation noise: comparable across epochs


# --- the registry --------------------------------------------------------------------------------------------

def test_register_model_refuses_duplicate():
    before = dict(MODELS)
    spec = MODELS[FAMILIES[0]]
    with pytest.raises(ValueError, match=f"{spec.name!r} is registered twice"):
        register_model(spec)
    assert MODELS == before and MODELS[spec.name] is spec


def test_get_spec_unknown_names_valid_families():
    with pytest.raises(ValueError) as err:
        get_spec("nope")
    assert "'nope'" in str(err.value)
    assert "valid families: " + ", ".join(sorted(MODELS)) in str(err.value)


def test_get_spec_unhashable_name():
    with pytest.raises(ValueError, match="valid families"):
        get_spec(["denoise_ae"])


# --- metrics -------------------------------------------------------------------------------------------------

def _pairs():
    rng = np.random.default_rng(0)
    ref8 = rng.integers(0, 256, (28, 30, 3), dtype=np.uint8)
    test8 = np.clip(ref8.astype(int) + rng.integers(-20, 21, ref8.shape), 0, 255).astype(np.uint8)
    reff = rng.random((2, 16, 16)).astype(np.float32)
    testf = np.clip(reff + rng.normal(0, 0.1, reff.shape), 0, 1).astype(np.float32)
    return [(ref8, test8, 255), (reff, testf, 1.0), (ref8[:, :, 0], 255 - ref8[:, :, 0], 255)]


@pytest.mark.parametrize("index", range(3))
def test_psnr_matches_skimage(index):
    reference, test, data_range = _pairs()[index]
    ours = metrics.psnr(reference, test, data_range)
    theirs = peak_signal_noise_ratio(reference, test, data_range=data_range)
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_psnr_identical_is_inf_and_shape_mismatch_fails():
    image = np.zeros((4, 4), np.uint8)
    assert metrics.psnr(image, image, 255) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(image, np.zeros((4, 5), np.uint8), 255)


def test_mean_psnr_is_mean_of_per_image_skimage():
    reference, test, data_range = _pairs()[1]
    expected = np.mean([peak_signal_noise_ratio(r, t, data_range=data_range) for r, t in zip(reference, test)])
    assert metrics.mean_psnr(reference, test, data_range) == pytest.approx(expected, abs=1e-6)
