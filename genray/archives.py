"""Image archives as they are stored: .tar / .tar.gz / .zip files and WebDataset shards (`key.jpg` + `key.json`).

Reading streams members from storage and trusts neither a member's name nor its type (no tar-slip: absolute
names, '..', links and devices are refused, never followed); writing makes WebDataset-style shards, each written
once and atomically. No Ray here: bulk jobs (genray.process.read_stage) and `genray data export` share it.
"""
from __future__ import annotations

import bz2
import gzip
import io
import itertools
import lzma
import re
import stat
import struct
import tarfile
import tempfile
import time
import unicodedata
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


def _escape(key: str) -> str:
    return key.replace("%", "%25").replace("#", "%23")


def loose_key(key: str) -> str:
    """The manifest's input_key of a loose file or an archive: the key itself, unless it holds '#' (or already
    looks escaped: '%23'/'%25'), then with '%' -> '%25' and '#' -> '%23'. So a manifest key holds '#' only as the
    archive/member separator, and keys of ordinary names are unchanged."""
    return _escape(key) if ("#" in key or "%23" in key or "%25" in key) else key


def _unescape_loose(key: str) -> str:
    return key.replace("%23", "#").replace("%25", "%") if ("%23" in key or "%25" in key) else key


def member_key(archive_key: str, member: str) -> str:
    """The manifest's input_key of an archive member: 'shards/shard-000001.tar#a/b.jpg' (the archive's key as
    loose_key gives it, so the first '#' always ends it, whatever the names hold)."""
    return f"{loose_key(archive_key)}#{member}"


def split_member_key(key: str) -> tuple[str, str] | None:
    """'a/x.tar#m/b.jpg' -> ('a/x.tar', 'm/b.jpg'); None for a key that names no archive member."""
    archive, sep, member = key.partition("#")
    archive = _unescape_loose(archive)
    return (archive, member) if sep and is_archive(archive) else None


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


@dataclass(frozen=True)
class Limits:
    """What one archive may cost a reader; past each bound the member or the archive is an error naming it.
    With these, a read task holds at most about max_sample_bytes + one member + one extended header, whatever
    the archive's headers say."""

    max_member_bytes: int  # one member's (decompressed) bytes (--max-input-bytes)
    max_members: int = 1_000_000  # entries per archive (--max-archive-members)
    max_bytes: int = 256 << 30  # decompressed bytes read from one archive (--max-archive-bytes)
    max_sample_bytes: int = 1 << 30  # the parts of one WebDataset sample held together (--max-sample-bytes)


# Fixed bounds (README "Reliability"): a tar extended header (PAX, GNU long name) is metadata, never this large
# in a real archive; consecutive extended headers and global headers are few; a zip's central directory of a
# million entries takes ~100 MB.
MAX_HEADER_BYTES = 1 << 20
MAX_EXTENDED_HEADERS = 16
MAX_ZIP_DIRECTORY_BYTES = 256 << 20
MAX_SAMPLE_PARTS = 64  # images of one sample key ('a.png', 'a.seg.png', ...)
MAX_SIDECARS = 16  # sidecars carried per sample (the rest are not carried) ...
MAX_SIDECAR_BYTES_PER_SAMPLE = 4 << 20  # ... and their bytes together
# Sidecars carried along with a sample's image (WebDataset metadata); any other non-image member is never read.
SIDECAR_SUFFIXES = (".json", ".txt", ".cls", ".cls2", ".caption", ".tags", ".csv", ".yaml", ".yml")
_CONTROL_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")  # newline, NUL..US, DEL, RTL/LTR overrides, zero-width, ...


def is_sidecar(name: str) -> bool:
    return name.lower().endswith(SIDECAR_SUFFIXES)


def has_control(name: str) -> bool:
    if name.isascii():  # the common case, at C speed: in ASCII only C0 controls and DEL are not printable
        return not name.isprintable()
    return any(unicodedata.category(c) in _CONTROL_CATEGORIES for c in name)


def escape_control(name: str) -> str:
    """A name fit for logs and the manifest: control and bidi-format characters as \\xNN / \\uNNNN, and
    backslashes doubled (so an escaped name never equals a real one)."""
    out = []
    for c in name:
        if c == "\\":
            out.append("\\\\")
        elif unicodedata.category(c) in _CONTROL_CATEGORIES:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def read_members(uri: str, max_member_bytes: int | Limits, size: int | None = None, etag: str | None = None,
                 wanted: Callable[[str, int], bool] | None = None) -> Iterator[Member]:
    """Every file entry of a .tar/.tar.gz/.tgz/.zip archive, in archive order (zip: by sample key), streamed from
    storage: a tar is parsed as it downloads, a zip is read through ranged reads (its directory is at the end).
    Directories are skipped. `wanted(name, size)`: whether a member's bytes are read at all (None: every member's);
    an unwanted member comes without data. Raises ArchiveError once the archive cannot be read further
    (truncated, corrupt, changed while read, past a limit); everything before that has been yielded."""
    limits = max_member_bytes if isinstance(max_member_bytes, Limits) else Limits(max_member_bytes)
    read = _zip_members if uri.lower().endswith(".zip") else _tar_members
    try:
        with storage.open_read(uri, size=size, etag=etag) as fileobj:
            yield from read(fileobj, limits, wanted or (lambda name, size: True))
    except storage.StorageError as err:
        raise ArchiveError(str(err)) from None


def _refusal(name: str, kind: str | None) -> tuple[str, str | None]:
    """(the safe name or the name as stored, why the entry is refused or None)."""
    if has_control(name):
        return escape_control(name), "refused: control character in member name"
    if kind is not None:
        return name, f"refused: {kind} entry in archive (links and devices are never followed)"
    try:
        return storage.safe_key(name), None
    except storage.UnsafeKeyError as err:
        return name, f"refused: unsafe member name ({str(err).split(': ', 1)[-1]})"


def _too_large(size: int, limit: int) -> str:
    return f"member too large: {size:,} bytes, limit {limit:,} (--max-input-bytes)"


def _tar_kind(info: tarfile.TarInfo) -> str | None:
    if info.isreg():
        return None
    for test, kind in ((info.issym, "symbolic link"), (info.islnk, "hard link"), (info.ischr, "character device"),
                       (info.isblk, "block device"), (info.isfifo, "FIFO")):
        if test():
            return kind
    return f"special (type {info.type!r})"


class _LimitError(Exception):
    """An archive past one of its limits (not a format error: the message names the limit)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads an extended header's data (PAX records, GNU long names) whole, whatever size the header
    declares, recursing once per consecutive extended header, and collects GNU sparse maps without end: refuse
    all of that before it is read."""

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE):
            if self.size > MAX_HEADER_BYTES:
                raise _LimitError(f"extended tar header of {self.size:,} bytes, limit {MAX_HEADER_BYTES:,}")
            tarfile_.genray_extended = getattr(tarfile_, "genray_extended", 0) + 1
            if self.type == tarfile.XGLTYPE:
                tarfile_.genray_global = getattr(tarfile_, "genray_global", 0) + 1
            if tarfile_.genray_extended > MAX_EXTENDED_HEADERS or getattr(tarfile_, "genray_global", 0) \
                    > MAX_EXTENDED_HEADERS:
                raise _LimitError(f"more than {MAX_EXTENDED_HEADERS} extended tar headers in a row or in all")
        else:
            tarfile_.genray_extended = 0
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _LimitError("GNU sparse entry (not an image; its map is unbounded)")
        return super()._proc_member(tarfile_)


def _tar_members(fileobj, limits: Limits, wanted: Callable[[str, int], bool]) -> Iterator[Member]:
    # Python's tarfile in stream mode ('r|*': plain, gzip, bz2 or xz, detected from the bytes) rather than Ray
    # Data's read_webdataset: Ray's reader drops links and devices silently, passes '..' and absolute names on,
    # and turns a truncated shard into a failed read task (the whole job) instead of rows for what it could read.
    count = 0
    gz = fileobj.peek(2)[:2] == b"\x1f\x8b"
    # gzip ourselves rather than tarfile's stream: GzipFile checks the trailer's CRC and length when it reaches the
    # end (drained below), so a damaged .tar.gz is an error, not silently wrong bytes.
    source = gzip.GzipFile(fileobj=fileobj, mode="rb") if gz else fileobj
    try:
        with tarfile.open(fileobj=source, mode="r|" if gz else "r|*", tarinfo=_BoundedTarInfo) as tar:
            tar.fileobj = stream = _LastRead(tar.fileobj, limits.max_bytes)
            for info in tar:
                tar.members = []  # stream mode still remembers every header: forget them, memory stays flat
                count += 1
                if count > limits.max_members:
                    raise _LimitError(f"more than {limits.max_members:,} entries (--max-archive-members)")
                if info.isdir():
                    continue
                name, refused = _refusal(info.name, _tar_kind(info))
                if refused:
                    yield Member(name, error=refused, refused=True)
                elif info.size > limits.max_member_bytes:
                    yield Member(name, error=_too_large(info.size, limits.max_member_bytes))
                elif not wanted(name, info.size):
                    yield Member(name)  # its bytes are skipped by the stream, never held
                else:
                    try:
                        data = tar.extractfile(info).read()
                    except _FORMAT_ERRORS as err:
                        yield Member(name, error=f"truncated member ({_reason(err)})")
                        raise ArchiveError(f"truncated or corrupt archive: cannot read past member {name!r} "
                                           f"({_reason(err)})") from None
                    yield Member(name, data)
            # tarfile ends quietly at a header cut short or at the end of the bytes; only the end-of-archive
            # marker (a zero block) says the archive is whole.
            if stream.last != bytes(tarfile.BLOCKSIZE):
                raise ArchiveError(f"truncated archive: no end-of-archive marker after {count} entries")
            if gz:  # to the end of the gzip stream, in bounded pieces: the trailer (CRC32, length) is checked there
                while source.read(1 << 20):
                    stream.total += 1 << 20
                    if stream.total > limits.max_bytes:
                        raise _LimitError(f"more than {limits.max_bytes:,} bytes (--max-archive-bytes)")
    except _LimitError as err:
        raise ArchiveError(f"archive past a limit after {count} entries: {err}") from None
    except _FORMAT_ERRORS as err:
        where = f"after {count} entries" if count else "at the start"
        raise ArchiveError(f"truncated or corrupt archive: unreadable {where} ({_reason(err)})") from None


class _LastRead:
    """tarfile's decompressed stream, remembering the last bytes read (after the loop: the last header block) and
    counting them against the archive's byte limit."""

    def __init__(self, stream, max_bytes: int):
        self.stream, self.last, self.total, self.max_bytes = stream, b"", 0, max_bytes

    def read(self, size: int | None = None) -> bytes:
        self.last = self.stream.read(size)
        self.total += len(self.last)
        if self.total > self.max_bytes:
            raise _LimitError(f"more than {self.max_bytes:,} bytes (--max-archive-bytes)")
        return self.last

    def __getattr__(self, name: str):  # tell, seek, close
        return getattr(self.stream, name)


def _zip_members(fileobj, limits: Limits, wanted: Callable[[str, int], bool]) -> Iterator[Member]:
    try:
        # The central directory's own size and entry count, from its end record, before zipfile loads it whole.
        end = zipfile._EndRecData(fileobj)
        if end is not None:
            entries, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
            if entries > limits.max_members:
                raise ArchiveError(f"archive past a limit: {entries:,} entries, limit {limits.max_members:,} "
                                   f"(--max-archive-members)")
            if directory > MAX_ZIP_DIRECTORY_BYTES:
                raise ArchiveError(f"archive past a limit: a zip directory of {directory:,} bytes, limit "
                                   f"{MAX_ZIP_DIRECTORY_BYTES:,}")
        archive = zipfile.ZipFile(fileobj)
    except _FORMAT_ERRORS as err:  # the central directory, at the end, is what a truncated zip loses
        raise ArchiveError(f"truncated or corrupt zip archive ({_reason(err)})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_members:  # the end record may understate it
            raise ArchiveError(f"archive past a limit: {len(infos):,} entries, limit {limits.max_members:,} "
                               f"(--max-archive-members)")
        total = 0
        # Members of one WebDataset sample need not be adjacent in a zip: order by sample key so they are.
        for info in sorted(infos, key=lambda i: (sample_key(i.filename), i.filename)):
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
            elif info.file_size > limits.max_member_bytes:
                yield Member(name, error=_too_large(info.file_size, limits.max_member_bytes))
            elif not wanted(name, info.file_size):
                yield Member(name)
            else:
                total += info.file_size
                if total > limits.max_bytes:
                    raise ArchiveError(f"archive past a limit: more than {limits.max_bytes:,} bytes "
                                       f"(--max-archive-bytes)")
                try:
                    yield Member(name, _zip_read(fileobj, info))
                except _FORMAT_ERRORS as err:
                    yield Member(name, error=f"corrupt member ({_reason(err)})")


_ZIP_CHUNK = 64 << 10


def _zip_read(fileobj, info: zipfile.ZipInfo) -> bytes:
    """One zip member's bytes, never more than it declares: zipfile decompresses bzip2 and lzma members without an
    output bound (a member declaring 1 kB can inflate to gigabytes in one call), so the data is decompressed here
    with max_length, stopping one byte past the declared size. Then its length and CRC are checked."""
    fileobj.seek(info.header_offset)
    header = fileobj.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local file header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    fileobj.seek(info.header_offset + 30 + name_len + extra_len)
    left, want = info.compress_size, info.file_size
    method = info.compress_type
    if method == zipfile.ZIP_LZMA:  # 2 bytes version, 2 bytes properties size, the LZMA1 properties
        head = fileobj.read(4)
        props = fileobj.read(struct.unpack("<H", head[2:4])[0])
        left -= 4 + len(props)
        dec = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[
            lzma._decode_filter_properties(lzma.FILTER_LZMA1, props)])
    elif method == zipfile.ZIP_BZIP2:
        dec = bz2.BZ2Decompressor()
    elif method == zipfile.ZIP_DEFLATED:
        dec = zlib.decompressobj(-15)
    elif method == zipfile.ZIP_STORED:
        dec = None
    else:
        raise NotImplementedError(f"compression method {method}")
    out = bytearray()
    while True:
        chunk = fileobj.read(min(left, _ZIP_CHUNK)) if left > 0 else b""
        if left > 0 and not chunk:
            raise EOFError("member data cut short")
        left -= len(chunk)
        if dec is None:
            out += chunk
        else:
            data = chunk
            while True:  # bounded pieces until this chunk is used up (or the member is too long)
                room = want + 1 - len(out)
                if isinstance(dec, type(zlib.decompressobj())):
                    piece = dec.decompress(data, room)
                    data = dec.unconsumed_tail
                    more = bool(data)
                else:
                    piece = b"" if dec.eof else dec.decompress(data, room)
                    data = b""
                    more = not dec.eof and not dec.needs_input
                out += piece
                if len(out) > want or not more or not piece:
                    break
        if len(out) > want:
            raise zipfile.BadZipFile(f"member holds more than the {want:,} bytes it declares")
        if left <= 0:
            break
    if len(out) != want:
        raise zipfile.BadZipFile(f"member holds {len(out):,} bytes, not the {want:,} it declares")
    if zlib.crc32(out) != info.CRC:
        raise zipfile.BadZipFile("bad CRC-32")
    return bytes(out)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())[:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def group_samples(members: Iterable[Member], is_image: Callable[[str], bool],
                  max_sample_bytes: int = 1 << 30) -> Iterator[tuple[Member, list[Member]]]:
    """WebDataset samples: (image member, its sidecars) for every image, where the sidecars are the other
    non-image members of the same sample key next to it in the archive (key.json, key.txt, ...: SIDECAR_SUFFIXES,
    each at most SIDECAR_MAX_BYTES), given with the sample's first image only. Refused entries and unreadable
    images come as (member, []). Other non-image members are dropped. A sample holds at most MAX_SAMPLE_PARTS
    images and max_sample_bytes bytes (the images past that are error rows) and carries at most MAX_SIDECARS
    sidecars of MAX_SIDECAR_BYTES_PER_SAMPLE together. An ArchiveError is raised after the
    samples read before it."""
    run: list[Member] = []
    held = sidecar_bytes = 0
    images = sidecars_held = 0

    def flush() -> Iterator[tuple[Member, list[Member]]]:
        sidecars = [m for m in run if m.data is not None and not is_image(m.name) and is_sidecar(m.name)
                    and len(m.data) <= SIDECAR_MAX_BYTES]
        for member in run:
            if member.error is not None and (member.refused or is_image(member.name)):
                yield member, []
            elif member.error is None and is_image(member.name) and member.data is not None:
                yield member, sidecars
                sidecars = []

    try:
        for member in members:
            if run and (member.refused or run[-1].refused or sample_key(member.name) != sample_key(run[-1].name)):
                yield from flush()
                run, held, sidecar_bytes, images, sidecars_held = [], 0, 0, 0, 0
            size = len(member.data) if member.data is not None else 0
            if member.data is not None and is_image(member.name):
                if images >= MAX_SAMPLE_PARTS or held + size > max_sample_bytes:
                    why = (f"sample too large: more than {MAX_SAMPLE_PARTS} images" if images >= MAX_SAMPLE_PARTS
                           else f"sample too large: more than {max_sample_bytes:,} bytes (--max-sample-bytes)")
                    member, size = Member(member.name, error=why), 0  # its bytes are dropped here
                images += 1
            elif member.data is not None:  # a sidecar: the first few of the sample, within their joint cap
                if sidecars_held >= MAX_SIDECARS or sidecar_bytes + size > MAX_SIDECAR_BYTES_PER_SAMPLE:
                    member, size = Member(member.name), 0
                else:
                    sidecars_held, sidecar_bytes = sidecars_held + 1, sidecar_bytes + size
            held += size
            run.append(member)
    except ArchiveError:
        yield from flush()
        raise
    yield from flush()


# ------------------------------------------------------------------------------------------------ writing

def next_shard_index(prefix_uri: str) -> int:
    """1 + the highest shard-NNNNNN.tar directly under the prefix (0 if none): a new run never overwrites a shard,
    not even one a crashed run left behind."""
    # A failed listing raises: guessing 0 would make this run's first shard overwrite an existing shard-000000.
    names = [o.key for o in storage.list_objects(prefix_uri, suffixes=(".tar",)) if "/" not in o.key]
    indices = [int(found.group(1)) for found in map(SHARD_RE.fullmatch, names) if found]
    return max(indices, default=-1) + 1


class ShardWriter:
    """WebDataset-style shards shard-NNNNNN.tar under a prefix. A shard closes after `max_samples` samples, or
    before a sample would take it past `max_bytes`. Each shard is staged in a spooled temporary file (memory up to
    64 MB, then local disk) and written once, atomically (one PUT or a multipart upload that appears only when
    complete; a local rename), so no half-written shard is ever visible under its final name."""

    SPOOL_BYTES = 64 << 20

    def __init__(self, prefix_uri: str, max_samples: int, max_bytes: int | None = None,
                 start_index: int | None = None, before_commit: Callable[[], None] | None = None):
        """`before_commit()` runs before each shard is written and may refuse it by raising (a lost lease)."""
        if max_samples <= 0 or (max_bytes is not None and max_bytes <= 0):
            raise ValueError(f"shard limits must be positive, got {max_samples} samples, {max_bytes} bytes")
        self.prefix_uri, self.max_samples, self.max_bytes = prefix_uri, max_samples, max_bytes
        self.before_commit = before_commit
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
        if self.before_commit is not None:
            self.before_commit()
        name = SHARD_NAME.format(self.index)
        self._tar.close()  # end-of-archive blocks
        self._spool.seek(0)
        while True:
            uri = storage.join_uri(self.prefix_uri, name)
            try:  # never over an existing shard (another writer's, or one the listing missed): the next number
                storage.write_fileobj(uri, self._spool, if_absent=True)
                break
            except storage.StorageError as err:
                if err.reason != "exists":
                    raise
                self.index += 1
                name = SHARD_NAME.format(self.index)
                self._spool.seek(0)
        items = self._items
        self.abort()
        self.index += 1
        self.written.append(uri)
        return [(name, item) for item in items]

