"""Where decoding and encoding go on a GPU node: threads in the model actor (genray's --overlap-io) or separate Ray
Data CPU stages. Measured per batch on this machine, with the CPU standing in for the GPU's forward:

- cpu_work_ms: what the actor does besides the forward for one batch: PNG decode of the inputs + PNG encode of the
  x4 outputs (Pillow, in the actor's threads).
- forward_ms: the Predictor's forward on the batch (the GPU's share of the work on a GPU node).
- handoff_ms: what separate stages add to the actor per batch: the decoded inputs and the x4 outputs through Ray's
  object store (ray.put + ray.get of each, same node; across nodes it is a network copy on top).

With overlap in the actor, the model waits only if cpu_work exceeds the forward (the two calls alternate); with
separate stages the actor's critical path is forward + handoff. Prints one JSON line with both busy fractions.

    python benchmarks/bulk_overlap.py [--smoke-test]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import genray  # noqa: F401  (first: importing genray sets Ray's local env before ray is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from genray.images import decode_image, encode_png  # noqa: E402


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import ray

    from genray.inference import Predictor
    from genray.model_artifact import save_artifact
    from genray.models import get_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="input side; outputs are x4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.batch_size, args.size, args.repeats = 2, 32, 1
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    # Smooth images (PNG compresses them as it does photos), not noise.
    y, x = np.mgrid[0:args.size, 0:args.size] / args.size
    pngs = [encode_png(np.clip(127 + 100 * np.sin(6 * x + i)[:, :, None] * np.cos(4 * y)[:, :, None]
                               + rng.normal(0, 5, (args.size, args.size, 3)), 0, 255).astype(np.uint8))
            for i in range(args.batch_size)]
    spec = get_spec("srgan")
    cfg = spec.config_cls.model_validate({"num_features": 32, "num_blocks": 8})
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        save_artifact(d, spec, cfg, spec.build(cfg).eval(), {})
        predictor = Predictor.from_uri(d, device="cpu", tile=512, batch_size=1)
    io = ThreadPoolExecutor(8)
    images = [decode_image(b, channels=None) for b in pngs]
    outputs = predictor(images)
    decode_ms = _best(lambda: list(io.map(lambda b: decode_image(b, channels=None), pngs)), args.repeats)
    encode_ms = _best(lambda: list(io.map(encode_png, outputs)), args.repeats)
    forward_ms = _best(lambda: predictor(images), args.repeats)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        def handoff() -> None:
            ray.get([ray.put(im) for im in images])
            ray.get([ray.put(out) for out in outputs])
        handoff()
        handoff_ms = _best(handoff, args.repeats)
    finally:
        ray.shutdown()
    cpu_ms = decode_ms + encode_ms
    print(json.dumps({
        "batch": args.batch_size, "input_side": args.size,
        "decode_ms": round(decode_ms, 1), "encode_ms": round(encode_ms, 1), "cpu_work_ms": round(cpu_ms, 1),
        "forward_ms": round(forward_ms, 1), "handoff_ms": round(handoff_ms, 1),
        # the model's busy fraction per layout (1.0: never waits)
        "busy_sequential": round(forward_ms / (forward_ms + cpu_ms), 3),
        "busy_overlap_in_actor": round(min(1.0, forward_ms / max(cpu_ms, 1e-9)), 3),
        "busy_separate_stages": round(forward_ms / (forward_ms + handoff_ms), 3),
        "load_average": os.getloadavg()[0],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
