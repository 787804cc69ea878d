"""Image archives as they are stored: .tar / .tar.gz / .zip files and WebDataset shards (`key.jpg` + `key.json`).

Reading streams members from storage and trusts neither a member's name nor its type (no tar-slip: absolute
names, '..', links and devices are refused, never followed); writing makes WebDataset-style shards, each written
once and atomically. No Ray here: bulk jobs (genray.process.read_stage) and `genray data export` share it.
"""
from __future__ import annotations

import io
import itertools
import re
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from genray import storage

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SHARD_NAME = "shard-{:06d}.tar"
SIDECAR_MAX_BYTES = 1 << 20  # a non-image member larger than this is not carried along with its image
MAX_PATTERN_NAMES = 1_000_000  # a brace pattern naming more objects than this is a typo, not a dataset

SHARD_RE = re.compile(r"shard-(\d{6,})\.tar")
_MEMBER_KEY_RE = re.compile(r"^(.*?\.(?:tar|tar\.gz|tgz|zip))#(.*)$", re.IGNORECASE | re.DOTALL)
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# Everything a damaged tar/gzip/zip stream can raise while it is parsed, besides the storage layer's own errors
# (zipfile raises NotImplementedError for a compression method it does not support, RuntimeError for encryption).
_FORMAT_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError,
                  NotImplementedError, RuntimeError)


class ArchiveError(Exception):
    """The archive cannot be read (further); the members before the failure have been yielded."""


def is_archive(key: str) -> bool:
    return key.lower().endswith(ARCHIVE_SUFFIXES)


def member_key(archive_key: str, member: str) -> str:
    """The manifest's input_key of an archive member: 'shards/shard-000001.tar#a/b.jpg'."""
    return f"{archive_key}#{member}"


def split_member_key(key: str) -> tuple[str, str] | None:
    """'a/x.tar#m/b.jpg' -> ('a/x.tar', 'm/b.jpg'); None for a key that names no archive member."""
    found = _MEMBER_KEY_RE.match(key)
    return (found.group(1), found.group(2)) if found else None


def sample_key(name: str) -> str:
    """WebDataset's sample key: the path up to the first '.' of its last segment ('a/b.seg.png' -> 'a/b')."""
    head, _, base = name.rpartition("/")
    return (head + "/" if head else "") + base.split(".", 1)[0]


# ----------------------------------------------------------------------------------------- brace patterns

def has_braces(uri: str) -> bool:
    return _BRACE_RE.search(uri) is not None


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: 'shard-{000..002}.tar' -> shard-000.tar, shard-001.tar,
    shard-002.tar (zero-padded as the first bound is); '{a,b}' -> a, b; several braces multiply."""
    parts: list[list[str]] = []
    last = 0
    for found in _BRACE_RE.finditer(pattern):
        parts.append([pattern[last:found.start()]])
        parts.append(_brace_choices(found.group(1), pattern))
        last = found.end()
    parts.append([pattern[last:]])
    total = 1
    for choices in parts:
        total *= len(choices)
    if total > MAX_PATTERN_NAMES:
        raise ValueError(f"{pattern}: names {total:,} objects, more than {MAX_PATTERN_NAMES:,}")
    return ["".join(names) for names in itertools.product(*parts)]


def _brace_choices(body: str, pattern: str) -> list[str]:
    bounds = _RANGE_RE.match(body)
    if bounds:
        first, last = bounds.group(1), bounds.group(2)
        width = len(first.lstrip("-")) if first.lstrip("-").startswith("0") else 0
        start, stop = int(first), int(last)
        step = 1 if stop >= start else -1
        if abs(stop - start) >= MAX_PATTERN_NAMES:
            raise ValueError(f"{pattern}: {{{body}}} names more than {MAX_PATTERN_NAMES:,} objects")
        return [f"{n:0{width}d}" for n in range(start, stop + step, step)]
    if "," in body:
        return body.split(",")
    raise ValueError(f"{pattern}: {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}")


# ------------------------------------------------------------------------------------------------ reading

@dataclass
class Member:
    """One entry of an archive: its bytes, or why it was refused (unsafe name or type) or could not be read."""

    name: str  # the safe relative name ('./a//b.jpg' -> 'a/b.jpg'); a refused entry keeps the name as stored
    data: bytes | None = None
    error: str | None = None
    refused: bool = False  # an unsafe entry: recorded whatever its suffix


def read_members(uri: str, max_member_bytes: int, size: int | None = None,
                 etag: str | None = None) -> Iterator[Member]:
    """Every file entry of a .tar/.tar.gz/.tgz/.zip archive, in archive order (zip: by sample key), streamed from
    storage: a tar is parsed as it downloads, a zip is read through ranged reads (its directory is at the end).
    Directories are skipped. Raises ArchiveError once the archive cannot be read further (truncated, corrupt,
    changed while read); everything before that has been yielded."""
    read = _zip_members if uri.lower().endswith(".zip") else _tar_members
    try:
        with storage.open_read(uri, size=size, etag=etag) as fileobj:
            yield from read(fileobj, max_member_bytes)
    except storage.StorageError as err:
        raise ArchiveError(str(err)) from None


def _refusal(name: str, kind: str | None) -> tuple[str, str | None]:
    """(the safe name or the name as stored, why the entry is refused or None)."""
    if kind is not None:
        return name, f"refused: {kind} entry in archive (links and devices are never followed)"
    try:
        return storage.safe_key(name), None
    except storage.UnsafeKeyError as err:
        return name, f"refused: unsafe member name ({str(err).split(': ', 1)[-1]})"


def _too_large(size: int, limit: int) -> str:
    return f"member too large: {size:,} bytes, limit {limit:,} (from --max-pixels)"


def _tar_kind(info: tarfile.TarInfo) -> str | None:
    if info.isreg():
        return None
    for test, kind in ((info.issym, "symbolic link"), (info.islnk, "hard link"), (info.ischr, "character device"),
                       (info.isblk, "block device"), (info.isfifo, "FIFO")):
        if test():
            return kind
    return f"special (type {info.type!r})"


def _tar_members(fileobj, max_member_bytes: int) -> Iterator[Member]:
    # Python's tarfile in stream mode ('r|*': plain, gzip, bz2 or xz, detected from the bytes) rather than Ray
    # Data's read_webdataset: Ray's reader drops links and devices silently, passes '..' and absolute names on,
    # and turns a truncated shard into a failed read task (the whole job) instead of rows for what it could read.
    count = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            tar.fileobj = stream = _LastRead(tar.fileobj)
            for info in tar:
                tar.members = []  # stream mode still remembers every header: forget them, memory stays flat
                if info.isdir():
                    continue
                name, refused = _refusal(info.name, _tar_kind(info))
                if refused:
                    yield Member(name, error=refused, refused=True)
                elif info.size > max_member_bytes:
                    yield Member(name, error=_too_large(info.size, max_member_bytes))
                else:
                    try:
                        data = tar.extractfile(info).read()
                    except _FORMAT_ERRORS as err:
                        yield Member(name, error=f"truncated member ({_reason(err)})")
                        raise ArchiveError(f"truncated or corrupt archive: cannot read past member {name!r} "
                                           f"({_reason(err)})") from None
                    yield Member(name, data)
                count += 1
            # tarfile ends quietly at a header cut short or at the end of the bytes; only the end-of-archive
            # marker (a zero block) says the archive is whole.
            if stream.last != bytes(tarfile.BLOCKSIZE):
                raise ArchiveError(f"truncated archive: no end-of-archive marker after {count} entries")
    except _FORMAT_ERRORS as err:
        where = f"after {count} entries" if count else "at the start"
        raise ArchiveError(f"truncated or corrupt archive: unreadable {where} ({_reason(err)})") from None


class _LastRead:
    """tarfile's decompressed stream, remembering the last bytes read (after the loop: the last header block)."""

    def __init__(self, stream):
        self.stream, self.last = stream, b""

    def read(self, size: int | None = None) -> bytes:
        self.last = self.stream.read(size)
        return self.last

    def __getattr__(self, name: str):  # tell, seek, close
        return getattr(self.stream, name)


def _zip_members(fileobj, max_member_bytes: int) -> Iterator[Member]:
    try:
        archive = zipfile.ZipFile(fileobj)
    except _FORMAT_ERRORS as err:  # the central directory, at the end, is what a truncated zip loses
        raise ArchiveError(f"truncated or corrupt zip archive ({_reason(err)})") from None
    with archive:
        # Members of one WebDataset sample need not be adjacent in a zip: order by sample key so they are.
        for info in sorted(archive.infolist(), key=lambda i: (sample_key(i.filename), i.filename)):
            if info.is_dir():
                continue
            mode = stat.S_IFMT(info.external_attr >> 16)  # the Unix file type, when the zip records one
            kind = None if mode in (0, stat.S_IFREG) else ("symbolic link" if mode == stat.S_IFLNK else
                                                           f"special (mode {mode:o})")
            name, refused = _refusal(info.filename, kind)
            if refused:
                yield Member(name, error=refused, refused=True)
            elif info.flag_bits & 0x1:
                yield Member(name, error="encrypted member")
            elif info.file_size > max_member_bytes:  # the declared size also bounds the decompression
                yield Member(name, error=_too_large(info.file_size, max_member_bytes))
            else:
                try:
                    yield Member(name, archive.read(info))  # checks the member's CRC
                except _FORMAT_ERRORS as err:
                    yield Member(name, error=f"corrupt member ({_reason(err)})")


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())[:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def group_samples(members: Iterable[Member], is_image: Callable[[str], bool]) -> Iterator[tuple[Member, list[Member]]]:
    """WebDataset samples: (image member, its sidecars) for every image, where the sidecars are the other
    non-image members of the same sample key next to it in the archive (key.json, key.txt, ...; each at most
    SIDECAR_MAX_BYTES), given with the sample's first image only. Refused entries and unreadable images come as
    (member, []). Other non-image members are dropped. An ArchiveError is raised after the samples read before it."""
    run: list[Member] = []

    def flush() -> Iterator[tuple[Member, list[Member]]]:
        sidecars = [m for m in run if m.data is not None and not is_image(m.name)
                    and len(m.data) <= SIDECAR_MAX_BYTES]
        for member in run:
            if member.error is not None and (member.refused or is_image(member.name)):
                yield member, []
            elif member.error is None and is_image(member.name):
                yield member, sidecars
                sidecars = []

    try:
        for member in members:
            if run and (member.refused or run[-1].refused or sample_key(member.name) != sample_key(run[-1].name)):
                yield from flush()
                run = []
            run.append(member)
    except ArchiveError:
        yield from flush()
        raise
    yield from flush()


# ------------------------------------------------------------------------------------------------ writing

def next_shard_index(prefix_uri: str) -> int:
    """1 + the highest shard-NNNNNN.tar directly under the prefix (0 if none): a new run never overwrites a shard,
    not even one a crashed run left behind."""
    try:
        names = [o.key for o in storage.list_objects(prefix_uri, suffixes=(".tar",)) if "/" not in o.key]
    except storage.StorageError:
        return 0
    indices = [int(found.group(1)) for found in map(SHARD_RE.fullmatch, names) if found]
    return max(indices, default=-1) + 1


class ShardWriter:
    """WebDataset-style shards shard-NNNNNN.tar under a prefix. A shard closes after `max_samples` samples, or
    before a sample would take it past `max_bytes`. Each shard is staged in a spooled temporary file (memory up to
    64 MB, then local disk) and written once, atomically (one PUT or a multipart upload that appears only when
    complete; a local rename), so no half-written shard is ever visible under its final name."""

    SPOOL_BYTES = 64 << 20

    def __init__(self, prefix_uri: str, max_samples: int, max_bytes: int | None = None,
                 start_index: int | None = None):
        if max_samples <= 0 or (max_bytes is not None and max_bytes <= 0):
            raise ValueError(f"shard limits must be positive, got {max_samples} samples, {max_bytes} bytes")
        self.prefix_uri, self.max_samples, self.max_bytes = prefix_uri, max_samples, max_bytes
        self.index = next_shard_index(prefix_uri) if start_index is None else start_index
        self.written: list[str] = []  # URIs of the committed shards
        self.mtime = int(time.time())
        self._spool = self._tar = None
        self._items: list[Any] = []

    def add(self, files: list[tuple[str, bytes]], item: Any = None) -> list[tuple[str, Any]]:
        """Add one sample (its files under WebDataset names: 'a/b.png', 'a/b.json'). Returns (shard key, item) for
        every sample of the shards this call committed (the caller's `item`s, in the order they were added)."""
        committed = []
        size = sum(512 + -(-len(data) // 512) * 512 for _, data in files)  # a header + padded data per file
        if self._items and self.max_bytes is not None and self._spool.tell() + size > self.max_bytes:
            committed = self._commit()
        if self._tar is None:
            self._spool = tempfile.SpooledTemporaryFile(max_size=self.SPOOL_BYTES)
            self._tar = tarfile.open(fileobj=self._spool, mode="w", format=tarfile.PAX_FORMAT)
        for name, data in files:
            info = tarfile.TarInfo(storage.safe_key(name))
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._items.append(item)
        if len(self._items) >= self.max_samples:
            committed += self._commit()
        return committed

    def close(self) -> list[tuple[str, Any]]:
        """Commit the last, partly filled shard."""
        return self._commit() if self._items else []

    def abort(self) -> None:
        """Drop the shard being filled (its samples are not written anywhere)."""
        if self._spool is not None:
            self._spool.close()
        self._spool = self._tar = None
        self._items = []

    def _commit(self) -> list[tuple[str, Any]]:
        name = SHARD_NAME.format(self.index)
        self._tar.close()  # end-of-archive blocks
        self._spool.seek(0)
        uri = storage.join_uri(self.prefix_uri, name)
        storage.write_fileobj(uri, self._spool)
        items = self._items
        self.abort()
        self.index += 1
        self.written.append(uri)
        return [(name, item) for item in items]

