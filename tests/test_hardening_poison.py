"""Issue 17, no poison pills: an input that kills its model worker (os._exit, as an OOM kill does) is retried
--max-attempts times, then recorded as an error row "worker died while processing it"; the job finishes, and
reruns skip it unless --retry-errors. Ray Data's default (restart the actor and retry its batch without limit)
otherwise turns one bad file into an endless loop. Real Ray, real S3 server; the fault comes from a test UDF."""
from __future__ import annotations

import os
import sys

import numpy as np
import ray

from genray import storage
from genray.config import ProcessConfig
from genray.images import encode_png
from genray.process.job import ProcessImages, run_process_job

from helpers import read_manifest_table

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillOn runs in Ray's workers

GIVE_UP = 8  # deaths after which KillOn stops killing (so a regression fails on the count instead of hanging)


class KillOn(ProcessImages):
    """Kills its worker process, with no cleanup, whenever it reads `victim`; each death is a line in `deaths`."""

    victim, deaths = "img03.png", ""

    def _read(self, row):
        if row["input_key"] == self.victim:
            with open(self.deaths) as f:
                died = len(f.readlines())
            if died < GIVE_UP:
                with open(self.deaths, "a") as f:
                    f.write("died\n")
                os._exit(1)
        return super()._read(row)


def _deaths() -> int:
    with open(KillOn.deaths) as f:
        return len(f.readlines())


def test_a_worker_killing_input_becomes_an_error_row_and_reruns_skip_it(ray_local, sr_model_uri, s3_bucket,
                                                                        tmp_path):
    keys = [f"img{i:02d}.png" for i in range(6)]
    for i, key in enumerate(keys):
        rng = np.random.default_rng(i)
        storage.write_bytes(f"{s3_bucket}/in/{key}", encode_png(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)))
    KillOn.deaths = str(tmp_path / "deaths")
    open(KillOn.deaths, "w").close()
    cfg = ProcessConfig(task="superres", input_uri=f"{s3_bucket}/in", output_uri=f"{s3_bucket}/out",
                        model_uri=sr_model_uri, batch_size=2, cpus_per_actor=0.5, max_attempts=2)

    summary = run_process_job(cfg, udf=KillOn)
    assert _deaths() == 2  # --max-attempts, then never again
    assert summary.counts == {"ok": 5, "skipped": 0, "error": 1}
    rows = {r["input_key"]: r for r in read_manifest_table(cfg.output_uri).to_pylist()}
    assert rows["img03.png"]["status"] == "error"
    assert rows["img03.png"]["error"].startswith("worker died while processing it (2 attempts, limit "
                                                 "--max-attempts 2)")
    assert all(rows[k]["status"] == "ok" for k in keys if k != "img03.png")

    # A rerun does not feed it to a worker again; the row stays an error.
    assert run_process_job(cfg, udf=KillOn).counts == {"ok": 0, "skipped": 5, "error": 1}
    assert _deaths() == 2
    # --retry-errors does, within the same bound.
    assert run_process_job(cfg.model_copy(update={"retry_errors": True}), udf=KillOn).counts["error"] == 1
    assert _deaths() == 4
