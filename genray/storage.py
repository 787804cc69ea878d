"""The one storage layer: local paths, file:// and s3:// URIs behind one small API (boto3 + pyarrow.fs).

S3 settings come only from the standard AWS environment variables; errors are one line and name the URI.
"""
from __future__ import annotations

import contextlib
import io
import os
import posixpath
import secrets
import shutil
import threading
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
import pyarrow.fs

# write_bytes stages data in a hidden file beside the target; list_objects must never report one.
_TMP_PREFIX = ".genray-tmp-"

# Error codes S3 (and S3-compatible servers) return when the credentials are wrong or lack permission.
_DENIED_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "403",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


class StorageError(Exception):
    """One-line, user-facing error that names the URI."""

    def __init__(self, message: str, reason: str = "other"):
        super().__init__(message)
        # For callers that branch on the failure: missing_bucket, missing_object, denied, unreachable, other.
        self.reason = reason


class UnsafeKeyError(StorageError):
    """A key that would escape its base prefix or is not a plain relative key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the listed prefix, '/'-separated, e.g. 'a/b.jpg'
    uri: str  # full URI of the object
    size: int
    etag: str  # S3 ETag without quotes; for local files f"{mtime_ns:x}-{size:x}"


# ---------------------------------------------------------------------------------------------- URIs

def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        if not path.startswith("/"):
            raise StorageError(f"{uri}: file:// URIs must be absolute (file:///abs/path)")
        return path
    return uri


def _split_s3(uri: str) -> tuple[str, str]:
    """'s3://b/p/q/' -> ('b', 'p/q')."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name in S3 URI")
    return bucket, key.strip("/")


def _safe_segments(part: str) -> list[str]:
    if not isinstance(part, str):
        raise UnsafeKeyError(f"{part!r}: key must be a string")
    if "\x00" in part:
        raise UnsafeKeyError(f"{part!r}: key contains a NUL byte")
    if "\\" in part:
        raise UnsafeKeyError(f"{part!r}: key contains a backslash")
    if part.startswith("/"):
        raise UnsafeKeyError(f"{part!r}: key must be relative, not absolute")
    segments = part.split("/")
    if ".." in segments:
        raise UnsafeKeyError(f"{part!r}: key contains a '..' segment")
    # '' (from 'a//b' or a trailing '/') and '.' name nothing; dropping them keeps local and S3 keys identical.
    segments = [s for s in segments if s not in ("", ".")]
    if not segments:
        raise UnsafeKeyError(f"{part!r}: empty key would name the base prefix itself")
    return segments


def safe_key(key: str) -> str:
    """`key` as a plain relative key ('./a//b.jpg' -> 'a/b.jpg'); UnsafeKeyError for absolute keys, '..', NUL or
    backslash. For names from untrusted sources, e.g. the members of an archive."""
    return "/".join(_safe_segments(key))


def join_uri(base: str, *parts: str) -> str:
    """Join relative keys onto a base URI, refusing any part that could escape the base."""
    segments: list[str] = []
    for part in parts:
        segments.extend(_safe_segments(part))
    if not base:
        raise StorageError("empty base URI")
    if is_s3(base):
        _split_s3(base)  # validates the bucket name
    root = base.rstrip("/") or "/"  # a bare '/' base stays the filesystem root
    if not segments:
        return root
    return root.rstrip("/") + "/" + "/".join(segments)


def relative_key(base: str, uri: str) -> str:
    """The '/'-separated key of `uri` under `base` (inverse of join_uri)."""
    if is_s3(base) != is_s3(uri):
        raise StorageError(f"{uri}: not under {base}")
    if is_s3(base):
        b_bucket, b_key = _split_s3(base)
        u_bucket, u_key = _split_s3(uri)
        if b_bucket != u_bucket:
            raise StorageError(f"{uri}: not under {base}")
        root, full = b_key, u_key
    else:
        root = os.path.abspath(_local_path(base)).replace(os.sep, "/")
        full = os.path.abspath(_local_path(uri)).replace(os.sep, "/")
    if root == "":
        key = full
    elif full.startswith(root.rstrip("/") + "/"):
        key = full[len(root.rstrip("/")) + 1:]
    else:
        raise StorageError(f"{uri}: not under {base}")
    if not key:
        raise StorageError(f"{uri}: is the base {base} itself, not a key under it")
    return key


def normalized_location(uri: str) -> tuple[str, tuple[str, ...]]:
    """(where, path segments) of a prefix or object after normalisation, for comparing two URIs: s3 keys lose
    '.' segments, doubled and trailing slashes and resolve '..'; local paths are resolved through symlinks too
    (realpath). 's3://b/x/../in//' and 's3://b/in' give the same answer."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return f"s3://{bucket}", tuple(s for s in posixpath.normpath("/" + key).split("/") if s)
    path = os.path.realpath(_local_path(uri))
    return "local", tuple(s for s in path.replace(os.sep, "/").split("/") if s)


def overlaps(a: str, b: str) -> bool:
    """Whether two prefixes are the same place or one lies inside the other, after normalisation."""
    (where_a, seg_a), (where_b, seg_b) = normalized_location(a), normalized_location(b)
    n = min(len(seg_a), len(seg_b))
    return where_a == where_b and seg_a[:n] == seg_b[:n]


# ---------------------------------------------------------------------------------------- S3 client

def _endpoint_url() -> str | None:
    # The service-specific variable wins, as in the AWS SDKs.
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _max_attempts() -> int:
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "5")))
    except ValueError:
        return 5


def _safe_endpoint(endpoint: str | None) -> str:
    """The endpoint for messages, without any user:password@ part."""
    if not endpoint:
        return "the default AWS S3 endpoint"
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}" if parts.scheme else endpoint


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client():
    """A boto3 S3 client for the current AWS_* environment, cached per (endpoint, region, credentials)."""
    key = (
        _endpoint_url(), _region(), _max_attempts(),
        os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            # A fresh Session per key: boto3's default session caches credentials and would miss an env change.
            session = boto3.session.Session(region_name=key[1])
            client = session.client(
                "s3",
                endpoint_url=key[0],
                config=botocore.config.Config(
                    s3={"addressing_style": "path"},  # virtual-host style breaks on loopback endpoints
                    retries={"max_attempts": key[2], "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=60,
                ),
            )
            _clients[key] = client
        return client


@contextlib.contextmanager
def _s3_errors(uri: str, missing_is_object: bool = False) -> Iterator[None]:
    """Turn botocore failures into one-line StorageErrors that name the URI (never the credentials)."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = _split_s3(uri)[0]
        if code == "NoSuchBucket":
            raise StorageError(f"{uri}: bucket '{bucket}' does not exist", "missing_bucket") from None
        if code in _DENIED_CODES or status == 403:
            raise StorageError(
                f"{uri}: access denied ({code or status}) - the S3 credentials are invalid or lack permission "
                "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN)", "denied",
            ) from None
        if missing_is_object and (code in _MISSING_KEY_CODES or status == 404):
            raise StorageError(f"{uri}: no such object", "missing_object") from None
        message = " ".join(str(err.get("Message", "")).split())[:200]
        raise StorageError(f"{uri}: S3 error {code or status}: {message}".rstrip(": ")) from None
    except (boto3.exceptions.S3UploadFailedError, boto3.exceptions.RetriesExceededError) as exc:
        # boto3's transfer manager wraps the ClientError in a string; recover its error code from it.
        text = str(exc)
        if "NoSuchBucket" in text:
            raise StorageError(f"{uri}: bucket '{_split_s3(uri)[0]}' does not exist", "missing_bucket") from None
        if any(f"({code})" in text for code in _DENIED_CODES):
            raise StorageError(
                f"{uri}: access denied - the S3 credentials are invalid or lack permission "
                "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN)", "denied",
            ) from None
        if "Could not connect" in text or "Connect timeout" in text:
            endpoint = _safe_endpoint(_endpoint_url())
            raise StorageError(f"{uri}: cannot reach S3 endpoint {endpoint}", "unreachable") from None
        raise StorageError(f"{uri}: S3 transfer failed ({type(exc).__name__})") from None
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(
            f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)", "denied"
        ) from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError) as exc:
        endpoint = _safe_endpoint(_endpoint_url())
        raise StorageError(
            f"{uri}: cannot reach S3 endpoint {endpoint} ({type(exc).__name__})", "unreachable"
        ) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise StorageError(f"{uri}: S3 request failed ({type(exc).__name__})") from None


# ------------------------------------------------------------------------------------------ objects

LIST_PAGE_SIZE = 1000  # keys per listing page: S3's own page size


def list_objects(prefix_uri: str, suffixes: tuple[str, ...] | None = None) -> list[ObjectInfo]:
    """Every object under a folder-like prefix, recursively, sorted by key; suffixes match case-insensitively."""
    return [obj for page in iter_object_pages(prefix_uri, suffixes) for obj in page]


def iter_object_pages(prefix_uri: str, suffixes: tuple[str, ...] | None = None,
                      page_size: int = LIST_PAGE_SIZE) -> Iterator[list[ObjectInfo]]:
    """list_objects one page at a time, in the same order (by key, as S3 lists), so a caller holds one page of a
    prefix of any size. Local folders are walked in key order too (a folder's entries sorted with a '/' after
    folder names), so local and S3 listings of the same tree agree."""
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    if is_s3(prefix_uri):
        bucket, prefix = _split_s3(prefix_uri)
        # 's3://b/p' is the folder 'p/': never match the sibling 'p2/...'.
        s3_prefix = prefix + "/" if prefix else ""
        with _s3_errors(prefix_uri):
            pages = s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=s3_prefix, PaginationConfig={"PageSize": min(page_size, 1000)})
            for page in pages:
                out = []
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(s3_prefix):]
                    if not key or key.endswith("/"):  # folder markers written by some tools
                        continue
                    if wanted and not key.lower().endswith(wanted):
                        continue
                    out.append(ObjectInfo(
                        key=key, uri=f"s3://{bucket}/{obj['Key']}", size=int(obj["Size"]),
                        etag=str(obj.get("ETag", "")).strip('"'),
                    ))
                if out:
                    yield out
        return
    root = _local_path(prefix_uri)
    if not os.path.isdir(root):
        return
    out = []
    real_root = os.path.realpath(root).rstrip(os.sep) + os.sep
    for key, path in _walk_sorted(root, ""):
        if wanted and not key.lower().endswith(wanted):
            continue
        # Symlinked folders are not entered; a symlinked file is listed only if it stays under the root.
        if os.path.islink(path) and not os.path.realpath(path).startswith(real_root):
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:  # removed while we walked
            continue
        # Plain concatenation: a local file name may legally hold a backslash; consumers that turn keys
        # into paths go through join_uri and refuse it there.
        out.append(ObjectInfo(
            key=key, uri=prefix_uri.rstrip("/") + "/" + key, size=st.st_size,
            etag=f"{st.st_mtime_ns:x}-{st.st_size:x}",
        ))
        if len(out) >= page_size:
            yield out
            out = []
    if out:
        yield out


def _walk_sorted(folder: str, key_prefix: str) -> Iterator[tuple[str, str]]:
    """(key, path) of every file under folder, in key order: 'a/b.jpg' < 'a/b/c.jpg' < 'a/b0.jpg'."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):  # removed while we walked
        return
    named = []
    for e in entries:
        if e.name.startswith(_TMP_PREFIX):
            continue
        if e.is_dir(follow_symlinks=False):
            named.append((e.name + "/", e))
        elif not e.is_dir():  # a symlink to a folder is not followed (as os.walk does not)
            named.append((e.name, e))
    entries = named
    for name, entry in sorted(entries, key=lambda item: item[0]):
        if name.endswith("/"):
            yield from _walk_sorted(entry.path, key_prefix + name)
        else:
            yield key_prefix + name, entry.path


class TooLargeError(StorageError):
    """An object holds more bytes than the caller allows; nothing past the limit was read."""


def _read_capped(stream, uri: str, max_bytes: int, limit_name: str) -> bytes:
    data = stream.read(max_bytes + 1)  # one byte more than allowed tells "too large" apart from "exactly the limit"
    if len(data) > max_bytes:
        raise TooLargeError(f"input too large: more than {max_bytes:,} bytes, limit {max_bytes:,} ({limit_name})")
    return data


def read_bytes(uri: str, max_bytes: int | None = None, limit_name: str = "--max-input-bytes",
               root: str | None = None) -> bytes:
    """An object's bytes. max_bytes: read at most that many (+1) and raise TooLargeError past it, so an object
    larger than its listing said cannot take the reader's memory. root (local): refuse a path that symlinks lead
    outside of it."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _s3_errors(uri, missing_is_object=True):
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return body.read() if max_bytes is None else _read_capped(body, uri, max_bytes, limit_name)
            finally:
                body.close()
    path = _local_path(uri)
    if root is not None:
        check_inside(root, uri)
    try:
        with open(path, "rb") as f:
            return f.read() if max_bytes is None else _read_capped(f, uri, max_bytes, limit_name)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such object", "missing_object") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a directory, not an object") from None
    except PermissionError:
        raise StorageError(f"{uri}: permission denied") from None


def stat(uri: str) -> ObjectInfo:
    """One object's size and ETag (a HEAD request on S3); key is the URI's last segment."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _s3_errors(uri, missing_is_object=True):
            head = s3_client().head_object(Bucket=bucket, Key=key)
        return ObjectInfo(key=name, uri=uri, size=int(head["ContentLength"]), etag=str(head["ETag"]).strip('"'))
    try:
        st = os.stat(_local_path(uri))
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such object", "missing_object") from None
    if not os.path.isfile(_local_path(uri)):  # a directory is a prefix, not an object
        raise StorageError(f"{uri}: is a directory, not an object", "missing_object")
    return ObjectInfo(key=name, uri=uri, size=st.st_size, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}")


class _S3Range(io.RawIOBase):
    """A seekable read-only view of one S3 object: every read is a ranged GET (If-Match its ETag, so an object
    replaced while it is being read fails instead of mixing two versions). Wrapped in a BufferedReader by
    open_read, so each GET fetches a whole buffer and no request is held open between reads."""

    def __init__(self, uri: str, size: int, etag: str | None):
        self.uri, self.size, self.etag, self.pos = uri, size, etag, 0
        self.bucket, self.key = _split_s3(uri)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        end = min(self.pos + len(buffer), self.size)
        if end <= self.pos:
            return 0
        kwargs = {"IfMatch": f'"{self.etag}"'} if self.etag else {}
        with _s3_errors(self.uri, missing_is_object=True):
            try:
                body = s3_client().get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-{end - 1}",
                                              **kwargs)["Body"].read()
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    raise StorageError(f"{self.uri}: the object changed while it was being read") from None
                raise
        buffer[:len(body)] = body
        self.pos += len(body)
        return len(body)


def open_read(uri: str, size: int | None = None, etag: str | None = None,
              buffer_bytes: int = 8 << 20) -> io.BufferedIOBase:
    """A seekable binary file over an object, read on demand in `buffer_bytes` pieces (ranged GETs on S3): for
    archives too large to hold in memory. `size`/`etag` from a listing save a HEAD request."""
    if is_s3(uri):
        if size is None:
            info = stat(uri)
            size, etag = info.size, etag or info.etag
        return io.BufferedReader(_S3Range(uri, size, etag), buffer_size=buffer_bytes)
    try:
        return open(_local_path(uri), "rb", buffering=buffer_bytes)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such object", "missing_object") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise StorageError(f"{uri}: cannot read ({exc.strerror})") from None


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_local_write(path: str, writer, if_absent: bool = False) -> None:
    """Stage in a hidden file in the target's directory, fsync it, then os.replace and fsync the directory: readers
    never see half a file, and a power loss after the rename cannot leave an empty or partial file under the final
    name (ext4/xfs may otherwise commit the rename before the data). if_absent: os.link instead of os.replace, which
    fails if the target exists (never overwrite; StorageError reason 'exists')."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, _TMP_PREFIX + secrets.token_hex(8))
    try:
        writer(tmp)
        _fsync_path(tmp)
        if if_absent:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise StorageError(f"{path}: already exists (not overwritten)", "exists") from None
            os.remove(tmp)
        else:
            os.replace(tmp, path)
        _fsync_path(directory, directory=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(uri: str, data: bytes, if_absent: bool = False, root: str | None = None) -> None:
    """See write_fileobj."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        if not key:
            raise StorageError(f"{uri}: no object key in S3 URI")
        kwargs = {"IfNoneMatch": "*"} if if_absent else {}
        with _s3_errors(uri), _exists_error(uri):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, **kwargs)
        return
    write_fileobj(uri, io.BytesIO(data), if_absent=if_absent, root=root)


@contextlib.contextmanager
def _exists_error(uri: str) -> Iterator[None]:
    """A conditional PUT (If-None-Match: *) refused because the object exists -> StorageError reason 'exists'."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise StorageError(f"{uri}: already exists (not overwritten)", "exists") from None
        raise
    except boto3.exceptions.S3UploadFailedError as exc:
        if "PreconditionFailed" in str(exc):
            raise StorageError(f"{uri}: already exists (not overwritten)", "exists") from None
        raise


_PART_BYTES = 16 << 20


def _upload_if_absent(fileobj, bucket: str, key: str) -> None:
    """One PUT, or a multipart upload in 16 MB parts, completed with If-None-Match: * (S3 refuses it if the key
    exists by then); a failed upload is aborted so no parts are left behind."""
    client = s3_client()
    first = fileobj.read(_PART_BYTES)
    nxt = fileobj.read(_PART_BYTES)
    if not nxt:
        client.put_object(Bucket=bucket, Key=key, Body=first, IfNoneMatch="*")
        return
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        parts, data = [], first
        while data:
            number = len(parts) + 1
            etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=data)["ETag"]
            parts.append({"ETag": etag, "PartNumber": number})
            data = nxt if number == 1 else fileobj.read(_PART_BYTES)
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, IfNoneMatch="*",
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        raise


def check_inside(root: str, uri: str) -> None:
    """Local only: refuse `uri` if, once symlinks are resolved, it lies outside `root` (a symlinked folder or file
    under an input or output prefix must not lead reads or writes elsewhere on the machine)."""
    if is_s3(uri) or is_s3(root):
        return
    real_root = os.path.realpath(_local_path(root))
    real = os.path.realpath(_local_path(uri))
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise UnsafeKeyError(f"{uri}: leads outside {root} through a symbolic link")


def write_fileobj(uri: str, fileobj, if_absent: bool = False, root: str | None = None) -> None:
    """Write a binary file object's contents (from its current position) to `uri`, atomically: one PUT or a
    multipart upload that appears only when complete on S3, a staged file renamed into place locally.
    if_absent: never overwrite (S3 If-None-Match: *, a local hard link); an existing object is a StorageError with
    reason 'exists'. root (local): refuse a target that symlinks lead outside it."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        if not key:
            raise StorageError(f"{uri}: no object key in S3 URI")
        with _s3_errors(uri), _exists_error(uri):
            if if_absent:  # boto3's transfer manager cannot pass If-None-Match: a multipart upload of our own
                _upload_if_absent(fileobj, bucket, key)
            else:
                s3_client().upload_fileobj(fileobj, bucket, key)
        return
    if root is not None:
        parent = os.path.dirname(os.path.abspath(_local_path(uri)))
        existing = parent
        while not os.path.exists(existing):  # before makedirs: it would create folders wherever a symlink leads
            existing = os.path.dirname(existing)
        check_inside(root, existing)
        os.makedirs(parent, exist_ok=True)
        check_inside(root, parent)

    def _write(tmp: str) -> None:
        # O_EXCL + 0o666 so the final file gets the usual umask permissions (mkstemp would make it 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(fileobj, f)

    try:
        _atomic_local_write(_local_path(uri), _write, if_absent=if_absent)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write ({exc.strerror or type(exc).__name__})") from None


def exists(uri: str) -> bool:
    """True for an object, or for a prefix with objects under it (a local directory)."""
    if not is_s3(uri):
        return os.path.exists(_local_path(uri))
    bucket, key = _split_s3(uri)
    client = s3_client()
    if key:
        try:
            with _s3_errors(uri, missing_is_object=True):
                client.head_object(Bucket=bucket, Key=key)
            return True
        except StorageError as exc:
            # HEAD responses carry no error body, so a missing key and a missing bucket both look like 404.
            if exc.reason != "missing_object":
                raise
    try:
        with _s3_errors(uri):
            resp = client.list_objects_v2(Bucket=bucket, Prefix=key + "/" if key else "", MaxKeys=1)
    except StorageError as exc:
        if exc.reason == "missing_bucket":
            return False
        raise
    return bool(resp.get("KeyCount", 0)) if key else True


def delete(uri: str) -> None:
    """Delete one object; a missing object is fine."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _s3_errors(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    path = _local_path(uri)
    if os.path.isdir(path):
        raise StorageError(f"{uri}: is a directory, not an object")
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file under local_dir to the same relative keys under the URI prefix."""
    local_dir = _local_path(local_dir)
    if not os.path.isdir(local_dir):
        raise StorageError(f"{local_dir}: no such directory")
    for obj in list_objects(local_dir):
        src = os.path.join(local_dir, *obj.key.split("/"))
        dst = join_uri(uri, obj.key)
        if is_s3(dst):
            bucket, key = _split_s3(dst)
            # upload_file switches to multipart for large files (model weights).
            with _s3_errors(dst):
                s3_client().upload_file(src, bucket, key)
        else:
            _atomic_local_write(_local_path(dst), lambda tmp, src=src: shutil.copyfile(src, tmp))


def download_dir(uri: str, local_dir: str) -> None:
    """Copy every object under the URI prefix into local_dir; keys that would escape it are refused."""
    local_dir = _local_path(local_dir)
    for obj in list_objects(uri):
        dst = join_uri(local_dir, obj.key)  # an object key with '..' raises UnsafeKeyError here
        if is_s3(obj.uri):
            bucket, key = _split_s3(obj.uri)
            with _s3_errors(obj.uri):
                _atomic_local_write(dst, lambda tmp: s3_client().download_file(bucket, key, tmp))
        else:
            src = _local_path(obj.uri)
            _atomic_local_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))


def ensure_bucket(uri: str) -> None:
    """Create the URI's bucket if it is missing (local: mkdir -p)."""
    if not is_s3(uri):
        os.makedirs(_local_path(uri), exist_ok=True)
        return
    bucket, _ = _split_s3(uri)
    client = s3_client()
    try:
        with _s3_errors(uri):
            client.head_bucket(Bucket=bucket)
        return
    except StorageError as exc:
        if exc.reason in ("denied", "unreachable"):
            raise
    kwargs = {}
    if _region() != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": _region()}
    try:
        with _s3_errors(uri):
            client.create_bucket(Bucket=bucket, **kwargs)
    except StorageError as exc:
        if "BucketAlreadyOwnedByYou" not in str(exc):
            raise


# ---------------------------------------------------------------------------------------- pyarrow

def pyarrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path) for pyarrow and Ray Train: S3FileSystem + 'bucket/prefix', or local + absolute path."""
    if not is_s3(uri):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(_local_path(uri))
    bucket, key = _split_s3(uri)
    kwargs: dict = dict(
        region=_region(),
        allow_bucket_creation=False,
        connect_timeout=5,
        request_timeout=60,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=_max_attempts()),
    )
    endpoint = _endpoint_url()
    if endpoint:
        # Passed explicitly: some pyarrow versions ignore AWS_ENDPOINT_URL.
        parts = urlsplit(endpoint)
        kwargs["endpoint_override"] = (parts.netloc + parts.path.rstrip("/")) if parts.netloc else endpoint
        kwargs["scheme"] = parts.scheme or "https"
    # No access_key/secret_key here: keys given to S3FileSystem are part of its pickle, and this filesystem travels
    # to the cluster (Ray Train's RunConfig(storage_filesystem=...)). Without them each process resolves its own
    # credentials through the AWS default chain (AWS_* environment, profile, instance/pod role) where it runs.
    fs = pyarrow.fs.S3FileSystem(**kwargs)
    return fs, f"{bucket}/{key}" if key else bucket
