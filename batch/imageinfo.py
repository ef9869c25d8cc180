"""Image facts read from bytes, never from what a server claims.

:class:`ImageVerifier` walks an image's container structure as its bytes stream
in, with bounded memory, and says whether the image is complete and how big it
is. It does not decode pixels: a structurally complete file with a corrupt
entropy-coded payload passes (PNG is the exception in part: every chunk CRC is
checked).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeAlias

from batch.errors import MalformedResponse

# The documented 4K maximum is 6336x2688 (~17 MP); a decompression-bomb header
# claims far more than this.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = (_PNG_SIG, b"\xff\xd8\xff", b"GIF87a", b"GIF89a")
_SNIFF_BYTES = 12
# Markers before the first SOF are metadata (EXIF, ICC...); past this the file is junk.
_JPEG_MAX_HEADER = 1024 * 1024
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_JPEG_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))
# Inside entropy-coded data FF is followed by 00 (stuffing), D0-D7 (restart) or FF (fill);
# anything else is the next marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PNG_COLOR_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


class ImageFormatError(MalformedResponse):
    """The bytes are not a complete image we know, or claim too many pixels."""


@dataclass(frozen=True)
class ImageInfo:
    """What an image's own bytes say it is."""

    mime: str
    ext: str  # "png", "jpg", "webp" or "gif"
    width: int
    height: int


def sniff_mime(head: bytes) -> str | None:
    """The image type the magic bytes say, or None if they are not an image we know."""
    if head.startswith(_PNG_SIG):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def _may_become_image(head: bytes) -> bool:
    """Whether more bytes could still make ``head`` a known signature."""
    if any(sig.startswith(head[: len(sig)]) for sig in _SIGNATURES):
        return True
    return b"RIFF".startswith(head[:4]) and b"WEBP".startswith(head[8:12])


def probe(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Type and size of a complete image held in memory; ImageFormatError if it is not one."""
    verifier = ImageVerifier(max_pixels=max_pixels)
    verifier.feed(data)
    return verifier.finish()


# What a format walker asks of the byte stream. Each yield is answered by send():
# _Need(n) -> exactly n bytes (buffered; n is small), _Skip(n, crc) -> the crc32 of the
# n bytes skipped, continuing ``crc`` (bytes never buffered; None: no crc wanted),
# _SCAN -> the code of the next JPEG marker after entropy-coded data.
@dataclass(frozen=True, slots=True)
class _Need:
    n: int


@dataclass(frozen=True, slots=True)
class _Skip:
    n: int
    crc: int | None = None


class _Scan:
    pass


_SCAN = _Scan()
_Op: TypeAlias = _Need | _Skip | _Scan
_Walker: TypeAlias = Generator[_Op, Any, None]


class ImageVerifier:
    """Checks an image as it streams in; raises ImageFormatError as soon as it can."""

    def __init__(self, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self._max_pixels = max_pixels
        self._head = b""  # until the signature is known
        self._mime = ""
        self._size: tuple[int, int] | None = None
        self._walker: _Walker | None = None
        self._op: _Op | None = None  # None once the walker is done
        self._acc = bytearray()  # for _Need
        self._left = 0  # for _Skip
        self._crc: int | None = None
        self._ff_pending = False  # for _SCAN: the last byte seen was FF
        self._seen = 0  # bytes handed to the walker
        self._at = 0  # offset of the next byte the walker will get
        self._riff_end: int | None = None  # WebP: where the RIFF size says the file ends
        self._failed: ImageFormatError | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the image."""
        if self._failed is not None:
            raise self._failed
        try:
            if self._walker is None:
                self._head += chunk
                if self._start():
                    head, self._head = self._head, b""
                    self._run(head)
            elif chunk:
                self._run(chunk)
        except ImageFormatError as exc:
            self._failed = exc
            raise

    def finish(self) -> ImageInfo:
        """The image's facts; ImageFormatError if it is incomplete."""
        if self._failed is not None:
            raise self._failed
        if self._walker is None:
            raise ImageFormatError("not an image: too short to tell")
        # A finished WebP walk has consumed exactly the RIFF size: _run refuses more.
        if self._op is not None or self._size is None:
            raise ImageFormatError(f"truncated {self._mime} ({self._seen} bytes)")
        ext = {"image/jpeg": "jpg"}.get(self._mime, self._mime.removeprefix("image/"))
        return ImageInfo(self._mime, ext, *self._size)

    def _start(self) -> bool:
        mime = sniff_mime(self._head)
        if mime is None:
            if len(self._head) >= _SNIFF_BYTES or not _may_become_image(self._head):
                raise ImageFormatError("not an image: unknown signature " + self._head[:12].hex())
            return False
        self._mime = mime
        walkers = {"image/png": self._png, "image/jpeg": self._jpeg}
        walkers |= {"image/webp": self._webp, "image/gif": self._gif}
        self._walker = walkers[mime]()
        self._op = next(self._walker)
        self._begin(self._op)
        return True

    def _begin(self, op: _Op) -> None:
        if type(op) is _Skip:
            self._left = op.n
            self._crc = op.crc

    def _run(self, data: bytes) -> None:
        """Hand ``data`` to the walker, op by op, slicing rather than looping over bytes."""
        view = memoryview(data)
        pos, end, base = 0, len(data), self._seen
        self._seen += end
        if self._riff_end is not None and self._seen > self._riff_end:
            raise ImageFormatError("WebP has bytes after its RIFF size")
        while (op := self._op) is not None:
            result: Any
            if type(op) is _Skip:
                take = min(self._left, end - pos)
                if self._crc is not None:
                    self._crc = zlib.crc32(view[pos : pos + take], self._crc)
                pos += take
                self._left -= take
                if self._left:
                    return
                result = self._crc
            elif type(op) is _Need:
                want = op.n - len(self._acc)
                self._acc += view[pos : pos + want]
                pos = min(pos + want, end)
                if len(self._acc) < op.n:
                    return
                result = bytes(self._acc)
                self._acc.clear()
            else:
                found = self._scan(data, pos)
                if found is None:
                    return
                result, pos = found
            assert self._walker is not None
            self._at = base + pos
            try:
                self._op = self._walker.send(result)
            except StopIteration:
                self._op = None
                break
            self._begin(self._op)
        # Bytes after the end marker of PNG/JPEG/GIF are ignored: some encoders and
        # proxies pad files, and the image itself has been seen complete. (WebP is
        # checked above: its RIFF size states the length outright.)

    def _scan(self, data: bytes, pos: int) -> tuple[int, int] | None:
        """(marker code, position after it) of the next JPEG marker, or None to wait."""
        if self._ff_pending and pos < len(data):
            code = data[pos]
            if code not in (0x00, 0xFF) and not 0xD0 <= code <= 0xD7:
                self._ff_pending = False
                return code, pos + 1
            self._ff_pending = code == 0xFF
        match = _JPEG_MARKER.search(data, pos)
        if match is None:
            if len(data) > pos:
                self._ff_pending = data[-1] == 0xFF
            return None
        self._ff_pending = False
        return data[match.end() - 1], match.end()

    def _set_size(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise ImageFormatError(f"{self._mime} claims an empty size {width}x{height}")
        if width * height > self._max_pixels:
            raise ImageFormatError(
                f"{self._mime} claims {width}x{height} pixels, over the cap of {self._max_pixels}"
            )
        self._size = (width, height)

    def _png(self) -> _Walker:
        yield _Need(8)
        first, seen_idat = True, False
        while True:
            length, ctype = struct.unpack(">I4s", (yield _Need(8)))
            if length > 0x7FFFFFFF or not ctype.isalpha():
                raise ImageFormatError(f"PNG chunk header is corrupt: {ctype!r} {length}")
            if first != (ctype == b"IHDR"):
                raise ImageFormatError("PNG must start with exactly one IHDR chunk")
            crc = zlib.crc32(ctype)
            if first:
                if length != 13:
                    raise ImageFormatError("PNG IHDR has the wrong length")
                ihdr = yield _Need(13)
                crc = zlib.crc32(ihdr, crc)
                width, height, depth, color = struct.unpack(">IIBB", ihdr[:10])
                if depth not in _PNG_COLOR_DEPTHS.get(color, ()):
                    raise ImageFormatError(f"PNG IHDR has color type {color}, depth {depth}")
                self._set_size(width, height)
                first = False
            else:
                crc = yield _Skip(length, crc)
            (stored,) = struct.unpack(">I", (yield _Need(4)))
            if stored != crc:
                raise ImageFormatError(f"PNG {ctype.decode()} chunk has a bad CRC")
            seen_idat = seen_idat or ctype == b"IDAT"
            if ctype == b"IEND":
                if not seen_idat:
                    raise ImageFormatError("PNG has no IDAT chunk")
                return

    def _jpeg(self) -> _Walker:
        yield _Need(2)  # SOI, already sniffed
        in_scan = scanned = False
        while True:
            if in_scan:
                code = yield _SCAN
            else:
                if self._size is None and self._at > _JPEG_MAX_HEADER:
                    raise ImageFormatError("JPEG has no frame header in its first MiB")
                if (yield _Need(1)) != b"\xff":
                    raise ImageFormatError("JPEG segment does not start with a marker")
                code = 0xFF
                while code == 0xFF:  # fill bytes
                    code = (yield _Need(1))[0]
            if code == 0xD9:
                if not scanned:
                    raise ImageFormatError("JPEG ends before any image data")
                return
            if code in _JPEG_STANDALONE:
                continue
            if code in (0x00, 0xD8):
                raise ImageFormatError(f"JPEG has a stray marker FF{code:02X}")
            (length,) = struct.unpack(">H", (yield _Need(2)))
            if length < 2:
                raise ImageFormatError("JPEG segment length is corrupt")
            in_scan = False
            if code in _JPEG_SOF and self._size is None:
                if length < 8:
                    raise ImageFormatError("JPEG frame header is too short")
                _, height, width = struct.unpack(">BHH", (yield _Need(5)))
                self._set_size(width, height)  # height 0 (DNL) is not supported
                yield _Skip(length - 7)
            elif code == 0xDA:
                if self._size is None:
                    raise ImageFormatError("JPEG scan before the frame header")
                yield _Skip(length - 2)
                in_scan = scanned = True
            else:
                yield _Skip(length - 2)

    def _webp(self) -> _Walker:
        (riff_size,) = struct.unpack("<I", (yield _Need(12))[4:8])
        end = self._riff_end = riff_size + 8
        if self._seen > end:
            raise ImageFormatError("WebP has bytes after its RIFF size")
        pos = 12
        while pos < end:
            if end - pos < 8:
                raise ImageFormatError("WebP chunk header crosses the RIFF end")
            fourcc, size = struct.unpack("<4sI", (yield _Need(8)))
            padded = size + (size & 1)
            if pos + 8 + padded > end:
                raise ImageFormatError(f"WebP {fourcc!r} chunk crosses the RIFF end")
            used = 0
            if pos == 12:
                used = {b"VP8 ": 10, b"VP8L": 5, b"VP8X": 10}.get(fourcc, 0)
                if not used or size < used:
                    raise ImageFormatError(f"WebP starts with a {fourcc!r} chunk")
                self._set_size(*_webp_size(fourcc, (yield _Need(used))))
            yield _Skip(padded - used)
            pos += 8 + padded
        if self._size is None:
            raise ImageFormatError("WebP has no image chunk")

    def _gif(self) -> _Walker:
        header = yield _Need(13)
        width, height, packed = struct.unpack("<HHB", header[6:11])
        self._set_size(width, height)
        if packed & 0x80:
            yield _Skip(3 << ((packed & 7) + 1))  # global color table
        frames = 0
        while True:
            block = (yield _Need(1))[0]
            if block == 0x3B:
                if not frames:
                    raise ImageFormatError("GIF has no image")
                return
            if block == 0x21:
                yield _Need(1)  # extension label
            elif block == 0x2C:
                descriptor = yield _Need(9)
                left, top, w, h, packed = struct.unpack("<HHHHB", descriptor)
                if left + w > width or top + h > height:
                    # Decoders disagree on such a file's size (Pillow grows the canvas).
                    raise ImageFormatError(
                        f"GIF frame {w}x{h} lies outside its {width}x{height} screen"
                    )
                if packed & 0x80:
                    yield _Skip(3 << ((packed & 7) + 1))  # local color table
                yield _Need(1)  # LZW minimum code size
                frames += 1
            else:
                raise ImageFormatError(f"GIF has an unknown block 0x{block:02X}")
            while size := (yield _Need(1))[0]:  # data sub-blocks, up to an empty one
                yield _Skip(size)


def _webp_size(fourcc: bytes, data: bytes) -> tuple[int, int]:
    """Canvas width and height from the first bytes of a VP8/VP8L/VP8X chunk."""
    if fourcc == b"VP8 ":
        if data[0] & 1 or data[3:6] != b"\x9d\x01\x2a":
            raise ImageFormatError("WebP VP8 chunk is not a key frame")
        width, height = struct.unpack("<HH", data[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if fourcc == b"VP8L":
        if data[0] != 0x2F:
            raise ImageFormatError("WebP VP8L chunk has a bad signature")
        (bits,) = struct.unpack("<I", data[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    width = int.from_bytes(data[4:7], "little") + 1
    height = int.from_bytes(data[7:10], "little") + 1
    return width, height
