"""Provenance inside each image: which job, prompt, model and endpoint made it, and when.

An image copied out of the output folder loses its results line, so the same
facts travel in the file as an XMP packet: a PNG ``iTXt`` chunk keyed
``XML:com.adobe.xmp`` (just before ``IEND``), a JPEG APP1 segment (after the
JFIF/Exif segments), a WebP ``XMP `` chunk (the file is made extended, VP8X,
when it was simple). :class:`ImageStamp` adds it while the image streams to
disk: a small state machine over the container's chunk headers, holding at
most a JPEG's metadata segments, so memory does not grow with the image and
the output does not depend on how the stream was cut. Pixel data and every
chunk the server sent stay byte for byte; a file that already carries XMP or
a C2PA manifest (whose hash would break) is left exactly as it came.
Reading back (``imgbatch inspect``) is :mod:`batch.xmpread`.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from batch import __version__
from batch.jobs import InputKind, Job

log = logging.getLogger(__name__)

NAMESPACE = "urn:imgbatch:provenance:1/"
PNG_XMP_KEY = b"XML:com.adobe.xmp"
JPEG_XMP_HEAD = b"http://ns.adobe.com/xap/1.0/\0"
FIELD_CHARS = 5000  # per text field: the JPEG APP1 segment holds at most 65,533 bytes
HOLD_BYTES = 1 << 20  # JPEG metadata segments held until the scan starts; beyond, no stamp
# What XML 1.0 forbids, spelt as the complement of what it allows: the negated class
# compiles 10x slower (5 ms of every start).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_PLAIN = re.compile("[\u0020-\u0025\u0027-\u003b\u003d\u003f-\u007e]*")  # nothing to escape
FIELDS = ("job_id", "prompt", "model", "provider", "endpoint", "settings", "created", "tool")


@dataclass(frozen=True)
class Provenance:
    """What an image says about itself."""

    job_id: str
    prompt: str
    model: str
    provider: str
    endpoint: str
    settings: Mapping[str, Any]
    created: str  # ISO 8601, UTC
    tool: str = f"imgbatch {__version__}"

    def xmp(self) -> bytes:
        """The XMP packet (UTF-8), each text field capped so it fits a JPEG segment."""
        values = {
            "job_id": self.job_id, "prompt": self.prompt, "model": self.model,
            "provider": self.provider, "endpoint": self.endpoint,
            "settings": json.dumps(self.settings, ensure_ascii=False, sort_keys=True),
            "created": self.created, "tool": self.tool,
        }
        props = "".join(
            f"<imgbatch:{tag}>{_text(values[name])}</imgbatch:{tag}>"
            for name, tag in zip(FIELDS, _TAGS, strict=True)
        )
        return (
            '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:imgbatch="{NAMESPACE}"'
            ' xmlns:xmp="http://ns.adobe.com/xap/1.0/">'
            f"<xmp:CreatorTool>{_text(self.tool)}</xmp:CreatorTool>"
            f"<xmp:CreateDate>{_text(self.created)}</xmp:CreateDate>"
            f"{props}</rdf:Description></rdf:RDF></x:xmpmeta>"
            '<?xpacket end="r"?>'
        ).encode()


def _tag(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


_TAGS = tuple(_tag(name) for name in FIELDS)


def _text(value: str) -> str:
    if len(value) <= FIELD_CHARS and _PLAIN.fullmatch(value):
        return value  # the usual case, a few microseconds cheaper per field
    clean = _NOT_XML.sub("\ufffd", value)
    if len(clean) > FIELD_CHARS:
        clean = clean[: FIELD_CHARS - 1] + "…"
    return escape(clean)


def job_settings(job: Job) -> dict[str, Any]:
    """The settings that shaped a job's request, input images by source (data URLs cut short)."""
    inputs = [
        image.source if image.kind is not InputKind.DATA else image.source[:40] + "…"
        for image in job.images
    ]
    return {
        "aspect_ratio": job.aspect_ratio,
        "image_size": job.image_size,
        "params": dict(job.params),
        "input_images": inputs,
    }


def public_endpoint(url: str) -> str:
    """The endpoint without credentials, query or fragment."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


class Stamper:
    """Makes one :class:`ImageStamp` per image of a job; what the client is configured with."""

    def __init__(
        self, provider: str, endpoint: str, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.provider = provider
        self.endpoint = public_endpoint(endpoint)
        self._clock = clock or (lambda: datetime.now(UTC))

    def __call__(self, job: Job) -> ImageStamp:
        created = self._clock().isoformat(timespec="seconds").replace("+00:00", "Z")
        facts = Provenance(job.id, job.prompt, job.model, self.provider, self.endpoint,
                           job_settings(job), created)
        return ImageStamp(facts.xmp(), job.id)


# A walker yields ("need", n) to receive the next n bytes, or ("pass", n) to let the next
# n bytes through untouched; when it returns, the rest of the stream passes through.
# Every byte received is held (in order) until the walker releases it, replaces it or
# inserts the packet before it, so nothing is lost or reordered whatever the cut.
_Request = tuple[str, int]
_Walker = Generator[_Request, bytes | None, None]


class ImageStamp:
    """A streaming transform that adds an XMP packet to a PNG, JPEG or WebP stream.

    ``feed`` returns the bytes to store for the bytes given; ``finish`` what
    is left. Anything that is not one of those formats, or is malformed,
    passes through unchanged (the verifier downstream judges it).
    """

    def __init__(self, xmp: bytes, job_id: str = "") -> None:
        self._xmp = xmp
        self._job_id = job_id
        self.embedded = False
        self.skipped: str | None = None  # why the packet was not added
        self._out: list[bytes] = []
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._buf = bytearray()
        self._need = 0
        self._pass = 0
        self._walker: _Walker | None = self._dispatch()
        self._step(None)

    def feed(self, data: bytes) -> bytes:
        # Past the packet's place, or inside a chunk passed through: no copy.
        if self._walker is None or not data:
            return data
        if self._pass >= len(data):
            self._pass -= len(data)
            if not self._pass:
                self._step(None)  # may emit what follows the passed bytes
                return data + self._drain() if self._out else data
            return data
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._walker is None:
                self._out.append(bytes(view[pos:]))
                break
            if self._pass:
                take = min(self._pass, end - pos)
                self._out.append(bytes(view[pos:pos + take]))
                pos += take
                self._pass -= take
                if not self._pass:
                    self._step(None)
            else:
                take = min(self._need - len(self._buf), end - pos)
                self._buf += view[pos:pos + take]
                pos += take
                if len(self._buf) == self._need:
                    got = bytes(self._buf)
                    self._buf.clear()
                    self._held.append(got)
                    self._held_bytes += len(got)
                    self._step(got)
        return self._drain()

    def finish(self) -> bytes:
        """The bytes still held (a stream cut short is stored as it came)."""
        if self._walker is not None and self.skipped is None and not self.embedded:
            self.skipped = "the image ended before the place for the packet"
        self._walker = None
        self._release()
        self._out.append(bytes(self._buf))
        self._buf.clear()
        return self._drain()

    def _drain(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def _release(self) -> None:
        self._out.extend(self._held)
        self._held.clear()
        self._held_bytes = 0

    def _replace_held(self, piece: bytes) -> None:
        self._held = [piece]
        self._held_bytes = len(piece)

    def _step(self, value: bytes | None) -> None:
        while self._walker is not None:
            try:
                kind, size = self._walker.send(value)
            except StopIteration:
                self._walker = None
                self._release()
                return
            value = b""
            if kind == "need" and size > 0:
                self._need = size
                return
            if kind == "pass":
                self._release()
                if size > 0:
                    self._pass = size
                    return

    def _skip(self, reason: str) -> None:
        self.skipped = reason
        log.info("%s: provenance not embedded: %s", self._job_id or "image", reason)

    def _embed(self, piece: bytes) -> None:
        """Insert ``piece`` before the bytes held."""
        self._out.append(piece)
        self._release()
        self.embedded = True

    # -- the formats -------------------------------------------------------------

    def _dispatch(self) -> _Walker:
        head = yield ("need", 2)
        if head == b"\x89P":
            return (yield from self._png())
        if head == b"\xff\xd8":
            return (yield from self._jpeg())
        if head == b"RI":
            return (yield from self._webp(head or b""))
        self._skip("not a PNG, JPEG or WebP stream")

    def _png(self) -> _Walker:
        rest = yield ("need", 6)
        if rest != b"NG\r\n\x1a\n":
            return
        reason = ""
        while True:
            header = yield ("need", 8)
            assert header is not None
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"IDAT", b"IEND"):  # before the pixels, where every reader looks
                if reason:
                    self._skip(reason)
                else:
                    self._embed(_png_chunk(b"iTXt", PNG_XMP_KEY + b"\0\0\0\0\0" + self._xmp))
                return
            if kind == b"caBX":
                reason = "it carries a C2PA manifest"
            left = length + 4
            if kind == b"iTXt" and length >= len(PNG_XMP_KEY) + 1:
                key = yield ("need", len(PNG_XMP_KEY) + 1)
                if key == PNG_XMP_KEY + b"\0":
                    reason = reason or "it carries XMP"
                left -= len(PNG_XMP_KEY) + 1
            yield ("pass", left)

    def _jpeg(self) -> _Walker:
        holding = False  # past the leading JFIF/Exif segments: held until the scan
        reason = ""
        while True:
            marker = yield ("need", 2)
            assert marker is not None
            code = marker[1]
            if marker[0] != 0xFF or code == 0xFF or code == 0x01 or 0xD0 <= code <= 0xD8:
                self._skip(f"unexpected JPEG marker {marker.hex()} in the header")
                return
            if code in (0xDA, 0xD9):  # start of scan (or an empty image): place it here
                if reason:
                    self._skip(reason)
                else:  # before the segments held since the JFIF/Exif ones, and this marker
                    self._embed(_jpeg_segment(self._xmp))
                return
            size = yield ("need", 2)
            assert size is not None
            (length,) = struct.unpack(">H", size)
            if length < 2:
                self._skip("a JPEG segment length below 2")
                return
            peek = (yield ("need", min(length - 2, 64))) or b""
            if code == 0xE1 and peek.startswith(JPEG_XMP_HEAD):
                reason = reason or "it carries XMP"
            if code == 0xEB and peek[:2] == b"JP":  # JUMBF: a C2PA manifest
                reason = "it carries a C2PA manifest"
            lead = code == 0xE0 or (code == 0xE1 and peek.startswith(b"Exif\0"))
            holding = holding or not lead
            if not holding:
                yield ("pass", length - 2 - len(peek))
                continue
            yield ("need", length - 2 - len(peek))
            if self._held_bytes > HOLD_BYTES:
                self._skip("its metadata segments exceed 1 MiB")
                return

    def _webp(self, head: bytes) -> _Walker:
        rest = yield ("need", 18)
        assert rest is not None
        riff = head + rest
        declared, form, fourcc, size = struct.unpack("<4xI4s4sI", riff)
        first = {b"VP8X": 10, b"VP8 ": 10, b"VP8L": 5}.get(fourcc, 0)
        if riff[:4] != b"RIFF" or form != b"WEBP" or not first or size < first:
            self._skip("not a WebP stream it can extend")
            return
        body = yield ("need", first)
        assert body is not None
        padded = size + (size & 1)
        after = declared + 8 - 20 - padded  # bytes of later chunks up to the RIFF end
        xmp = _webp_chunk(b"XMP ", self._xmp)
        if after < 0:
            self._skip("its WebP sizes are inconsistent")
            return
        if fourcc == b"VP8X":
            if body[0] & 0x04:
                self._skip("it carries XMP")
                return
            extended = b""
            body = bytes([body[0] | 0x04]) + body[1:]
        else:
            width, height, alpha = _simple_canvas(fourcc, body)
            if not width:
                self._skip("its WebP frame header is unreadable")
                return
            flags = 0x04 | (0x10 if alpha else 0)
            extended = _webp_chunk(b"VP8X", bytes([flags, 0, 0, 0])
                                   + (width - 1).to_bytes(3, "little")
                                   + (height - 1).to_bytes(3, "little"))
        grown = declared + len(extended) + len(xmp)
        self._replace_held(b"RIFF" + struct.pack("<I", grown) + b"WEBP" + extended
                           + riff[12:] + body)
        yield ("pass", padded - first + after)
        self._embed(xmp)


def _simple_canvas(fourcc: bytes, body: bytes) -> tuple[int, int, bool]:
    """Width, height and alpha of a simple (VP8/VP8L) WebP, or zeros if unreadable."""
    if fourcc == b"VP8 ":
        if body[0] & 1 or body[3:6] != b"\x9d\x01\x2a":
            return 0, 0, False
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF, False
    if body[0] != 0x2F:
        return 0, 0, False
    (bits,) = struct.unpack("<I", body[1:5])
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _jpeg_segment(xmp: bytes) -> bytes:
    payload = JPEG_XMP_HEAD + xmp
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _webp_chunk(fourcc: bytes, data: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) & 1 else b"")
