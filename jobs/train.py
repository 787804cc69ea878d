"""Ray Jobs entry point for training, with the same arguments as `genray train`:

    ray job submit --working-dir . -- python jobs/train.py configs/train/dcgan_digits.yaml --output s3://runs/dcgan

`--smoke-test [--output URI] [--set ...]` writes 64 + 16 embedded digits under <output>/smoke-data/ and trains
configs/tiny/denoise_ae.yaml on them for one epoch with 2 workers, into <output> (default: a new temp dir). On a
multi-node cluster give an s3:// output: every worker reads the data, and checkpoints must be on shared storage.
Inside a submitted job the Jobs API sets RAY_ADDRESS, so the driver joins the cluster instead of starting a Ray.
"""
from __future__ import annotations

import sys
from pathlib import Path

from genray.cli import job_main, smoke_output

TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "denoise_ae.yaml"


def smoke_test_args(argv: list[str]) -> list[str]:
    """`genray train` arguments for the smoke run (writing its data first); other arguments pass through."""
    from genray import storage
    from genray.datasets import export_digits_sample

    output, rest = smoke_output("train", argv)
    data = export_digits_sample(storage.join_uri(output, "smoke-data"))
    return [str(TINY_CONFIG), "--output", output, "--set", "name=smoke_denoise_ae", "--set", "train.epochs=1",
            "--set", f"data.uri={data}/train/", "--set", f"data.held_out_uri={data}/test/", *rest]


def main(argv: list[str] | None = None) -> int:
    return job_main("train", argv, smoke_test_args)


if __name__ == "__main__":
    sys.exit(main())
