"""genray.storage against a real moto S3 server on 127.0.0.1 and against local directories."""
import os
import socket
import time

import boto3
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from genray import storage
from genray.s3server import LocalS3Server
from genray.storage import StorageError, UnsafeKeyError


@pytest.fixture(params=["s3", "local", "file"])
def root(request, tmp_path):
    """A writable prefix of each kind: s3://bucket/prefix, a plain local path, a file:// URI."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/some/prefix"
    if request.param == "local":
        return str(tmp_path / "store")
    return "file://" + str(tmp_path / "store")


def _assert_one_line_naming(err: Exception, uri: str) -> None:
    text = str(err)
    assert uri in text
    assert "\n" not in text
    assert "Traceback" not in text
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if secret:
        assert secret not in text


# ------------------------------------------------------------------------------------------- keys

@pytest.mark.parametrize("base", ["s3://bucket/prefix", "s3://bucket/prefix/", "/data/out", "rel/out/"])
@pytest.mark.parametrize("bad", ["..", "../x", "a/../../b", "a/..", "/abs", "/", "a\\b", "..\\x", "a\x00b", "", "./"])
def test_join_uri_refuses_unsafe_keys(base, bad):
    with pytest.raises(UnsafeKeyError) as info:
        storage.join_uri(base, "ok", bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("base, parts, expected", [
    ("s3://b/p", ("a/b.jpg",), "s3://b/p/a/b.jpg"),
    ("s3://b/p/", ("a", "b.jpg"), "s3://b/p/a/b.jpg"),
    ("s3://b", ("k",), "s3://b/k"),
    ("s3://b/", ("./a//b/",), "s3://b/a/b"),
    ("/data/out/", ("x.png",), "/data/out/x.png"),
    ("file:///data/out", ("a/x.png",), "file:///data/out/a/x.png"),
    ("rel", ("a..b", "..c"), "rel/a..b/..c"),  # dots inside a name are not traversal
])
def test_join_uri_and_relative_key_are_inverse(base, parts, expected):
    uri = storage.join_uri(base, *parts)
    assert uri == expected
    segments = [seg for part in parts for seg in part.split("/") if seg not in ("", ".")]
    assert storage.relative_key(base, uri) == "/".join(segments)


def test_relative_key_refuses_outside_uris():
    with pytest.raises(StorageError):
        storage.relative_key("s3://b/p", "s3://b/p2/x")
    with pytest.raises(StorageError):
        storage.relative_key("s3://b/p", "s3://other/p/x")
    with pytest.raises(StorageError):
        storage.relative_key("/data/out", "/data/outside/x")


def test_is_s3():
    assert storage.is_s3("s3://b/k")
    assert not storage.is_s3("/tmp/x")
    assert not storage.is_s3("file:///tmp/x")


# -------------------------------------------------------------------------------------- round trips

def test_write_list_read_exists_delete_round_trip(root):
    files = {"b.jpg": b"jpeg", "a/x.PNG": b"png" * 100, "a/deeper/y.png": b"", "notes.txt": b"text"}
    for key, data in files.items():
        storage.write_bytes(storage.join_uri(root, key), data)

    listed = storage.list_objects(root)
    assert [o.key for o in listed] == sorted(files)
    for obj in listed:
        assert obj.uri == storage.join_uri(root, obj.key)
        assert obj.size == len(files[obj.key])
        assert obj.etag and '"' not in obj.etag
        assert storage.read_bytes(obj.uri) == files[obj.key]

    images = storage.list_objects(root, suffixes=(".png", ".JPG"))
    assert [o.key for o in images] == ["a/deeper/y.png", "a/x.PNG", "b.jpg"]
    assert [o.key for o in storage.list_objects(storage.join_uri(root, "a"))] == ["deeper/y.png", "x.PNG"]

    # Overwriting changes the etag, which is what "skip inputs already done" keys on.
    before = {o.key: o.etag for o in listed}["notes.txt"]
    storage.write_bytes(storage.join_uri(root, "notes.txt"), b"new text!")
    after = {o.key: o.etag for o in storage.list_objects(root)}["notes.txt"]
    assert after != before

    target = storage.join_uri(root, "a/x.PNG")
    assert storage.exists(target)
    assert storage.exists(storage.join_uri(root, "a"))  # a folder with objects in it
    storage.delete(target)
    storage.delete(target)  # missing is fine
    assert not storage.exists(target)
    assert not storage.exists(storage.join_uri(root, "nothing-here"))
    with pytest.raises(StorageError) as info:
        storage.read_bytes(target)
    assert "no such object" in str(info.value)
    _assert_one_line_naming(info.value, target)


def test_listing_a_missing_prefix_is_empty(root):
    assert storage.list_objects(storage.join_uri(root, "never/written")) == []


def test_s3_prefix_is_a_folder(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/p/in.png", b"1")
    storage.write_bytes(f"{s3_bucket}/p2/sibling.png", b"2")
    assert [o.key for o in storage.list_objects(f"{s3_bucket}/p")] == ["in.png"]
    assert [o.key for o in storage.list_objects(s3_bucket)] == ["p/in.png", "p2/sibling.png"]


def test_s3_etag_is_the_content_md5(s3_bucket):
    import hashlib

    storage.write_bytes(f"{s3_bucket}/k.bin", b"payload")
    (obj,) = storage.list_objects(s3_bucket)
    assert obj.etag == hashlib.md5(b"payload").hexdigest()


def test_local_write_is_atomic_and_hides_temp_files(tmp_path):
    uri = str(tmp_path / "deep" / "dir" / "out.png")
    storage.write_bytes(uri, b"data")
    assert open(uri, "rb").read() == b"data"
    assert os.listdir(tmp_path / "deep" / "dir") == ["out.png"]  # no temp file left behind
    # A temp file from a write in progress (or a killed writer) is never listed.
    (tmp_path / "deep" / "dir" / ".genray-tmp-0123456789abcdef").write_bytes(b"half")
    assert [o.key for o in storage.list_objects(str(tmp_path))] == ["deep/dir/out.png"]
    mode = os.stat(uri).st_mode & 0o777
    assert mode & 0o044, "written files should be readable as usual, not 0600"


def test_local_etag_format(tmp_path):
    storage.write_bytes(str(tmp_path / "f"), b"12345")
    (obj,) = storage.list_objects(str(tmp_path))
    st = os.stat(tmp_path / "f")
    assert obj.etag == f"{st.st_mtime_ns:x}-{st.st_size:x}"


@pytest.mark.parametrize("dest_kind", ["s3", "local"])
def test_upload_dir_download_dir_round_trip(dest_kind, tmp_path, request):
    src = tmp_path / "src"
    files = {"model.json": b"{}", "weights/state.pt": os.urandom(2048), "samples/e/0.png": b"png"}
    for key, data in files.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    if dest_kind == "s3":
        dest = request.getfixturevalue("s3_bucket") + "/runs/model"
    else:
        dest = str(tmp_path / "remote" / "model")

    storage.upload_dir(str(src), dest)
    assert [o.key for o in storage.list_objects(dest)] == sorted(files)

    back = tmp_path / "back"
    storage.download_dir(dest, str(back))
    for key, data in files.items():
        assert (back / key).read_bytes() == data
    assert sorted(str(p.relative_to(back)) for p in back.rglob("*") if p.is_file()) == sorted(files)


def test_download_dir_refuses_keys_that_escape(s3_bucket, tmp_path):
    bucket = s3_bucket[len("s3://"):]
    storage.s3_client().put_object(Bucket=bucket, Key="m/../../escape.txt", Body=b"x")
    keys = [o.key for o in storage.list_objects(f"{s3_bucket}/m")]
    if keys != ["../../escape.txt"]:
        pytest.skip(f"server normalised the key to {keys}")
    with pytest.raises(UnsafeKeyError):
        storage.download_dir(f"{s3_bucket}/m", str(tmp_path / "dest"))
    assert not (tmp_path / "escape.txt").exists()


def test_ensure_bucket_is_idempotent(s3_server):
    storage.ensure_bucket("s3://genray-ensure-twice")
    storage.ensure_bucket("s3://genray-ensure-twice")
    assert storage.list_objects("s3://genray-ensure-twice") == []


# ------------------------------------------------------------------------------------------- errors

def test_missing_bucket_is_a_one_line_error_naming_the_uri(s3_server, tmp_path):
    uri = "s3://genray-no-such-bucket/p"
    (tmp_path / "f.txt").write_bytes(b"x")
    calls = (
        storage.list_objects,
        storage.read_bytes,
        lambda u: storage.write_bytes(u + "/k", b""),
        lambda u: storage.download_dir(u, str(tmp_path / "d")),
        lambda u: storage.upload_dir(str(tmp_path), u),  # boto3's transfer manager wraps its errors differently
    )
    for call in calls:
        with pytest.raises(StorageError) as info:
            call(uri)
        _assert_one_line_naming(info.value, uri)
        assert "bucket 'genray-no-such-bucket' does not exist" in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not storage.exists(uri)


def test_bad_credentials_are_reported_as_access_denied(monkeypatch, tmp_path):
    # moto accepts any credentials by default; with INITIAL_NO_AUTH_ACTION_COUNT=0 it checks every request
    # against its (empty) IAM backend, so the server's generated keys are rejected like bad AWS keys.
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    with LocalS3Server() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        uri = "s3://genray-denied/p"
        (tmp_path / "f.txt").write_bytes(b"x")
        calls = (
            storage.list_objects, storage.read_bytes, storage.exists, storage.ensure_bucket,
            lambda u: storage.write_bytes(u, b"x"),
            lambda u: storage.upload_dir(str(tmp_path), u),
        )
        for call in calls:
            with pytest.raises(StorageError) as info:
                call(uri)
            _assert_one_line_naming(info.value, uri)
            assert "access denied" in str(info.value)
            assert info.value.reason == "denied"
            assert server.env()["AWS_ACCESS_KEY_ID"] not in str(info.value)


def test_unreachable_endpoint_names_the_endpoint(s3_server, monkeypatch):
    port = s3_server.port
    while True:  # a port nothing listens on
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        if dead != port:
            break
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # standard AWS variable; keeps the test from backing off
    uri = "s3://any-bucket/p"
    with pytest.raises(StorageError) as info:
        storage.list_objects(uri)
    _assert_one_line_naming(info.value, uri)
    assert f"http://127.0.0.1:{dead}" in str(info.value)
    assert info.value.reason == "unreachable"


def test_client_cache_follows_the_environment(s3_server, monkeypatch):
    first = storage.s3_client()
    assert storage.s3_client() is first
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    other = storage.s3_client()
    assert other is not first
    assert other.meta.endpoint_url == "http://127.0.0.1:9"
    monkeypatch.undo()
    assert storage.s3_client() is first
    assert first.meta.endpoint_url == s3_server.endpoint_url
    assert first.meta.config.s3["addressing_style"] == "path"


# ------------------------------------------------------------------------------------------ pyarrow

def test_pyarrow_filesystem_parquet_round_trip_on_s3(s3_bucket):
    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/out/_manifest")
    assert path == f"{s3_bucket[len('s3://'):]}/out/_manifest"
    table = pa.table({"input_key": ["a.jpg", "b/c.png"], "status": ["ok", "error"], "width": [3, 4]})
    pq.write_table(table, f"{path}/part-0.parquet", filesystem=fs)

    assert [o.key for o in storage.list_objects(f"{s3_bucket}/out")] == ["_manifest/part-0.parquet"]
    back = ds.dataset(path, filesystem=fs, format="parquet").to_table()
    assert back.sort_by("input_key").equals(table)


def test_pyarrow_filesystem_local(tmp_path):
    fs, path = storage.pyarrow_filesystem("file://" + str(tmp_path / "m"))
    assert path == str(tmp_path / "m")
    fs.create_dir(path)
    pq.write_table(pa.table({"x": [1]}), f"{path}/p.parquet", filesystem=fs)
    assert ds.dataset(str(tmp_path / "m")).to_table().column("x").to_pylist() == [1]


def test_pyarrow_filesystem_does_not_create_buckets(s3_server):
    fs, path = storage.pyarrow_filesystem("s3://genray-not-created/x")
    with pytest.raises(OSError):
        pq.write_table(pa.table({"x": [1]}), f"{path}/p.parquet", filesystem=fs)
    assert not storage.exists("s3://genray-not-created")


# --------------------------------------------------------------------------------------------- server

def _listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket the process listens on, read from /proc (Linux)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A = LISTEN
                    continue
                host_hex, port_hex = local.split(":")
                # /proc prints each 32-bit word of the address in host (little-endian) byte order.
                raw = b"".join(bytes.fromhex(host_hex[i:i + 8])[::-1] for i in range(0, len(host_hex), 8))
                ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
                found.append((ip, int(port_hex, 16)))
    return found


def _process_state(pid: int) -> str:
    """One-letter state from /proc/PID/stat ('T' stopped, 'Z' zombie); '' when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def test_server_listens_only_on_loopback(s3_server):
    assert s3_server.endpoint_url == f"http://127.0.0.1:{s3_server.port}"
    assert _listening_addresses(s3_server.pid) == [("127.0.0.1", s3_server.port)]


def test_server_env_and_plain_boto3(s3_server, s3_bucket):
    env = s3_server.env()
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert env["AWS_REGION"] == "us-east-1" and env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert len(env["AWS_SECRET_ACCESS_KEY"]) >= 30
    # A client built the ordinary way from the same variables sees what storage wrote.
    storage.write_bytes(f"{s3_bucket}/hello.txt", b"hello")
    client = boto3.session.Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    assert client.get_object(Bucket=s3_bucket[5:], Key="hello.txt")["Body"].read() == b"hello"


def test_server_pause_resume_and_stop_is_idempotent(monkeypatch):
    with LocalS3Server() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        storage.ensure_bucket("s3://genray-pause")
        server.pause()
        # SIGSTOP lands asynchronously: a server busy on the other core may still read 'R' for a moment.
        deadline = time.monotonic() + 5
        while _process_state(server.pid) != 'T' and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _process_state(server.pid) == 'T'
        server.resume()
        storage.write_bytes("s3://genray-pause/k", b"v")
        assert storage.read_bytes("s3://genray-pause/k") == b"v"
        pid = server.pid
        server.pause()  # stop() must also end a paused server
    assert _process_state(pid) in ('', 'Z')
    server.stop()


def test_server_latency_delays_each_request_and_can_change(monkeypatch):
    """LocalS3Server(latency_ms=...) delays every request (what benchmarks use to stand in for a remote store)."""
    with LocalS3Server(latency_ms=0) as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        storage.ensure_bucket("s3://genray-latency")
        uri = "s3://genray-latency/x.bin"
        storage.write_bytes(uri, b"x")

        def read_seconds() -> float:
            started = time.perf_counter()
            assert storage.read_bytes(uri) == b"x"
            return time.perf_counter() - started

        quick = min(read_seconds() for _ in range(3))
        server.set_latency(300)
        slow = min(read_seconds() for _ in range(3))
        # The injected delay is a floor on every request; no upper bound on a shared machine's own speed.
        assert slow >= 0.3 and quick < slow, (quick, slow)
    with pytest.raises(RuntimeError, match="latency_ms"):
        LocalS3Server().set_latency(10)
