"""Image archives as bulk-job inputs and outputs: tar / tar.gz / zip files and WebDataset shards in the real S3
server, read by real Ray Data jobs; tar output shards read back with Python's tarfile; a crash mid-shard resumed;
tar-slip and truncated archives as error rows with nothing written outside the output prefix."""
from __future__ import annotations

import gzip
import io
import sys
import tarfile
import time
import zipfile

import pytest
import ray

from genray import archives, storage
from genray.process.job import JobError, ProcessImages, run_process_job
from genray.config import ProcessConfig
from genray.datasets import export_dataset
from genray.images import decode_image

from helpers import genray, random_png, read_manifest_table, tar_bytes

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FailAt below runs in Ray's workers


def _zip(entries: list[tuple[str, bytes]], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16  # a Unix symlink, as `zip --symlinks` stores it
            zf.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _cut_inside(data: bytes, member: str, into: int) -> bytes:
    """A tar cut `into` bytes into `member`'s data."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data[:tar.getmember(member).offset_data + into]


def _members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.name for m in tar.getmembers()]


def _rows(output_uri: str) -> dict[str, dict]:
    return {r["input_key"]: r for r in read_manifest_table(output_uri).to_pylist()}


def _sr_config(input_uri: str, output_uri: str, sr_model_uri: str, **update) -> ProcessConfig:
    return ProcessConfig(task="superres", input_uri=input_uri, output_uri=output_uri, model_uri=sr_model_uri,
                         batch_size=2, **update)


# --- the archive layer on its own ---------------------------------------------------------------------------

def test_brace_patterns():
    assert archives.expand_braces("s/shard-{000000..000002}.tar") == [
        "s/shard-000000.tar", "s/shard-000001.tar", "s/shard-000002.tar"]
    assert archives.expand_braces("{a,b}-{8..10}.zip") == ["a-8.zip", "a-9.zip", "a-10.zip",
                                                          "b-8.zip", "b-9.zip", "b-10.zip"]
    assert archives.expand_braces("x{3..1}.tar") == ["x3.tar", "x2.tar", "x1.tar"]
    with pytest.raises(ValueError, match="neither a range"):
        archives.expand_braces("x{abc}.tar")
    with pytest.raises(ValueError, match="more than"):
        archives.expand_braces("{0..999}{0..9999}.tar")
    assert archives.split_member_key("a/x.tar.gz#m/b.jpg") == ("a/x.tar.gz", "m/b.jpg")
    assert archives.split_member_key("a.tar/x.zip#b#c.png") == ("a.tar/x.zip", "b#c.png")
    assert archives.split_member_key("plain/b.png") is None


def test_unsafe_entries_are_refused_and_named(tmp_path):
    entries = [("ok.png", random_png(0)), ("../up.png", random_png(1)), ("/etc/abs.png", random_png(2)), ("LINK:link.png", b""),
               ("HARD:hard.png", b""), ("DEV:dev", b""), ("FIFO:fifo", b""), ("./sub//fine.png", random_png(3))]
    (tmp_path / "a.tar").write_bytes(tar_bytes(entries))
    got = {m.name: m.error for m in archives.read_members(str(tmp_path / "a.tar"), 1 << 20)}
    assert got["ok.png"] is None and got["sub/fine.png"] is None
    assert "'..'" in got["../up.png"] and "absolute" in got["/etc/abs.png"]
    assert "symbolic link" in got["link.png"] and "hard link" in got["hard.png"]
    assert "character device" in got["dev"] and "FIFO" in got["fifo"]

    (tmp_path / "a.zip").write_bytes(_zip([("k/a.png", random_png(4)), ("../z.png", random_png(5))], symlink="k/l.png"))
    got = {m.name: m.error for m in archives.read_members(str(tmp_path / "a.zip"), 1 << 20)}
    assert got["k/a.png"] is None and "'..'" in got["../z.png"] and "symbolic link" in got["k/l.png"]


def test_truncated_archives_raise_after_what_they_could_read(tmp_path):
    whole = tar_bytes([(f"{i}.png", random_png(i, 40)) for i in range(3)])
    cases = {"mid-member.tar": _cut_inside(whole, "1.png", 100), "at-a-header.tar": whole[:512],
             "cut.tar.gz": gzip.compress(whole)[:-200], "cut.zip": _zip([("a.png", random_png(0))])[:-10]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        seen = []
        with pytest.raises(archives.ArchiveError, match="truncated"):
            for member in archives.read_members(str(tmp_path / name), 1 << 20):
                seen.append((member.name, member.error))
        if name == "mid-member.tar":  # the first member whole, the second cut short: an error of its own
            assert seen[0] == ("0.png", None) and seen[1][0] == "1.png" and "truncated member" in seen[1][1]
    assert [m.name for m in archives.read_members(_write(tmp_path, "whole.tar", whole), 1 << 20)] == \
        ["0.png", "1.png", "2.png"]


def _write(tmp_path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


def test_shard_writer_by_count_and_bytes_round_trips(s3_bucket):
    prefix = f"{s3_bucket}/shards"
    writer = archives.ShardWriter(prefix, max_samples=3)
    committed = []
    for i in range(7):
        committed += writer.add([(f"k/{i}.png", random_png(i)), (f"k/{i}.json", b"{}")], i)
    # Two shards are committed as they fill; the third only on close: nothing partial is ever visible.
    assert [o.key for o in storage.list_objects(prefix)] == ["shard-000000.tar", "shard-000001.tar"]
    committed += writer.close()
    assert committed == [(f"shard-{i // 3:06d}.tar", i) for i in range(7)]
    assert _members(storage.read_bytes(f"{prefix}/shard-000002.tar")) == ["k/6.png", "k/6.json"]
    assert _members(storage.read_bytes(f"{prefix}/shard-000000.tar")) == [
        f"k/{i}.{ext}" for i in range(3) for ext in ("png", "json")]

    # By bytes: a shard closes before a sample would take it past the limit; numbering goes on after the last.
    big = archives.ShardWriter(prefix, max_samples=100, max_bytes=5000)
    assert big.index == 3
    for i in range(4):
        big.add([(f"b/{i}.bin", bytes(1500))])
    big.close()
    sizes = [len(_members(storage.read_bytes(uri))) for uri in big.written]
    assert sizes == [2, 2] and all(o.size <= 5000 + 10240 for o in storage.list_objects(prefix))


def test_data_export_and_process_tar_shards_through_the_cli(ray_local, sr_model_uri, s3_bucket):
    r = genray("data", "export", "faces", "--to", f"{s3_bucket}/faces", "--split", "test", "--format", "tar",
               "--shard-size", "16")
    assert r.returncode == 0, r.stderr
    files_uri = f"{s3_bucket}/faces-files"
    keys = [storage.relative_key(files_uri, uri) for uri in export_dataset("faces", files_uri, split="test")]
    shards = storage.list_objects(f"{s3_bucket}/faces")
    assert [o.key for o in shards] == [f"shard-{i:06d}.tar" for i in range(-(-len(keys) // 16))]
    names = [name for o in shards for name in _members(storage.read_bytes(o.uri))]
    assert names == keys  # faces have no labels: no sidecars
    first = tarfile.open(fileobj=io.BytesIO(storage.read_bytes(shards[0].uri))).extractfile(keys[0]).read()
    assert first == storage.read_bytes(f"{files_uri}/{keys[0]}")

    # The exported shards through `genray process` (joining the session's Ray), tar shards out.
    pattern = f"{s3_bucket}/faces/shard-{{000000..{len(shards) - 1:06d}}}.tar"
    r = genray("process", "superres", "--input", pattern, "--output", f"{s3_bucket}/x4", "--model", sr_model_uri,
               "--output-format", "tar", "--shard-size", "32", "--batch-size", "4",
               "--address", ray_local.get_runtime_context().gcs_address)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{'ok':<8} {len(keys):>7}" in r.stdout
    out = [o for o in storage.list_objects(f"{s3_bucket}/x4") if o.key.endswith(".tar")]
    assert [o.key for o in out] == [f"shard-{i:06d}.tar" for i in range(-(-len(keys) // 32))]
    assert sorted(name for o in out for name in _members(storage.read_bytes(o.uri))) == sorted(
        f"shard-{i // 16:06d}.tar/{key}" for i, key in enumerate(keys))


# --- bulk jobs over archives -----------------------------------------------------------------------------------

def test_tar_tgz_and_zip_inputs_with_sidecars(ray_local, sr_model_uri, s3_bucket):
    inputs = f"{s3_bucket}/in"
    images = {f"s{i}.png": random_png(i) for i in range(3)}
    sample = [("s0.png", images["s0.png"]), ("s0.json", b'{"caption": "zero"}'), ("s1.png", images["s1.png"]),
              ("s1.txt", b"one"), ("s2.png", images["s2.png"]), ("readme.md", b"not an image")]
    storage.write_bytes(f"{inputs}/a.tar", tar_bytes(sample))
    storage.write_bytes(f"{inputs}/sub/b.tar.gz", tar_bytes(sample, mode="w:gz"))
    storage.write_bytes(f"{inputs}/c.zip", _zip(sample))
    storage.write_bytes(f"{inputs}/loose.png", random_png(9))
    out = f"{s3_bucket}/out"
    cfg = _sr_config(inputs, out, sr_model_uri)
    summary = run_process_job(cfg)
    assert summary.counts == {"ok": 10, "skipped": 0, "error": 0}

    rows = _rows(out)
    archive_keys = ("a.tar", "sub/b.tar.gz", "c.zip")
    assert set(rows) == {"loose.png", *archive_keys} | {f"{a}#{k}" for a in archive_keys for k in images}
    assert all(rows[a]["status"] == "ok" and rows[a]["output_key"] is None for a in archive_keys)
    for archive in archive_keys:
        etag = next(o.etag for o in storage.list_objects(inputs) if o.key == archive)
        for key, png in images.items():
            row = rows[f"{archive}#{key}"]
            assert row["output_key"] == f"{archive}/{key}" and row["input_etag"] == etag
            assert (row["width"], row["height"]) == (12, 12)
            assert decode_image(storage.read_bytes(f"{out}/{archive}/{key}")).shape == (48, 48, 3)
        # WebDataset sidecars keep their key beside the output; other non-image members are ignored.
        assert storage.read_bytes(f"{out}/{archive}/s0.json") == b'{"caption": "zero"}'
        assert storage.read_bytes(f"{out}/{archive}/s1.txt") == b"one"
        assert not storage.exists(f"{out}/{archive}/readme.md")

    # Rerun: every archive was read in full and all its members are done, so none is even opened.
    lines = []
    assert run_process_job(cfg.model_copy(update={"dry_run": True}), log=lines.append).counts["skipped"] == 10
    assert not any("would read archive" in line for line in lines)
    assert run_process_job(cfg).counts == {"ok": 0, "skipped": 10, "error": 0}
    # A single archive as the input: its members' keys start with its name.
    single = run_process_job(_sr_config(f"{inputs}/sub/b.tar.gz", f"{s3_bucket}/single", sr_model_uri))
    assert single.counts == {"ok": 3, "skipped": 0, "error": 0}
    assert set(_rows(f"{s3_bucket}/single")) == {"b.tar.gz", *(f"b.tar.gz#{k}" for k in images)}


def test_brace_pattern_over_shards_to_tar_output_shards(ray_local, sr_model_uri, s3_bucket):
    shards = f"{s3_bucket}/shards"
    writer = archives.ShardWriter(shards, max_samples=4)
    expected = []
    for i in range(10):  # 3 input shards: 4 + 4 + 2 samples, each an image and its .json
        writer.add([(f"k{i:02d}.png", random_png(i)), (f"k{i:02d}.json", f'{{"i": {i}}}'.encode())])
        expected.append(f"shard-{i // 4:06d}.tar/k{i:02d}")
    writer.close()
    out = f"{s3_bucket}/out"
    cfg = _sr_config(f"{shards}/shard-{{000000..000003}}.tar", out, sr_model_uri, output_format="tar",
                     shard_size=3, concurrency=2, cpus_per_actor=0.5)
    summary = run_process_job(cfg)
    assert summary.counts == {"ok": 10, "skipped": 0, "error": 1}  # shard-000003.tar does not exist
    rows = _rows(out)
    assert rows["shard-000003.tar"]["status"] == "error" and "no such object" in rows["shard-000003.tar"]["error"]

    # Output shards of 3 samples (the last one 1), read back with tarfile: an image and its sidecar per sample.
    written = [o for o in storage.list_objects(out) if not o.key.startswith("_manifest/")]
    assert [o.key for o in written] == [f"shard-{i:06d}.tar" for i in range(4)]
    members = {o.key: _members(storage.read_bytes(o.uri)) for o in written}
    assert [len(m) for m in members.values()] == [6, 6, 6, 2]
    assert sorted(name for m in members.values() for name in m) == sorted(
        f"{key}.{ext}" for key in expected for ext in ("png", "json"))
    for key in expected:  # each manifest row names the shard that holds its output
        row = rows[key.replace(".tar/", ".tar#") + ".png"]
        shard, _, member = row["output_key"].partition("#")
        assert row["status"] == "ok" and member == f"{key}.png" and member in members[shard]
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(f"{out}/{shard}"))) as tar:
            assert decode_image(tar.extractfile(member).read()).shape == (48, 48, 3)
            assert tar.extractfile(f"{key}.json").read() == f'{{"i": {int(key[-2:])}}}'.encode()

    # Rerun: nothing new, no new shard.
    assert run_process_job(cfg).counts == {"ok": 0, "skipped": 10, "error": 1}
    assert len([o for o in storage.list_objects(out) if o.key.endswith(".tar")]) == 4


class FailAt(ProcessImages):
    """Fails the job (an exception, not a worker crash Ray Data would retry) at the batch holding `victim`, once
    the driver has committed the first output shard (a failing job drops the rows it has not consumed yet)."""

    victim = ""

    def __call__(self, batch):
        if self.victim in list(batch["input_key"]):
            deadline = time.monotonic() + 60
            while not storage.exists(f"{self.cfg.output_uri}/shard-000000.tar") and time.monotonic() < deadline:
                time.sleep(0.2)
            raise RuntimeError("injected failure")
        return super().__call__(batch)


def test_tar_output_resumes_after_a_crash_mid_shard(ray_local, sr_model_uri, s3_bucket):
    keys = [f"img{i:02d}.png" for i in range(12)]
    storage.write_bytes(f"{s3_bucket}/in/in.tar", tar_bytes([(k, random_png(i)) for i, k in enumerate(keys)]))
    out = f"{s3_bucket}/out"
    cfg = _sr_config(f"{s3_bucket}/in/in.tar", out, sr_model_uri, output_format="tar", shard_size=4)
    FailAt.victim = "in.tar#img10.png"
    with pytest.raises(JobError, match="rerun the same command"):
        run_process_job(cfg, udf=FailAt)

    def shards() -> dict[str, list[str]]:
        return {o.key: _members(storage.read_bytes(o.uri)) for o in storage.list_objects(out)
                if not o.key.startswith("_manifest/")}

    first = shards()
    rows = _rows(out)
    # Only whole shards exist, and the manifest has exactly their images: the shard being filled was dropped.
    assert first and all(len(members) == 4 for members in first.values())
    assert sorted(r["output_key"] for r in rows.values() if r["status"] == "ok") == sorted(
        f"{shard}#{m}" for shard, members in first.items() for m in members)
    assert "in.tar" not in rows  # not every member is in: the archive is not recorded as read in full
    done_before = len(rows)

    summary = run_process_job(cfg)
    assert summary.counts == {"ok": 12 - done_before, "skipped": done_before, "error": 0}
    final = shards()
    assert {k: v for k, v in final.items() if k in first} == first  # committed shards are never rewritten
    assert sorted(m for members in final.values() for m in members) == [f"in.tar/{k}" for k in keys]  # once each
    rows = _rows(out)
    assert rows["in.tar"]["status"] == "ok"
    assert all(rows[f"in.tar#{k}"]["output_key"].partition("#")[2] == f"in.tar/{k}" for k in keys)


def test_tar_slip_and_truncated_archives_are_error_rows(ray_local, sr_model_uri, s3_bucket, tmp_path):
    inputs = f"{s3_bucket}/in"
    evil = [("good.png", random_png(0)), ("../../escape.png", random_png(1)), ("/tmp/abs.png", random_png(2)),
            ("LINK:link.png", b""), ("HARD:hard.png", b""), ("DEV:null", b""), ("corrupt.png", b"\x89PNG broken"),
            ("a/../../up.png", random_png(3))]
    storage.write_bytes(f"{inputs}/evil.tar", tar_bytes(evil))
    storage.write_bytes(f"{inputs}/evil.zip", _zip([("good.png", random_png(4)), ("../zip-escape.png", random_png(5))],
                                                   symlink="zlink.png"))
    whole = tar_bytes([(f"t{i}.png", random_png(10 + i, 40)) for i in range(4)])
    storage.write_bytes(f"{inputs}/truncated.tar", _cut_inside(whole, "t2.png", 1000))
    storage.write_bytes(f"{inputs}/fine.png", random_png(20))

    out = tmp_path / "out"  # a local output: anything escaping it would land in tmp_path, or above
    summary = run_process_job(_sr_config(inputs, str(out), sr_model_uri))
    rows = _rows(str(out))
    ok = {k for k, r in rows.items() if r["status"] == "ok" and r["output_key"]}
    assert ok == {"fine.png", "evil.tar#good.png", "evil.zip#good.png", "truncated.tar#t0.png",
                  "truncated.tar#t1.png"}
    errors = {k: r["error"] for k, r in rows.items() if r["status"] == "error"}
    assert "'..'" in errors["evil.tar#../../escape.png"] and "'..'" in errors["evil.tar#a/../../up.png"]
    assert "absolute" in errors["evil.tar#/tmp/abs.png"]
    assert "symbolic link" in errors["evil.tar#link.png"] and "hard link" in errors["evil.tar#hard.png"]
    assert "device" in errors["evil.tar#null"] and "symbolic link" in errors["evil.zip#zlink.png"]
    assert "'..'" in errors["evil.zip#../zip-escape.png"]
    assert "not an image" in errors["evil.tar#corrupt.png"]
    assert "truncated member" in errors["truncated.tar#t2.png"]  # cut inside its data
    assert "truncated" in errors["truncated.tar"]  # the archive's own row: what could not be read
    assert summary.counts == {"ok": 5, "skipped": 0, "error": len(errors)}

    # Nothing outside the output prefix: locally, and in the bucket (only the inputs are there).
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.startswith("out/") for p in written), written
    assert sorted(p for p in written if not p.startswith("out/_manifest/")) == [
        "out/evil.tar/good.png", "out/evil.zip/good.png", "out/fine.png", "out/truncated.tar/t0.png",
        "out/truncated.tar/t1.png"]
    assert all(o.key.startswith("in/") for o in storage.list_objects(s3_bucket))

    # The same archives into tar output: the shard holds only the good members.
    tar_out = f"{s3_bucket}/tar-out"
    run_process_job(_sr_config(inputs, tar_out, sr_model_uri, output_format="tar"))
    (shard,) = [o for o in storage.list_objects(tar_out) if o.key.endswith(".tar")]
    assert sorted(_members(storage.read_bytes(shard.uri))) == sorted(
        k.replace(".tar#", ".tar/").replace(".zip#", ".zip/") for k in ok)
