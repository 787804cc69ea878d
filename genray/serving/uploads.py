"""Upload bodies as the gateway receives them: raw image bytes (`curl --data-binary @x.png`), or a
`multipart/form-data` form (`curl -F image=@x.png`, HTML forms, most HTTP clients) whose image part is kept.

Both are fed chunk by chunk from the gateway's counted read loop, so the size limit (413) and the read timeout (408)
hold for forms exactly as for raw bodies, before anything is decoded. A form is parsed as it streams in
(python-multipart, the parser Starlette uses), keeping only the image's bytes: nothing is spooled to disk and the
image is held once, as a raw body is.
"""
from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

IMAGE_FIELD = "image"
MAX_PARTS = 64  # a form carrying an image has a few parts; thousands of tiny ones are not an upload
USAGE = f"send the file as the form field `{IMAGE_FIELD}` (curl -F {IMAGE_FIELD}=@photo.png)"


class UploadError(ValueError):
    """The body is not a usable upload (a malformed form, no image in it); the message is the user-facing reason."""


class RawBody:
    """The body as it is: the image's own bytes."""

    def __init__(self):
        self.chunks: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def result(self) -> bytes:
        return _join(self.chunks)


class _Part:
    def __init__(self, name: str, filename: str | None):
        self.name, self.filename, self.chunks = name, filename, []


class FormImage:
    """The image of a multipart/form-data body: the part named `image`, else the form's only file part. Other
    parts (text fields, further files once an `image` part has been seen) are parsed and dropped."""

    def __init__(self, content_type: str):
        _, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if not boundary:
            raise UploadError("multipart/form-data without a boundary in Content-Type")
        self.parts: list[_Part] = []  # kept: candidates for the image
        self.num_parts = 0
        self._current: _Part | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._field = self._value = b""
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data})

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as err:
            raise UploadError(f"malformed multipart/form-data body ({err})") from None

    def result(self) -> bytes:
        try:
            self.parser.finalize()
        except MultipartParseError as err:
            raise UploadError(f"malformed multipart/form-data body ({err})") from None
        named = [p for p in self.parts if p.name == IMAGE_FIELD]
        files = [p for p in self.parts if p.filename is not None]
        if len(named) > 1:
            raise UploadError(f"the form has {len(named)} `{IMAGE_FIELD}` fields; send one image per request")
        if named:
            return _join(named[0].chunks)
        if len(files) == 1:
            return _join(files[0].chunks)
        if files:
            raise UploadError(f"the form has {len(files)} files and none named `{IMAGE_FIELD}`; {USAGE}")
        raise UploadError(f"the form has no image; {USAGE}")

    # -- python-multipart callbacks (data arrives as slices of the chunk being parsed) ----------------------

    def _part_begin(self) -> None:
        self.num_parts += 1
        if self.num_parts > MAX_PARTS:
            raise UploadError(f"the form has more than {MAX_PARTS} parts")
        self._current, self._headers = None, []

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers.append((self._field.lower(), self._value))
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        disposition = next((v for k, v in self._headers if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition.decode("latin-1"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        have_image = any(p.name == IMAGE_FIELD for p in self.parts)
        if name == IMAGE_FIELD or (filename is not None and not have_image):
            self._current = _Part(name, filename)
            self.parts.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.chunks.append(data[start:end])


def body_reader(content_type: str | None) -> RawBody | FormImage:
    """What collects the upload for this Content-Type: a form's image part, or the raw body."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return FormImage(content_type or "") if media == "multipart/form-data" else RawBody()


def _join(chunks: list[bytes]) -> bytes:
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    chunks.clear()  # the joined bytes are the only copy from here on
    return body
