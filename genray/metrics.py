"""Image quality metrics, computed the way scikit-image computes them so numbers are comparable."""
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


def mean_psnr(references: np.ndarray, tests: np.ndarray, data_range: float) -> float:
    """Mean of per-image PSNRs over the first axis (the usual way papers report a test set)."""
    return float(np.mean([psnr(r, t, data_range) for r, t in zip(references, tests)]))
