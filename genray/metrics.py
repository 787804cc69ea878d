"""Image quality metrics, computed as papers and scikit-image compute them so numbers are comparable."""
from __future__ import annotations

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB of one image pair (any shape, same as skimage.metrics.peak_signal_noise_ratio)."""
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"psnr: shapes differ: {reference.shape} vs {test.shape}")
    mse = np.mean((reference - test) ** 2)
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(data_range**2 / mse))


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """RGB (..., 3) -> float64 luma Y (...) in [16, 235], ITU-R BT.601 as skimage.color.rgb2ycbcr(...)[..., 0]:
    Y = 16 + 65.481 R + 128.553 G + 24.966 B with R, G, B in [0, 1] (uint8 input is divided by 255, float
    input is taken as already in [0, 1]). SR papers report PSNR on this channel."""
    image = np.asarray(image)
    if image.shape[-1] != 3:
        raise ValueError(f"rgb_to_y: expected RGB (..., 3), got {image.shape}")
    rgb = image.astype(np.float64)
    if np.issubdtype(image.dtype, np.integer):
        rgb /= 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def mean_psnr(references: np.ndarray, tests: np.ndarray, data_range: float) -> float:
    """Mean of per-image PSNRs over the first axis (the usual way papers report a test set)."""
    return float(np.mean([psnr(r, t, data_range) for r, t in zip(references, tests)]))


# SSIM windows. "gaussian" is what SR/denoising papers and BasicSR report (Wang et al. 2004: an 11x11 Gaussian
# window, sigma 1.5, population covariance); "uniform7" is scikit-image's default (7x7 mean, sample covariance),
# kept for comparison with numbers measured that way. genray reports "gaussian" unless a name says otherwise.
SSIM_WINDOWS = ("gaussian", "uniform7")
_SSIM_WINDOW_SIDE = {"gaussian": 11, "uniform7": 7}


def ssim_fits(image: np.ndarray, window: str = "gaussian") -> bool:
    """Whether an HW or HWC image holds one SSIM window: callers scoring small images (a tiny config's crops)
    leave SSIM out for them rather than report a number no paper would compare with."""
    return min(np.shape(image)[:2]) >= _SSIM_WINDOW_SIDE[window]


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float, channel_axis: int | None = None,
         window: str = "gaussian") -> float:
    """Mean structural similarity (Wang et al. 2004), K1=0.01, K2=0.03, averaged over the image with a border of
    half a window left out (where the window would hang over the edge: the same as BasicSR's 'valid' filtering).

    window="gaussian": 11x11 Gaussian, sigma 1.5, population covariance — the paper/BasicSR SSIM, equal to
    skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False).
    window="uniform7": skimage's default (uniform 7x7, sample covariance).
    With channel_axis, the mean of the per-channel values (RGB images: channel_axis=-1)."""
    from scipy.ndimage import gaussian_filter, uniform_filter

    if window not in SSIM_WINDOWS:
        raise ValueError(f"ssim: window must be one of {SSIM_WINDOWS}, got {window!r}")
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"ssim: shapes differ: {reference.shape} vs {test.shape}")
    if channel_axis is not None:
        reference, test = np.moveaxis(reference, channel_axis, -1), np.moveaxis(test, channel_axis, -1)
        return float(np.mean([ssim(reference[..., c], test[..., c], data_range, window=window)
                              for c in range(reference.shape[-1])]))
    win_size = _SSIM_WINDOW_SIDE[window]
    if window == "gaussian":
        cov_norm = 1.0  # truncate 3.5 * sigma 1.5 -> radius 5

        def blur(x):
            return gaussian_filter(x, sigma=1.5, truncate=3.5)
    else:
        num_points = win_size**reference.ndim
        cov_norm = num_points / (num_points - 1)

        def blur(x):
            return uniform_filter(x, win_size)
    if min(reference.shape) < win_size:
        raise ValueError(f"ssim: every side must be at least {win_size}, got {reference.shape}")
    mean_x, mean_y = blur(reference), blur(test)
    var_x = cov_norm * (blur(reference * reference) - mean_x * mean_x)
    var_y = cov_norm * (blur(test * test) - mean_y * mean_y)
    cov_xy = cov_norm * (blur(reference * test) - mean_x * mean_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
         / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)))
    pad = (win_size - 1) // 2
    return float(s[tuple(slice(pad, -pad) for _ in s.shape)].mean())


def mean_ssim(references: np.ndarray, tests: np.ndarray, data_range: float, channel_axis: int | None = None,
              window: str = "gaussian") -> float:
    """Mean of per-image SSIMs over the first axis; channel_axis counts within one image (RGB HWC: -1)."""
    return float(np.mean([ssim(r, t, data_range, channel_axis, window) for r, t in zip(references, tests)]))

