"""Ray Jobs entry point for a bulk job, with the same flags as `genray process`:

    ray job submit --working-dir . -- python jobs/process.py superres --input s3://in/ --output s3://out/ \\
        --model s3://runs/srresnet/model

`--smoke-test [--output URI] [flags]` writes 12 noisy embedded digits and a seeded, untrained tiny denoising
autoencoder under <output> (default: a new temp dir; give s3:// on a multi-node cluster), then runs
`genray process denoise` over them into <output>/smoke-out (a manifest included); other flags pass through.
Inside a submitted job the Jobs API sets RAY_ADDRESS, so the driver joins the cluster instead of starting Ray.
"""
from __future__ import annotations

import sys

from genray.cli import job_main, smoke_output


def smoke_test_args(argv: list[str]) -> list[str]:
    """`genray process` arguments for the smoke run (writing its inputs and model first)."""
    import numpy as np
    import torch

    from genray import storage
    from genray.model_artifact import save_artifact
    from genray.datasets import load_embedded
    from genray.images import encode_png
    from genray.models import get_spec

    output, rest = smoke_output("process", argv)
    images, _, _ = load_embedded("digits")
    rng = np.random.default_rng(0)
    for i, image in enumerate(images[:12]):
        noisy = np.clip(image + rng.normal(0, 60, image.shape), 0, 255).astype(np.uint8)
        storage.write_bytes(storage.join_uri(output, "smoke-in", f"digit{i:02d}.png"), encode_png(noisy))
    spec = get_spec("denoise_ae")  # seeded random weights: the smoke test checks the plumbing, not the model
    cfg = spec.config_cls.tiny()
    torch.manual_seed(0)
    model_uri = storage.join_uri(output, "smoke-model")
    save_artifact(model_uri, spec, cfg, spec.build(cfg).eval(), {})
    return ["denoise", "--input", storage.join_uri(output, "smoke-in"), "--output",
            storage.join_uri(output, "smoke-out"), "--model", model_uri, "--batch-size", "4", *rest]


def main(argv: list[str] | None = None) -> int:
    return job_main("process", argv, smoke_test_args)


if __name__ == "__main__":
    sys.exit(main())
