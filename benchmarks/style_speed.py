"""Style transfer speed on one 256x256 photo: the fast style network (Johnson et al. 2016, one forward pass) against
Gatys et al. 2016's optimisation of the image (--iterations Adam steps through VGG19), measured in one run.

Both run in this process with torch threads = all cores (--threads). The fast network is the default
StyleNetConfig (widths 32/64/128, 5 residual blocks) through the Predictor, as bulk jobs and serving run it: the
median of --repeats calls after one warm-up call. Gatys is genray.models.style_net.gatys_transfer, timed end to end
(content features, style Grams, then the iterations). Weights are random (style net) and untrained (VGG19: none
exist offline): the cost of a forward or an Adam step does not depend on the weights, so the times are those of
trained models.
Prints one JSON line: {"fast_style_ms": ..., "gatys_s": ..., "gatys_vs_fast": ..., "gatys_iterations": ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from genray.model_artifact import save_artifact
from genray.datasets import load_embedded
from genray.inference import Predictor
from genray.models import get_spec
from genray.models.style_net import GATYS_LAYERS, builtin_style, gatys_transfer
from genray.models.vgg import load_vgg19_features


def content_image(size: int) -> np.ndarray:
    """A size x size centre crop of the embedded 'chelsea' photo (the cat), or of the first photo large enough."""
    photos, _, keys = load_embedded("photos")
    by_key = dict(zip(keys, photos))
    fits = [im for im in [by_key.get("test/chelsea.png"), *photos] if im is not None and min(im.shape[:2]) >= size]
    if not fits:
        raise ValueError(f"no embedded photo is {size} px on both sides")
    photo = fits[0]
    h, w = photo.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(photo[y:y + size, x:x + size])


def measure_fast(content: np.ndarray, repeats: int) -> float:
    """Median ms of one fast-style Predictor call on `content` (random-init weights, saved and loaded as an
    artefact, as a trained network would be)."""
    spec = get_spec("style_net")
    cfg = spec.config_cls(allow_untrained_vgg=True, vgg_download=False)  # VGG options only matter for training
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="genray-bench-") as tmp:
        save_artifact(tmp, spec, cfg, spec.build(cfg).eval(), metrics={})
        predictor = Predictor.from_uri(tmp, device="cpu")
    predictor([content])  # warm-up: oneDNN picks its kernels on the first call of a shape
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor([content])
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure_gatys(content: np.ndarray, iterations: int) -> tuple[float, str]:
    """(seconds, VGG weight source) of gatys_transfer on `content` with a built-in style pattern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loud untrained-VGG warning: expected here, see the docstring
        vgg, source = load_vgg19_features(GATYS_LAYERS, allow_untrained=True, allow_download=False)
    style = builtin_style("waves", max(content.shape[:2]))
    started = time.perf_counter()
    gatys_transfer(content, style, vgg, iterations=iterations)
    return time.perf_counter() - started, source


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iterations", type=int, default=100, help="Gatys optimisation steps (genray's default: 300)")
    p.add_argument("--repeats", type=int, default=5, help="timed fast-network calls (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--smoke-test", action="store_true", help="64x64, 3 iterations, for CI")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.size, args.iterations, args.repeats = 64, 3, 2

    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    content = content_image(args.size)
    fast_ms = measure_fast(content, args.repeats)
    gatys_s, vgg_source = measure_gatys(content, args.iterations)
    figures = {
        "fast_style_ms": round(fast_ms, 1),
        "gatys_s": round(gatys_s, 2),
        "gatys_vs_fast": round(1000 * gatys_s / fast_ms, 1),
        "gatys_iterations": args.iterations,
        "gatys_ms_per_iteration": round(1000 * gatys_s / args.iterations, 1),
        "size": args.size,
        "threads": torch.get_num_threads(),
        "vgg_weights": vgg_source,
        "load_avg_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # at start and end: was it busy?
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
