"""Issue 17, no poison pills: an input that kills its model worker, or an archive or loose file that kills its read
worker (os._exit, as an OOM kill does), is retried --max-attempts times, then recorded as an error row ("worker
died while processing it" / "... reading it"); the job finishes, and reruns skip it unless --retry-errors. Ray
Data's default (restart the actor or rerun the read task, and retry without limit) otherwise turns one bad file
into an endless loop. Real Ray, real S3 server; the fault comes from a test UDF or a test read function."""
from __future__ import annotations

import functools
import os
import sys
from collections import Counter

import numpy as np
import ray

from genray import storage
from genray.config import ProcessConfig
from genray.images import encode_png
from genray.process import read_stage
from genray.process.job import ProcessImages, run_process_job

from helpers import random_png, read_manifest_table, tar_bytes

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillOn and kill_reading run in Ray's workers

GIVE_UP = 8  # deaths per victim after which the fault stops (so a regression fails on the count instead of hanging)


def _die(victim: str, deaths: str) -> None:
    """Kill this worker process, with no cleanup, recording the death as a line in `deaths`."""
    if _deaths(deaths)[victim] < GIVE_UP:
        with open(deaths, "a") as f:
            f.write(f"{victim}\n")
        os._exit(1)


def _deaths(deaths: str) -> Counter:
    with open(deaths) as f:
        return Counter(f.read().split())


class KillOn(ProcessImages):
    """Kills its model worker whenever it reads `victim`."""

    victim, deaths = "img03.png", ""

    def _read(self, row):
        if row["input_key"] == self.victim:
            _die(self.victim, self.deaths)
        return super()._read(row)


def kill_reading(unit, *args, victims: tuple[str, ...], deaths: str):
    """read_stage.unit_rows, but kills its read worker whenever it has read one of `victims` (an archive member
    or a loose file)."""
    for row in read_stage.unit_rows(unit, *args):
        if row["input_key"] in victims:
            _die(row["input_key"], deaths)
        yield row


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
    assert _deaths(KillOn.deaths)["img03.png"] == 2  # --max-attempts, then never again
    assert summary.counts == {"ok": 5, "skipped": 0, "error": 1}
    rows = {r["input_key"]: r for r in read_manifest_table(cfg.output_uri).to_pylist()}
    assert rows["img03.png"]["status"] == "error"
    assert rows["img03.png"]["error"].startswith("worker died while processing it (2 attempts, limit "
                                                 "--max-attempts 2)")
    assert all(rows[k]["status"] == "ok" for k in keys if k != "img03.png")

    # A rerun does not feed it to a worker again; the row stays an error.
    assert run_process_job(cfg, udf=KillOn).counts == {"ok": 0, "skipped": 5, "error": 1}
    assert _deaths(KillOn.deaths)["img03.png"] == 2
    # --retry-errors does, within the same bound.
    assert run_process_job(cfg.model_copy(update={"retry_errors": True}), udf=KillOn).counts["error"] == 1
    assert _deaths(KillOn.deaths)["img03.png"] == 4


def test_an_archive_or_loose_file_that_kills_its_read_worker_becomes_an_error_row(ray_local, sr_model_uri,
                                                                                  s3_bucket, tmp_path):
    # A job with an archive has a read stage: one read task for a.tar, one for the group of loose files. Each
    # victim comes after a first block (batch_size 2) was handed on, which a retry must give again unchanged.
    members = [f"m{i}.png" for i in range(6)]
    storage.write_bytes(f"{s3_bucket}/in/a.tar", tar_bytes([(m, random_png(i)) for i, m in enumerate(members)]))
    loose = [f"img{i:02d}.png" for i in range(6)]
    for i, key in enumerate(loose):
        storage.write_bytes(f"{s3_bucket}/in/{key}", random_png(10 + i))
    deaths = str(tmp_path / "deaths")
    open(deaths, "w").close()
    victims = ("a.tar#m3.png", "img03.png")
    read_fn = functools.partial(kill_reading, victims=victims, deaths=deaths)
    cfg = ProcessConfig(task="superres", input_uri=f"{s3_bucket}/in", output_uri=f"{s3_bucket}/out",
                        model_uri=sr_model_uri, batch_size=2, cpus_per_actor=0.5, max_attempts=2)

    summary = run_process_job(cfg, read_fn=read_fn)
    assert _deaths(deaths) == {victim: 2 for victim in victims}  # --max-attempts, then never again
    # ok: the archive's members handed on before it killed (m0, m1) and the other loose files; error: the archive's
    # own row (m2 and on are not read) and the loose file that kills, alone (its group was read file by file).
    assert summary.counts == {"ok": 7, "skipped": 0, "error": 2}
    rows = {r["input_key"]: r for r in read_manifest_table(cfg.output_uri).to_pylist()}
    died = "worker died while reading it (2 attempts, limit --max-attempts 2)"
    assert (rows["a.tar"]["status"], rows["a.tar"]["error"]) == ("error", died)
    assert (rows["img03.png"]["status"], rows["img03.png"]["error"]) == ("error", died)
    ok = {"a.tar#m0.png", "a.tar#m1.png"} | set(loose) - {"img03.png"}
    assert {k for k, r in rows.items() if r["status"] == "ok"} == ok
    assert set(rows) == ok | {"a.tar", "img03.png"}

    # A rerun reads neither again; their rows stay errors.
    assert run_process_job(cfg, read_fn=read_fn).counts == {"ok": 0, "skipped": 7, "error": 2}
    assert _deaths(deaths) == {victim: 2 for victim in victims}
    # --retry-errors does, within the same bound.
    retry = run_process_job(cfg.model_copy(update={"retry_errors": True}), read_fn=read_fn)
    assert retry.counts == {"ok": 0, "skipped": 7, "error": 2}
    assert _deaths(deaths) == {victim: 4 for victim in victims}
    rows = {r["input_key"]: r for r in read_manifest_table(cfg.output_uri).to_pylist()}
    assert rows["a.tar"]["error"] == rows["img03.png"]["error"] == died
