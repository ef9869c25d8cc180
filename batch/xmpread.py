"""What an image file says about itself: its type and the imgbatch XMP packet, if any.

Reads the container structure with seeks (PNG chunks, JPEG segments up to the
scan, WebP chunks), so a 50 MB image costs a few small reads. The packet is
parsed with a refusal of DTDs and entities, since an image can come from
anywhere.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import BinaryIO

from batch.provenance import FIELDS, JPEG_XMP_HEAD, NAMESPACE, PNG_XMP_KEY, _tag

MAX_PACKET_BYTES = 4 << 20


class NotReadable(Exception):
    """The file cannot be read as an image, or its packet is not XML."""


def image_kind(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def read_packet(path: Path) -> tuple[str | None, bytes | None]:
    """The image's type and its XMP packet (None when it has none)."""
    try:
        with path.open("rb") as handle:
            kind = image_kind(handle.read(12))
            handle.seek(0)
            if kind == "png":
                return kind, _png(handle)
            if kind == "jpeg":
                return kind, _jpeg(handle)
            if kind == "webp":
                return kind, _webp(handle)
            return None, None
    except OSError as exc:
        raise NotReadable(f"{path}: {exc.strerror or exc}") from None
    except struct.error:
        return kind, None  # cut short: whatever the header had, no packet


def _read(handle: BinaryIO, size: int) -> bytes:
    if size > MAX_PACKET_BYTES:
        raise NotReadable("metadata larger than 4 MiB")
    data = handle.read(size)
    if len(data) < size:
        raise struct.error("short read")
    return data


def _png(handle: BinaryIO) -> bytes | None:
    handle.seek(8)
    while header := handle.read(8):
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            return None
        if kind == b"iTXt" and length <= MAX_PACKET_BYTES:
            data = _read(handle, length)
            handle.seek(4, 1)
            key, _, rest = data.partition(b"\0")
            if key != PNG_XMP_KEY or len(rest) < 2:
                continue
            compressed = rest[0] == 1
            _, _, text = rest[2:].partition(b"\0")  # language tag
            _, _, text = text.partition(b"\0")  # translated keyword
            if compressed:
                try:
                    text = zlib.decompressobj().decompress(text, MAX_PACKET_BYTES)
                except zlib.error as exc:
                    raise NotReadable(f"the compressed XMP chunk is corrupt: {exc}") from None
            return text
        handle.seek(length + 4, 1)
    return None


def _jpeg(handle: BinaryIO) -> bytes | None:
    handle.seek(2)
    while True:
        marker = _read(handle, 2)
        if marker[0] != 0xFF or marker[1] in (0xDA, 0xD9):
            return None
        (length,) = struct.unpack(">H", _read(handle, 2))
        if marker[1] == 0xE1:
            data = _read(handle, length - 2)
            if data.startswith(JPEG_XMP_HEAD):
                return data[len(JPEG_XMP_HEAD):]
        else:
            handle.seek(length - 2, 1)


def _webp(handle: BinaryIO) -> bytes | None:
    handle.seek(12)
    while header := handle.read(8):
        fourcc, size = struct.unpack("<4sI", header)
        if fourcc == b"XMP ":
            return _read(handle, size)
        handle.seek(size + (size & 1), 1)
    return None


def parse_packet(packet: bytes) -> dict[str, str]:
    """The imgbatch fields of an XMP packet (others ignored)."""
    if b"<!DOCTYPE" in packet or b"<!ENTITY" in packet:
        raise NotReadable("the XMP packet declares a DTD; not parsed")
    try:
        root = ET.fromstring(packet)
    except ET.ParseError as exc:
        raise NotReadable(f"the XMP packet is not XML: {exc}") from None
    found: dict[str, str] = {}
    for name in FIELDS:
        element = root.find(f".//{{{NAMESPACE}}}{_tag(name)}")
        if element is not None:
            found[name] = element.text or ""
    return found


def describe(path: Path) -> tuple[str | None, dict[str, str]]:
    """The image type and the provenance fields it carries (empty if none)."""
    kind, packet = read_packet(path)
    return kind, parse_packet(packet) if packet is not None else {}
