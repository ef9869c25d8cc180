"""The simulator's images: real PNGs at the documented sizes, and a JPEG to mislabel.

A PNG is a horizontal gradient in a colour taken from the prompt's hash, topped
by a band naming the job (its id and the prompt's first words, drawn with
Pillow's default font and scaled up, so a gallery shows which picture is
which), carries the request in a tEXt chunk and, when asked, an incompressible
padding chunk up to a target size. Image data is cached per size, colour and
label, and the band's repeated rows are filtered to zeros, so even 4K answers
are cheap to serve; images narrower than ``LABEL_MIN_WIDTH`` get no band.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import math
import os
import struct
import zlib
from types import MappingProxyType

from PIL import Image, ImageDraw, ImageFont

# Documented 1K output sizes of gemini-3-pro-image; 2K and 4K multiply both sides.
BASE_DIMS = MappingProxyType({
    "1:1": (1024, 1024), "2:3": (848, 1264), "3:2": (1264, 848), "3:4": (896, 1200),
    "4:3": (1200, 896), "4:5": (928, 1152), "5:4": (1152, 928), "9:16": (768, 1376),
    "16:9": (1376, 768), "21:9": (1584, 672),
})
SIZE_FACTOR = MappingProxyType({"1K": 1, "2K": 2, "4K": 4})
TEXT_KEYWORD = b"imgbatch-request"
LABEL_MIN_WIDTH = 256  # below, the text would be unreadable: no band (and no cost)
LABEL_CHARS = 30
# A 16x16 baseline JPEG (made with Pillow), served when the gateway mislabels its output.
_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERX"
    "RTc4UG1RV19iZ2hnPk1xeXBkeFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2Nj"
    "Y2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2P/wAARCAAQABADASIAAhEBAxEB/8QAFQABAQAAAAAAAAAAAAAAAAAA"
    "BQb/xAAXEAEAAwAAAAAAAAAAAAAAAAAEACEx/8QAFQEBAQAAAAAAAAAAAAAAAAAAAAL/xAAZEQACAwEAAAAAAAAA"
    "AAAAAAAABAMFITH/2gAMAwEAAhEDEQA/AJ84cqJnDlRM4cqJnDlSpWxXvc0//9k="
)


def image_dims(aspect_ratio: str, image_size: str, scale: float = 1.0) -> tuple[int, int]:
    """Output size: table size times size factor times scale, rounded half up, at least 1."""
    w, h = BASE_DIMS[aspect_ratio]
    k = SIZE_FACTOR[image_size] * scale
    return max(1, math.floor(w * k + 0.5)), max(1, math.floor(h * k + 0.5))


def request_text(sha: str, n: int) -> bytes:
    """The tEXt (or JPEG comment) payload naming the request an image answers."""
    return TEXT_KEYWORD + b"\0" + json.dumps({"prompt_sha256": sha, "n": n}).encode()


def colour(sha: str, index: int) -> bytes:
    """RGB of an answer's ``index``-th image; further images get their own bytes."""
    seed = sha if index == 0 else hashlib.sha256(f"{sha}:{index}".encode()).hexdigest()
    return bytes.fromhex(seed[:6])


def jpeg(meta: bytes) -> bytes:
    """The embedded JPEG with ``meta`` in a comment segment."""
    end = 4 + struct.unpack(">H", _JPEG[4:6])[0]  # after the APP0 (JFIF) segment
    comment = b"\xff\xfe" + struct.pack(">H", len(meta) + 2) + meta
    return _JPEG[:end] + comment + _JPEG[end:]


def label_lines(job_id: str, prompt: str) -> list[str]:
    """The band's text: the job id and the prompt's first words, each cut to fit."""
    words = ""
    for word in prompt.split():
        if len(words) + len(word) + 1 > LABEL_CHARS:
            words += " …" if words else word[: LABEL_CHARS - 1] + "…"
            break
        words = f"{words} {word}".strip()
    lines = [job_id[:LABEL_CHARS] if job_id else "", words]
    return [line for line in lines if line]


def label_rows(width: int, height: int, lines: list[str], rgb: bytes) -> list[bytes]:
    """PNG rows (filter byte first) of a band showing ``lines``, white on a dark ``rgb``.

    Drawn small, then scaled up by repeating pixels: each drawn row becomes one
    unfiltered row followed by identical rows filtered "Up", which are zeros.
    """
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), line, font=font) for line in lines]
    line_h = math.ceil(max(b[3] for b in boxes)) + 2
    small_w = math.ceil(max(b[2] for b in boxes)) + 4
    small_h = line_h * len(lines) + 2
    if height < 3 * small_h:
        return []
    k = max(1, min(int(width * 0.9) // small_w, height // (3 * small_h)))
    small = Image.new("L", (small_w, small_h), 0)
    draw = ImageDraw.Draw(small)
    for n, line in enumerate(lines):
        draw.text((2, 1 + n * line_h), line, fill=255, font=font)
    mask = small.resize((small_w * k, small_h), Image.Resampling.NEAREST)
    dark = tuple(c // 4 for c in rgb)
    band = Image.new("RGB", (width, small_h), dark)
    band.paste((255, 255, 255), ((width - small_w * k) // 2, 0), mask)
    raw = band.tobytes()
    stride = 3 * width
    zero = b"\x02" + bytes(stride)
    rows: list[bytes] = []
    for y in range(small_h):
        rows.append(b"\x00" + raw[y * stride:(y + 1) * stride])
        rows.extend([zero] * (k - 1))
    return rows[:height]


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)))


class PngMaker:
    """Makes one simulator's PNGs; holds its padding and its cache of image data."""

    def __init__(self, payload_bytes: int) -> None:
        self.payload_bytes = payload_bytes
        self._idat: collections.OrderedDict[tuple[int, int, bytes, tuple[str, ...]], bytes]
        self._idat = collections.OrderedDict()
        # Incompressible padding, made once: benchmarks want size, not variety.
        self._pad = os.urandom(payload_bytes)

    def png(self, width: int, height: int, rgb: bytes, meta: bytes,
            label: tuple[str, ...] = ()) -> bytes:
        """A complete PNG, padded to about ``payload_bytes`` when that is set; ``label``
        lines are drawn on it when it is at least ``LABEL_MIN_WIDTH`` wide."""
        head = [
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
            _chunk(b"tEXt", meta),
        ]
        if width < LABEL_MIN_WIDTH:
            label = ()
        tail = [_chunk(b"IDAT", self._idat_for(width, height, rgb, label)),
                _chunk(b"IEND", b"")]
        pad = self.payload_bytes - sum(len(c) for c in head + tail) - 12
        if pad > 0:  # npAd: ancillary, private, safe-to-copy; decoders must skip it
            head.append(_chunk(b"npAd", self._pad[:pad]))
        return b"".join(head + tail)

    def _idat_for(self, width: int, height: int, rgb: bytes, label: tuple[str, ...]) -> bytes:
        key = (width, height, rgb, label)
        if key in self._idat:
            self._idat.move_to_end(key)
            return self._idat[key]
        # A horizontal gradient: row 0 unfiltered, every later row filter "Up" (all zeros),
        # so even a 4K image compresses in a blink.
        r, g, b = rgb
        row0 = bytearray([0])
        for x in range(width):
            row0 += bytes((r, g, (b + 255 * x // max(1, width - 1)) & 0xFF))
        up_row = b"\x02" + bytes(3 * width)
        per_block = max(1, (1 << 20) // len(up_row))
        comp = zlib.compressobj(6)
        band = label_rows(width, height, list(label), rgb) if label else []
        out = [comp.compress(b"".join(band))] if band else []
        out.append(comp.compress(bytes(row0)))
        for done in range(1 + len(band), height, per_block):
            out.append(comp.compress(up_row * min(per_block, height - done)))
        out.append(comp.flush())
        self._idat[key] = data = b"".join(out)
        if len(self._idat) > 64:
            self._idat.popitem(last=False)
        return data
