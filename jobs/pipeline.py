"""Ray Jobs entry point for pipelines, with the same arguments as `genray pipeline`:

    ray job submit --working-dir . -- python jobs/pipeline.py configs/pipeline/srresnet_photos.yaml

(or `genray submit pipeline configs/pipeline/srresnet_photos.yaml`). Inside a job the driver joins the cluster,
so a deployed Serve app keeps running after the job ends.
`--smoke-test [--output URI] [--set ...]` writes 64 + 16 embedded digits under <output>/smoke-data/ and runs
configs/pipeline/tiny_denoise.yaml on them (train, eval, gate, one bulk job; no deployment) with everything under
<output> (default: a new temp dir; give an s3:// output on a multi-node cluster).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from genray.cli import job_main, smoke_output

TINY_PIPELINE = Path(__file__).resolve().parent.parent / "configs" / "pipeline" / "tiny_denoise.yaml"


def smoke_test_args(argv: list[str]) -> list[str]:
    """`genray pipeline` arguments for the smoke run (writing its data first); other arguments pass through."""
    from genray import storage
    from genray.config import read_yaml
    from genray.datasets import export_digits_sample

    output, rest = smoke_output("pipeline", argv)
    data = export_digits_sample(storage.join_uri(output, "smoke-data"))
    train_overrides = [s for s in read_yaml(TINY_PIPELINE)["train_overrides"] if not s.startswith("output_uri=")]
    train_overrides += [f"output_uri={output}/train", f"data.uri={data}/train/", f"data.held_out_uri={data}/test/"]
    sets = {"run_uri": f"{output}/run", "train": str(TINY_PIPELINE.parent.parent / "tiny" / "denoise_ae.yaml"),
            "train_overrides": json.dumps(train_overrides), "eval.data_uri": f"{data}/test/",
            "bulk_jobs.0.job.input_uri": f"{data}/test/", "bulk_jobs.0.job.output_uri": f"{output}/denoised",
            "serve": "null"}
    return [str(TINY_PIPELINE), *[f"--set={k}={v}" for k, v in sets.items()], *rest]


def main(argv: list[str] | None = None) -> int:
    return job_main("pipeline", argv, smoke_test_args)


if __name__ == "__main__":
    sys.exit(main())
