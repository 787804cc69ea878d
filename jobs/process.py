"""Ray Jobs entry point for a bulk job, with the same flags as `genray process`:

    ray job submit --working-dir . -- python jobs/process.py superres --input s3://in/ --output s3://out/ \\
        --model s3://runs/srresnet/model

Inside a submitted job the Jobs API sets RAY_ADDRESS, so the driver joins the cluster instead of starting Ray.
"""
from __future__ import annotations

import sys

from genray.cli import main as genray_main


def main(argv: list[str] | None = None) -> int:
    return genray_main(["process", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
