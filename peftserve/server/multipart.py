"""A streaming ``multipart/form-data`` reader (RFC 7578) that never buffers a file part.

Parts come one at a time from ``MultipartReader.next_part()``; a part's data is read with
``Part.chunks()`` as it arrives, keeping in memory only what may be the start of the next
boundary. Header blocks and the preamble are bounded, so a malformed body cannot grow the
buffer without limit. It runs on a blocking byte source (an iterator of chunks), so the
registry can stage a part straight from the network in a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024
"""Largest header block of one part (and largest preamble)."""

_BOUNDARY_RE = re.compile(r"""boundary=(?:"([^"]{1,200})"|([^\s;,"]{1,200}))""", re.IGNORECASE)
_PARAM_RE = re.compile(r""";\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))""")


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data."""


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; MultipartError otherwise."""
    if not content_type or content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise MultipartError(
            "send the adapter as multipart/form-data with the parts adapter_config.json and "
            f"adapter_model.safetensors (got Content-Type {content_type or 'none'!r})"
        )
    match = _BOUNDARY_RE.search(content_type)
    if match is None:
        raise MultipartError("the multipart/form-data Content-Type has no boundary")
    return (match.group(1) or match.group(2)).encode("latin-1")


@dataclass
class Part:
    """One part's headers; its data comes from ``chunks()`` (once)."""

    name: str | None
    filename: str | None
    reader: MultipartReader

    def chunks(self) -> Iterator[bytes]:
        return self.reader.part_chunks(self)

    def read(self, limit: int) -> bytes:
        """The whole part; ``OverflowError`` if it is longer than ``limit`` bytes."""
        data = bytearray()
        for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                raise OverflowError(f"part {self.name!r} is longer than {limit} bytes")
        return bytes(data)


class MultipartReader:
    """Reads parts from ``source`` (an iterator of byte chunks) separated by ``boundary``."""

    def __init__(self, source: Iterator[bytes], boundary: bytes) -> None:
        self._source = source
        self._delimiter = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")  # the first delimiter has no CRLF before it
        self._current: Part | None = None
        """The part whose data is being read; None between parts."""
        self._started = False
        self._done = False

    def next_part(self) -> Part | None:
        """Headers of the next part (skipping what is left of the current one); None at the end."""
        if self._done:
            return None
        if not self._started:
            self._skip_preamble()
            self._started = True
        elif self._current is not None:
            for _ in self.part_chunks(self._current):
                pass
        if self._take_closing():
            self._done = True
            return None
        self._current = self._read_headers()
        return self._current

    def part_chunks(self, part: Part) -> Iterator[bytes]:
        """The data of ``part`` up to the next delimiter (which is consumed)."""
        if part is not self._current:
            raise MultipartError("parts must be read in order")
        keep = len(self._delimiter) - 1
        while True:
            end = self._buf.find(self._delimiter)
            if end >= 0:
                data = bytes(self._buf[:end])
                del self._buf[: end + len(self._delimiter)]
                self._current = None
                if data:
                    yield data
                return
            if len(self._buf) > keep:
                data = bytes(self._buf[:-keep])
                del self._buf[:-keep]
                yield data
            if not self._fill():
                raise MultipartError("the body ended in the middle of a part")

    def _fill(self) -> bool:
        chunk = next(self._source, None)
        if chunk is None:
            return False
        self._buf += chunk
        return True

    def _skip_preamble(self) -> None:
        while (start := self._buf.find(self._delimiter)) < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise MultipartError("no multipart boundary at the start of the body")
            if not self._fill():
                raise MultipartError("the body holds no multipart boundary")
        del self._buf[: start + len(self._delimiter)]

    def _take_closing(self) -> bool:
        """After a delimiter: True for the closing ``--``, False for CRLF and a part."""
        while len(self._buf) < 2:
            if not self._fill():
                raise MultipartError("the body ended after a boundary")
        head = bytes(self._buf[:2])
        if head == b"--":
            return True
        if head != b"\r\n":
            raise MultipartError("a multipart boundary is followed by neither CRLF nor '--'")
        del self._buf[:2]
        return False

    def _read_headers(self) -> Part:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise MultipartError("a part's headers are too long")
            if not self._fill():
                raise MultipartError("the body ended in a part's headers")
        block = bytes(self._buf[:end]).decode("utf-8", errors="replace")
        del self._buf[: end + 4]
        part = Part(None, None, self)
        for line in block.split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                params = _params(value)
                part.name, part.filename = params.get("name"), params.get("filename")
        return part


def _params(header: str) -> dict[str, str]:
    """Parameters of a Content-Disposition value: ``form-data; name="a"; filename="b"``."""
    params = {}
    for match in _PARAM_RE.finditer(header):
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare.strip()
        params[match.group(1).lower()] = value
    return params
