"""Issue 17, data loss: an output prefix equal to or inside the input (after normalisation) is refused; every input
gets its own output key whatever the names (suffix swaps meeting fallbacks, a folder named like an archive beside
it, nested archives, '#' in names, a name repeated in a tar); two runs on one output prefix at once are refused by
a lease (and a run that lost its lease commits no more shards and writes no more files), and a shard number is never reused. Crafted inputs
in the real S3 server, through the real CLI."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import ray

from genray import archives, storage
from genray.config import ProcessConfig
from genray.images import decode_image
from genray.process.job import JobError, ProcessImages, run_process_job
from genray.process.lease import LEASE_NAME, Lease

from helpers import genray, random_png, read_manifest_table, tar_bytes

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # TakenOverAt below runs in Ray's workers


# --- output equal to or inside the input ------------------------------------------------------------------------

@pytest.mark.parametrize("output", ["{in}", "{in}/", "{in}//", "{in}/./", "{in}/sub/../", "{in}/out",
                                    "{in}/x/..//out", "{root}"])
def test_output_overlapping_the_input_is_refused_s3(sr_model_uri, s3_bucket, output):
    storage.write_bytes(f"{s3_bucket}/in/a.png", random_png(0, 8))
    cfg = ProcessConfig(task="superres", input_uri=f"{s3_bucket}/in", model_uri=sr_model_uri,
                        output_uri=output.format(**{"in": f"{s3_bucket}/in", "root": s3_bucket}))
    with pytest.raises(JobError, match="overlaps input"):
        run_process_job(cfg)
    assert [o.key for o in storage.list_objects(s3_bucket)] == ["in/a.png"]


def test_output_reached_through_a_symlinked_folder_is_refused_through_the_cli(sr_model_uri, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(random_png(0, 8))
    os.symlink(inputs, tmp_path / "alias")
    for output in (tmp_path / "alias", tmp_path / "alias" / "out", f"{tmp_path}//in/../in/out"):
        r = genray("process", "superres", "--input", str(inputs), "--output", str(output), "--model",
                   sr_model_uri, "--dry-run")
        assert r.returncode != 0 and "overlaps input" in r.stderr, (output, r.stderr[-2000:])
    assert sorted(p.name for p in inputs.iterdir()) == ["a.png"]


# --- one output key per input ------------------------------------------------------------------------------------

def test_every_input_gets_its_own_output_through_the_cli(ray_local, sr_model_uri, s3_bucket):
    """Each input has its own size, so each output's size says which input it came from: nothing overwritten."""
    inputs, out = f"{s3_bucket}/in", f"{s3_bucket}/out"
    sizes = {}

    def image(key: str) -> bytes:
        sizes[key] = 8 + len(sizes)
        return random_png(len(sizes), sizes[key])

    for key in ("a.jpg", "a.png", "a.jpg.png",  # suffix swap and fallback meet
                "pack.tar/m.png",  # a folder named like the archive beside it
                "pack.tar~/m.png",  # and one named like that folder's escape
                "nest.tar/inner.tar/y.png",
                "h.tar#m.png"):  # '#' in a loose name, beside an archive h.tar with a member m.png
        storage.write_bytes(f"{inputs}/{key}", image(key))
    archives_in = {
        "pack.tar": ["m.png"],
        "order.tar": ["x.jpg.gif", "x.gif", "x.jpg"],  # in this order the fallback of x.jpg is taken
        "nest.tar": ["inner.tar/y.png"],
        "nest.tar/inner.tar": ["y.png"],
        "h.tar": ["m.png"],
        "we#ird.tar": ["m.png"],  # '#' in an archive's name
        "dup.tar": ["d.png", "d.png", "d.png"],  # a name repeated (tar append): one row each
    }
    # Keys storage.join_uri would collapse into one (it drops '' and '.' segments): three S3 objects, three outputs.
    bucket, prefix = s3_bucket.removeprefix("s3://").split("/", 1)[0], inputs.split("/", 3)[3]
    for key in ("sp/./c.png", "sp//c.png", "sp/c.png"):
        storage.s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=image(key))
    for archive, members in archives_in.items():
        entries = [(m, image(f"{archive}#{m}#{i}")) for i, m in enumerate(members)]
        storage.write_bytes(f"{inputs}/{archive}", tar_bytes(entries))
    r = genray("process", "superres", "--input", inputs, "--output", out, "--model", sr_model_uri,
               "--batch-size", "4", "--address", ray_local.get_runtime_context().gcs_address, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    rows = [row for row in read_manifest_table(out).to_pylist() if not archives.is_archive(row["input_key"])
            or "#" in row["input_key"]]
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == len(sizes) and len(rows) == len(sizes), [(r["input_key"], r["error"]) for r in rows]
    assert len({row["input_key"] for row in ok}) == len(ok)
    assert len({row["output_key"] for row in ok}) == len(ok)
    # Every output holds its own input, x4: none was written over by another input's.
    widths = sorted(decode_image(storage.read_bytes(f"{out}/{row['output_key']}")).shape[1] for row in ok)
    assert widths == sorted(4 * s for s in sizes.values())
    keys = {row["input_key"] for row in ok}
    assert {"h.tar%23m.png", "h.tar#m.png", "we%23ird.tar#m.png", "dup.tar#d.png", "dup.tar#d.png#2",
            "dup.tar#d.png#3"} <= keys
    by_input = {row["input_key"]: row["output_key"] for row in ok}
    assert by_input["pack.tar#m.png"] == "pack.tar/m.png" and by_input["pack.tar/m.png"] == "pack.tar~/m.png"
    assert [by_input[k] for k in ("sp/./c.png", "sp//c.png", "sp/c.png")] == ["sp/.~/c.png", "sp/~/c.png", "sp/c.png"]

    # A rerun skips all of them (their keys are stable), and the archive rows say read in full.
    r = genray("process", "superres", "--input", inputs, "--output", out, "--model", sr_model_uri,
               "--address", ray_local.get_runtime_context().gcs_address, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{'skipped':<8} {len(sizes):>7}" in r.stdout and f"{'ok':<8} {0:>7}" in r.stdout


# --- two runs on one output prefix --------------------------------------------------------------------------------

def test_a_second_run_on_a_held_output_prefix_is_refused_through_the_cli(ray_local, sr_model_uri, s3_bucket):
    storage.write_bytes(f"{s3_bucket}/in/a.png", random_png(0, 8))
    out = f"{s3_bucket}/out"
    address = ray_local.get_runtime_context().gcs_address
    holder = Lease(out, "run-holding-it", seconds=600).acquire()  # what a running job holds
    try:
        r = genray("process", "superres", "--input", f"{s3_bucket}/in", "--output", out, "--model",
                   sr_model_uri, "--address", address)
        assert r.returncode != 0 and "another run (run-holding-it" in r.stderr, r.stderr[-2000:]
        assert not any(o.key.endswith(".png") for o in storage.list_objects(out))
    finally:
        holder.release()
    # A dead run's lease (not renewed) expires and is taken over.
    Lease(out, "run-that-died", seconds=1).acquire()._stop.set()
    time.sleep(1.5)
    r = genray("process", "superres", "--input", f"{s3_bucket}/in", "--output", out, "--model", sr_model_uri,
               "--address", address)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "taking over the lease of run run-that-died" in r.stdout
    assert not storage.exists(f"{out}/_genray_lease.json")  # released at the end


def test_a_run_that_lost_its_lease_commits_no_more_shards(ray_local, sr_model_uri, s3_bucket, monkeypatch):
    for i in range(4):
        storage.write_bytes(f"{s3_bucket}/in/img{i:02d}.png", random_png(i, 8))
    out = f"{s3_bucket}/out"
    cfg = ProcessConfig(task="superres", input_uri=f"{s3_bucket}/in", output_uri=out, model_uri=sr_model_uri,
                        output_format="tar", shard_size=1, batch_size=1, cpus_per_actor=0.5)
    check, calls = Lease.check, []

    def taken_over_before_the_third_shard(lease):
        # As if this run were paused past its lease's expiry: another run takes the lease over.
        calls.append(lease.run_id)
        if len(calls) == 3:
            storage.write_bytes(lease.uri, json.dumps({"run_id": "run-that-took-over", "host": "elsewhere", "pid": 1,
                                                       "expires": time.time() + 600}).encode())
        check(lease)

    monkeypatch.setattr(Lease, "check", taken_over_before_the_third_shard)
    with pytest.raises(JobError, match=r"lost its lease on the output prefix \(run run-that-took-over on "
                                       r"elsewhere holds it now\)"):
        run_process_job(cfg)
    # The two shards committed before the takeover, each in the manifest; none after it.
    assert len(calls) == 3
    shards = sorted(o.key for o in storage.list_objects(out, suffixes=(".tar",)))
    assert shards == ["shard-000000.tar", "shard-000001.tar"]
    rows = read_manifest_table(out).to_pylist()
    assert sorted(r["output_key"].partition("#")[0] for r in rows) == shards
    assert all(r["status"] == "ok" for r in rows)
    assert json.loads(storage.read_bytes(f"{out}/{LEASE_NAME}"))["run_id"] == "run-that-took-over"  # left alone


class TakenOver(ProcessImages):
    """As if this run were paused past its lease's expiry once its model actor had started: another run takes the
    lease over (written from inside the actor, on the S3 server) as the actor receives its first batch."""

    def _process(self, rows):
        if not getattr(self, "taken_over", False):
            self.taken_over = True
            storage.write_bytes(storage.join_uri(self.cfg.output_uri, LEASE_NAME), json.dumps(
                {"run_id": "run-that-took-over", "host": "elsewhere", "pid": 1, "expires": time.time() + 600}).encode())
        return super()._process(rows)


def test_a_run_that_lost_its_lease_writes_no_more_files(ray_local, sr_model_uri, s3_bucket):
    for i in range(5):
        storage.write_bytes(f"{s3_bucket}/in/img{i:02d}.png", random_png(i, 8))
    out = f"{s3_bucket}/out"
    cfg = ProcessConfig(task="superres", input_uri=f"{s3_bucket}/in", output_uri=out, model_uri=sr_model_uri,
                        batch_size=1, concurrency="1", cpus_per_actor=0.5)
    with pytest.raises(JobError, match=r"lost its lease on the output prefix \(run run-that-took-over on "
                                       r"elsewhere holds it now\)"):
        run_process_job(cfg, udf=TakenOver)
    # Model actors write loose files themselves: not one once the lease is gone, and no manifest row either.
    assert [o.key for o in storage.list_objects(out)] == [LEASE_NAME]
    assert json.loads(storage.read_bytes(f"{out}/{LEASE_NAME}"))["run_id"] == "run-that-took-over"  # left alone


def test_shard_numbers_are_never_reused(s3_bucket):
    out = f"{s3_bucket}/shards"
    storage.write_bytes(f"{out}/shard-000000.tar", b"someone else's shard")
    # A writer that believes the prefix is empty (a listing that missed a shard) still never overwrites one.
    writer = archives.ShardWriter(out, max_samples=1, start_index=0)
    writer.add([("a.png", random_png(0, 8))])
    assert storage.read_bytes(f"{out}/shard-000000.tar") == b"someone else's shard"
    assert [o.key for o in storage.list_objects(out)] == ["shard-000000.tar", "shard-000001.tar"]
    # A listing that fails is an error, never "no shards yet" (which would restart the numbering at 0).
    with pytest.raises(storage.StorageError, match="does not exist"):
        archives.next_shard_index("s3://genray-test-no-such-bucket/shards")


def test_local_writes_fsync_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """Atomic local writes (manifest parts, outputs): the staged file's data reaches the disk before it is renamed
    over the final name, and the directory entry after, so a power loss leaves the old file or the whole new one.
    The real os calls run; the test records which file each fsync was on (from /proc/self/fd) and the order."""
    calls = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        calls.append(("replace", str(dst)))
        return real_replace(src, dst, **kw)

    def link(src, dst, **kw):
        calls.append(("link", str(dst)))
        return real_link(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    target = tmp_path / "out" / "part-000.parquet"
    storage.write_bytes(str(target), b"v1")
    storage.write_bytes(str(target), b"v2")
    storage.write_bytes(str(tmp_path / "out" / "lease.json"), b"{}", if_absent=True)
    monkeypatch.undo()
    assert target.read_bytes() == b"v2"
    directory = str(tmp_path / "out")
    for final, op in ((str(target), "replace"), (str(target), "replace"), (directory + "/lease.json", "link")):
        data_sync, rename, dir_sync = calls[:3]
        del calls[:3]
        assert data_sync[0] == "fsync" and os.path.dirname(data_sync[1]) == directory and data_sync[1] != final
        assert rename == (op, final)
        assert dir_sync == ("fsync", directory)
    assert calls == [] and not [p for p in os.listdir(directory) if p.startswith(".")]  # no staged file left
