"""Issue 17, smaller items: local storage does not follow symlinks out of the input or output root; sidecars are
carried only with an allowed name/extension; names with control characters (newline, RTL override) are refused and
appear escaped in the manifest and the logs. Through the real CLI, against the S3 server and local folders."""
from __future__ import annotations

import os


from genray import storage

from helpers import genray, random_png, read_manifest_table, tar_bytes


def test_local_symlinks_never_lead_reads_or_writes_outside_the_roots(ray_local, sr_model_uri, tmp_path):
    inputs, out, secret, elsewhere = (tmp_path / n for n in ("in", "out", "secret", "elsewhere"))
    for d in (inputs / "sub", out, secret, elsewhere):
        d.mkdir(parents=True)
    (inputs / "a.png").write_bytes(random_png(0))
    (inputs / "sub" / "b.png").write_bytes(random_png(1))
    (inputs / "sub" / "deeper").mkdir()
    (inputs / "sub" / "deeper" / "c.png").write_bytes(random_png(3))  # its folder would be created through the link
    (secret / "secret.png").write_bytes(random_png(2))
    os.symlink(secret / "secret.png", inputs / "leak.png")  # a file symlink out of the input root
    os.symlink(secret, inputs / "linked")  # a folder symlink out of it
    os.symlink(elsewhere, out / "sub")  # the output's sub/ leads elsewhere
    r = genray("process", "superres", "--input", str(inputs), "--output", str(out), "--model", sr_model_uri,
               "--address", ray_local.get_runtime_context().gcs_address)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["input_key"]: row for row in read_manifest_table(str(out)).to_pylist()}
    assert set(rows) == {"a.png", "sub/b.png", "sub/deeper/c.png"}  # neither symlink out of the input was read
    assert rows["a.png"]["status"] == "ok"
    for key in ("sub/b.png", "sub/deeper/c.png"):
        assert rows[key]["status"] == "error" and "through a symbolic link" in rows[key]["error"]
    assert list(elsewhere.iterdir()) == []


def test_sidecar_allowlist_and_control_characters_through_the_cli(ray_local, sr_model_uri, s3_bucket):
    inputs, out = f"{s3_bucket}/in", f"{s3_bucket}/out"
    storage.write_bytes(f"{inputs}/pack.tar", tar_bytes([
        ("s0.png", random_png(0)), ("s0.json", b'{"caption": "zero"}'), ("s0.html", b"<script>"), ("s0.sh", b"rm -rf"),
        ("bad\nname.png", random_png(1)), ("rtl\u202egnp.png", random_png(2)),
    ]))
    storage.write_bytes(f"{inputs}/new\tline\u202egnp.png", random_png(3))  # (S3 servers refuse a newline in a key)
    storage.write_bytes(f"{inputs}/plain.png", random_png(4))
    r = genray("process", "superres", "--input", inputs, "--output", out, "--model", sr_model_uri,
               "--address", ray_local.get_runtime_context().gcs_address)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\u202e" not in r.stdout + r.stderr and "bad\nname" not in r.stdout + r.stderr
    rows = {row["input_key"]: row for row in read_manifest_table(out).to_pylist()}
    assert not any(c in key for key in rows for c in "\n\t\u202e")
    for key in ("pack.tar#bad\\x0aname.png", "pack.tar#rtl\\u202egnp.png", "new\\x09line\\u202egnp.png"):
        assert rows[key]["status"] == "error" and "control character" in rows[key]["error"], rows.get(key)
    assert rows["pack.tar#s0.png"]["status"] == "ok" and rows["plain.png"]["status"] == "ok"
    written = {o.key for o in storage.list_objects(out)}
    assert "pack.tar/s0.json" in written
    assert not {"pack.tar/s0.html", "pack.tar/s0.sh"} & written
