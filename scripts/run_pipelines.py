"""Run configs/pipeline/*.yaml (or the ones named) one after another against a local S3 server holding the
embedded data, as a user would on this machine, and print each one's gate and metrics (for the README's results
table). The reports stay in the local S3 server, so each is also copied to <out>/<name>/report/.

    .venv/bin/python scripts/run_pipelines.py [configs/pipeline/x.yaml ...] [--out pipeline-results]

Pipelines run in the order given: put configs/pipeline/vae_digits.yaml before dcgan_digits.yaml (its gate
compares with the VAE).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import genray  # noqa: F401  (first: importing genray sets Ray's local env before ray is imported)

from genray import storage  # noqa: E402
from train_zoo import local_storage_with_data  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("configs", nargs="*", default=sorted(str(c) for c in Path("configs/pipeline").glob("*.yaml")))
    p.add_argument("--out", default="pipeline-results")
    args = p.parse_args(argv)

    from ray import serve

    from genray.pipeline.stages import GateFailed, load_pipeline_config, run_pipeline
    from genray.runtime import init_ray

    with local_storage_with_data():
        init_ray()
        for path in args.configs:
            cfg, train_cfg = load_pipeline_config(path)
            started = time.perf_counter()
            outcome = "passed"
            try:
                run = run_pipeline(cfg, train_cfg)
            except GateFailed as err:
                outcome = f"gate failed: {err}"
            except Exception as err:  # noqa: BLE001 - keep going, report the failure
                outcome = f"error: {type(err).__name__}: {err}"
            state = json.loads(storage.read_bytes(storage.join_uri(cfg.run_uri, "state.json")))["stages"]
            row = {"pipeline": path, "seconds": round(time.perf_counter() - started, 1), "outcome": outcome,
                   "train_seconds": state.get("train", {}).get("seconds"),
                   "gate": [(c["condition"], c["value"], c["passed"]) for c in state.get("gate", {}).get("conditions", [])],
                   "metrics": state.get("eval", {}).get("metrics"),
                   "rows": state.get("eval", {}).get("rows")}
            print(json.dumps(row), flush=True)
            out = Path(args.out) / cfg.name / "report"
            out.mkdir(parents=True, exist_ok=True)
            for obj in storage.list_objects(storage.join_uri(cfg.run_uri, "report")):
                (out / obj.key).write_bytes(storage.read_bytes(obj.uri))
            with open(Path(args.out) / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if "serve" in state:
                serve.shutdown()  # the next pipeline deploys its own app on the same port
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
