"""Planning a bulk job in bounded driver memory: the paged listing, the Arrow diff against the manifest, output keys
over a sorted listing, incremental compaction, quarantine of unreadable manifest files and --verify-outputs.
Local storage and the S3 server; no Ray (planning runs on the driver)."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.dataset as pds
import pytest

from genray import storage
from genray.config import ProcessConfig
from genray.process import job, manifest, read_stage

DIGEST = "sha256:" + "ab" * 32


def _touch(root, keys):
    for key in keys:
        path = os.path.join(root, *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x")


def _cfg(inputs, output, **kw) -> ProcessConfig:
    return ProcessConfig(task="denoise", input_uri=str(inputs), output_uri=str(output), model_uri="unused", **kw)


def _ok_rows(objects, digest=DIGEST, out=lambda k: k):
    return [{"input_key": o.key, "output_key": out(o.key), "status": "ok", "error": None, "input_etag": o.etag,
             "model_digest": digest, "width": 1, "height": 1, "seconds": 0.0, "node_id": "n"} for o in objects]


def _dataset_rows(output) -> list[dict]:
    return pds.dataset(os.path.join(str(output), "_manifest"), format="parquet").to_table().to_pylist()


def _todo_keys(work: job.Plan) -> list[str]:
    return [k for table in work.todo for k in table.column("input_key").to_pylist()]


def test_local_listing_pages_are_in_key_order(tmp_path):
    keys = ["a/b.jpg", "a/b/c.jpg", "a/b0.jpg", "a.png", "z.png", "a/b.c/d.png"]
    _touch(tmp_path, keys)
    pages = list(storage.iter_object_pages(str(tmp_path), page_size=2))
    assert [len(p) for p in pages] == [2, 2, 2]
    assert [o.key for p in pages for o in p] == sorted(keys)  # the order S3 lists in


def test_output_keys_over_a_sorted_listing_match_a_global_taken_set():
    # Colliding names with folders sorting between them ('a/b.c/...' lies between 'a/b.a.jpg' and 'a/b.jpg').
    keys = sorted(["a/b.jpg", "a/b.png", "a/b.jpg.jpeg", "a/b.a.jpg", "a/b.c/x.jpg", "a/b.c/x.png", "a/.png",
                   "a/.png.jpg", "b.tif", "b.png", "c/d.jpeg"] + [f"m/{i:04d}.jpg" for i in range(1000)])
    taken: set[str] = set()
    want = [manifest.output_key_for(k, taken) for k in keys]
    streamed = job._OutputKeys()
    got = [streamed(k) for k in keys]
    assert got == want and len(set(got)) == len(got)
    assert len(streamed.groups) <= 256  # groups the listing has left are forgotten


def test_rerun_diff_skips_done_redoes_changed_and_new(tmp_path):
    inputs, output = tmp_path / "in", tmp_path / "out"
    _touch(inputs, [f"d{i // 10}/img{i:03d}.jpg" for i in range(50)])
    objs = storage.list_objects(str(inputs))
    out = lambda k: k[:-4] + ".png"  # noqa: E731
    manifest.write_part(str(output), manifest.new_run_id(), 0, _ok_rows(objs[:40], out=out))
    rows = _ok_rows(objs[40:45], out=out)
    rows[0]["status"] = "error"  # redone
    rows[1]["input_etag"] = "changed"  # redone
    rows[2]["model_digest"] = "sha256:other"  # redone
    rows[3]["output_key"] = "elsewhere.png"  # not where this run would write: redone
    manifest.write_part(str(output), manifest.new_run_id(), 0, rows)
    work = job.plan(_cfg(inputs, output, batch_size=2), DIGEST)
    assert work.num_skipped == 41 and work.num_todo == 9
    assert _todo_keys(work) == [o.key for o in objs[40:44]] + [o.key for o in objs[45:]]
    assert all(t.num_rows <= 8 for t in work.todo)  # blocks of BLOCK_BATCHES batches
    table = work.todo[0]
    assert table.column("output_key")[0].as_py() == objs[40].key[:-4] + ".png"
    assert table.column("input_uri")[0].as_py() == objs[40].uri


def test_tar_rows_are_done_in_any_shard(tmp_path):
    inputs, output = tmp_path / "in", tmp_path / "out"
    _touch(inputs, ["a.png", "b.png", "c.png"])
    objs = storage.list_objects(str(inputs))
    rows = _ok_rows(objs, out=lambda k: f"shard-000003.tar#{k}")
    rows[2]["output_key"] = "c.png"  # a files-output row: not done for a tar run
    manifest.write_part(str(output), manifest.new_run_id(), 0, rows)
    work = job.plan(_cfg(inputs, output, output_format="tar"), DIGEST)
    assert work.num_skipped == 2 and _todo_keys(work) == ["c.png"]


def test_compaction_rewrites_only_what_a_run_touched(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "SEGMENT_ROWS", 100)
    output = str(tmp_path / "out")
    row = lambda k, status="ok": {"input_key": k, "output_key": k, "status": status, "input_etag": "e",  # noqa
                                  "model_digest": DIGEST}
    run = manifest.new_run_id()
    manifest.write_part(output, run, 0, [row(f"k{i:04d}") for i in range(250)])
    manifest.compact(output, run, log=lambda _: None)
    files = {f.key: os.stat(f.uri).st_mtime_ns for f in storage.list_objects(f"{output}/_manifest")}
    assert len(files) == 3  # 100 + 100 + 50 rows, sorted by key
    # Ten new inputs: one new segment, nothing rewritten.
    run2 = manifest.new_run_id()
    manifest.write_part(output, run2, 0, [row(f"n{i:02d}") for i in range(10)])
    manifest.compact(output, run2, log=lambda _: None)
    after = {f.key: os.stat(f.uri).st_mtime_ns for f in storage.list_objects(f"{output}/_manifest")}
    assert {k: v for k, v in after.items() if k in files} == files and len(after) == 4
    # One input recorded again: only the segment that held it drops its old row.
    run3 = manifest.new_run_id()
    manifest.write_part(output, run3, 0, [row("k0150", "error")])
    manifest.compact(output, run3, log=lambda _: None)
    changed = [k for k, v in {f.key: os.stat(f.uri).st_mtime_ns
                              for f in storage.list_objects(f"{output}/_manifest")}.items()
               if k in files and files[k] != v]
    assert len(changed) == 1
    rows = _dataset_rows(output)  # users' view: one row per input
    assert len(rows) == 260 == len({r["input_key"] for r in rows})
    assert {r["status"] for r in rows if r["input_key"] == "k0150"} == {"error"}
    # Many small reruns: their segments are merged once there are more than MAX_SMALL_SEGMENTS.
    for i in range(manifest.MAX_SMALL_SEGMENTS + 1):
        r = manifest.new_run_id()
        manifest.write_part(output, r, 0, [row(f"s{i:02d}")])
        manifest.compact(output, r, log=lambda _: None)
    names = [f.key for f in storage.list_objects(f"{output}/_manifest")]
    assert len(names) <= 3 + manifest.MAX_SMALL_SEGMENTS and any(n.endswith("-merged.parquet") for n in names)
    assert len(_dataset_rows(output)) == 260 + manifest.MAX_SMALL_SEGMENTS + 1


@pytest.mark.parametrize("bad", [b"", b"PAR1 not parquet at all"])
def test_unreadable_manifest_part_is_quarantined_and_its_inputs_redone(tmp_path, bad):
    inputs, output = tmp_path / "in", tmp_path / "out"
    _touch(inputs, ["a.png", "b.png", "c.png"])
    objs = storage.list_objects(str(inputs))
    run = manifest.new_run_id()
    manifest.write_part(str(output), run, 0, _ok_rows(objs[:2]))
    bad_part = output / "_manifest" / f"part-{run}-00001.parquet"
    bad_part.write_bytes(bad)  # e.g. c.png's row, lost in a crash while the file was written
    lines: list[str] = []
    dry = job.plan(_cfg(inputs, output, dry_run=True), DIGEST, log=lines.append)
    assert bad_part.exists() and any("cannot be read" in line for line in lines)  # a dry run moves nothing
    assert dry.num_skipped == 2 and _todo_keys(dry) == ["c.png"]
    lines.clear()
    work = job.plan(_cfg(inputs, output), DIGEST, log=lines.append)
    assert work.num_skipped == 2 and _todo_keys(work) == ["c.png"]
    assert not bad_part.exists() and (output / "_manifest" / "_quarantine" / bad_part.name).read_bytes() == bad
    assert any("quarantined" in line and bad_part.name in line for line in lines)
    assert len(_dataset_rows(output)) == 2  # pyarrow.dataset skips the _quarantine folder


def test_verify_outputs_redoes_rows_whose_output_is_gone(tmp_path, s3_bucket):
    inputs, output = str(tmp_path / "in"), f"{s3_bucket}/verify-out"
    _touch(inputs, ["a.png", "b.png", "c.png"])
    objs = storage.list_objects(inputs)
    manifest.write_part(output, manifest.new_run_id(), 0, _ok_rows(objs))
    for key in ("a.png", "c.png"):  # b.png's output was removed by a lifecycle rule
        storage.write_bytes(f"{output}/{key}", b"png")
    assert job.plan(_cfg(inputs, output), DIGEST).num_skipped == 3  # trusted by default
    work = job.plan(_cfg(inputs, output, verify_outputs=True), DIGEST)
    assert work.num_skipped == 2 and _todo_keys(work) == ["b.png"]


def test_archive_planning_leaves_the_driver_as_arrow_unit_tables(tmp_path):
    # x.tar's members lie between 'x.tar' and 'x.tar.gz' ('#' < '$' < '.'): each archive gets only its own slice.
    inputs, output = tmp_path / "in", tmp_path / "out"
    _touch(inputs, ["a.png", "x.tar", "x.tar.gz", "y.tar", "z.tar"])
    objs = {o.key: o for o in storage.list_objects(str(inputs))}

    def row(key, archive, status="ok", **kw):
        out = None if "#" not in key else f"{archive}/{key.split('#', 1)[1]}"
        return {"input_key": key, "output_key": out, "status": status, "error": None,
                "input_etag": objs[archive].etag, "model_digest": DIGEST, "width": 1, "height": 1, "seconds": 0.5,
                "node_id": "n", **kw}

    rows = [row("a.png", "a.png", output_key="a.png"),
            row("x.tar", "x.tar"), row("x.tar#m1.png", "x.tar"), row("x.tar#m2.png", "x.tar", input_etag="old"),
            row("y.tar", "y.tar"), row("y.tar#n1.png", "y.tar"), row("y.tar#n2.png", "y.tar"),
            row("z.tar", "z.tar", "error", error=manifest.WORKER_DIED_READING)]
    manifest.write_part(str(output), manifest.new_run_id(), 0, rows)
    work = job.plan(_cfg(inputs, output), DIGEST)
    # a.png and y.tar's two members skipped, y.tar read in full before; z.tar killed its read workers.
    assert (work.num_todo, work.num_skipped, work.num_archives_done, work.num_died) == (0, 3, 1, 1)
    # What is left to read leaves plan() as one-row Arrow tables (a real run puts each in the object store and
    # keeps its ObjectRef): no dict per member on the driver.
    assert all(isinstance(t, pa.Table) and t.schema == read_stage.UNIT_SCHEMA and t.num_rows == 1
               for t in work.units)
    units = {json.loads(t.column("unit")[0].as_py())["key"]: t for t in work.units}
    assert set(units) == {"x.tar", "x.tar.gz"}
    # The read task decodes its archive's done rows (all manifest columns: a skipped member's row is kept whole).
    done = read_stage.decode_done(units["x.tar"].column("done")[0].as_py())
    assert list(done) == ["x.tar#m1.png"] and done["x.tar#m1.png"] == rows[2]
    assert units["x.tar.gz"].column("done")[0].as_py() is None
    assert json.loads(units["x.tar"].column("unit")[0].as_py())["num_done"] == 1
    # The dry run names them, from the unit tables.
    lines: list[str] = []
    job._run_process_job(_cfg(inputs, output, dry_run=True), lines.append, None, None, {"digest": DIGEST})
    assert "  would read archive x.tar (1 bytes, 1 members done)" in lines
    assert "  would read archive x.tar.gz (1 bytes, 0 members done)" in lines
    # --retry-errors: z.tar is read again.
    again = job.plan(_cfg(inputs, output, retry_errors=True), DIGEST)
    assert {json.loads(t.column("unit")[0].as_py())["key"] for t in again.units} == {"x.tar", "x.tar.gz", "z.tar"}
    assert again.num_died == 0


def test_output_keys_by_page_match_output_key_for_one_by_one():
    # Random names over an alphabet that hits every path: collisions, folders named like archives (any case),
    # marks, '#'/'%', spaces, dots at either end; pages cut anywhere.
    import random

    rng = random.Random(7)
    parts = ["a", "b", "B", ".", "..", "~", "#", "%23", " ", "-", "x.tar", "y.TGZ", "z.zip", "é", "c.d"]
    suffixes = [".png", ".jpg", ".JPEG", ".png.jpg", ".tif"]  # what the listing gives: images
    keys = set()
    while len(keys) < 3000:
        folders = ["".join(rng.choices(parts, k=rng.randint(1, 3))) for _ in range(rng.randint(0, 2))]
        name = "".join(rng.choices(parts, k=rng.randint(1, 3))) + rng.choice(suffixes)
        keys.add("/".join(folders + [name]))
    keys = sorted(keys)
    one_by_one = job._OutputKeys()
    want = [one_by_one(k) for k in keys]
    streamed, got, i = job._OutputKeys(), [], 0
    while i < len(keys):
        page = keys[i:i + rng.randint(1, 50)]
        outs, slow = streamed.page(page, pa.array(page, pa.string()))
        got += outs
        # A key off the slow path is plain, in and out: no escaping, no storage check needed.
        assert all(job._plain_key(page[j]) and job._plain_key(outs[j]) for j in range(len(page)) if j not in slow)
        i += len(page)
    assert got == want
    # ... which is output_key_for over the whole listing, '.' and '..' segments included: every input has its own
    # output, also once storage.join_uri has made it a URI (it drops '' and '.' segments, which is why output keys
    # mark them: ' /./a.png' and ' /a.png' once both wrote ' /a.png'), or is refused ('..': an error row).
    taken: set[str] = set()
    assert got == [manifest.output_key_for(k, taken) for k in keys]
    kept = [out for out in got if ".." not in out.split("/")]
    assert 0 < len(kept) < len(keys)
    assert len({storage.join_uri("s3://b/out", out) for out in kept}) == len(kept)
    for out in set(got) - set(kept):
        with pytest.raises(storage.UnsafeKeyError, match="'..'"):
            storage.join_uri("s3://b/out", out)
    assert len(streamed.groups) <= 100  # groups the listing has left are forgotten
