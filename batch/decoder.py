"""Streaming decoder of image API response bodies (the hot path).

A body carries its images as base64 inside JSON strings, 4-30 MB each: as
``data:`` URLs (chat completions' ``message.images``), or as bare base64 under
a known key (Gemini's ``inlineData.data``, the Images API's ``b64_json``: pass
those keys as ``raw_keys``). :class:`BodyDecoder` is a push parser: it copies
the JSON around the images into a small "skeleton" (each image replaced by
:func:`placeholder`) and streams every image out as decoded bytes, so neither
the body nor an image is ever held whole. :class:`batch.inflate.Inflater`
undoes Content-Encoding in bounded pieces before that. Pure logic, no I/O;
every failure is a MalformedResponse.
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, TypeAlias

from batch.errors import MalformedResponse

DEFAULT_MAX_SKELETON_BYTES = 8 * 1024 * 1024

# A string whose first 256 characters hold "data:...;base64," is a data URL. The
# head is judged on at most this many raw bytes (room for escapes in the header).
_HEADER_CHARS = 256
_HEAD_RAW_BYTES = 2048
_WHITESPACE = b" \t\r\n"
_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
# The body of a JSON string up to its closing quote or a backslash that ends the
# input (unrolled so runs of plain characters are matched in one step).
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
# Outside strings: everything up to the next string that may be a data URL (one that
# starts with d, D or an escape, see _data_url_header) or that the input cuts off:
# one C call for the JSON around an image instead of a Python step per key and value.
# Nothing follows the outer repeat and the string body is unrolled, so a cut-off
# string costs one linear scan. (Not possessive: CPython before 3.11.5 mismatches
# possessive repeats, gh-106052.)
_SKIP = re.compile(rb'(?:[^"]+|"(?![dD\\])[^"\\]*(?:\\.[^"\\]*)*")*', re.DOTALL)
# With raw keys any string may be an image, so the scan stops at every string (the
# JSON around the images of those protocols is small).
_SKIP_TO_STRING = re.compile(rb'[^"]*')
# Escapes in data URL text: fast paths for the common ones, then the general case.
_NOT_SLASH_ESCAPE = re.compile(rb"\\(?!/)")
_NOT_SIMPLE_ESCAPE = re.compile(rb"\\(?![/nrt])")
_WHITESPACE_ESCAPE = re.compile(rb"\\[nrt]")
_ESCAPE = re.compile(rb"\\(u[0-9A-Fa-f]{4}|.)", re.DOTALL)
_HEX4 = re.compile(rb"[0-9A-Fa-f]{4}")
_SIMPLE_ESCAPES = {ord(k): v for k, v in zip('"\\/bfnrt', '"\\/\b\f\n\r\t', strict=True)}

# Where the scanner is in the JSON text.
_OUTSIDE, _HEAD, _PLAIN, _DATA = range(4)


@dataclass(frozen=True, slots=True)
class ImageBegin:
    """An image started; ``index`` counts images in body order from 0."""

    index: int
    declared_mime: str  # what a data URL says ("" for bare base64); the bytes decide


@dataclass(frozen=True, slots=True)
class ImageBytes:
    """The next decoded bytes of the current image."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ImageEnd:
    """The current data URL ended with valid base64."""

    index: int


Event: TypeAlias = ImageBegin | ImageBytes | ImageEnd


def placeholder(index: int) -> str:
    """The string that stands for data URL ``index`` in the skeleton (no real text has NUL)."""
    return f"\x00imgbatch-image-{index}"


class BodyDecoder:
    """Push parser: feed body bytes, get image events, then the skeleton document."""

    def __init__(
        self,
        *,
        max_skeleton_bytes: int = DEFAULT_MAX_SKELETON_BYTES,
        raw_keys: frozenset[str] = frozenset(),
    ) -> None:
        self._max_skeleton = max_skeleton_bytes
        # A string right after one of these keys is bare base64 image data.
        self._raw_key = (
            re.compile(rb'"(?:' + b"|".join(re.escape(k.encode()) for k in sorted(raw_keys))
                       + rb')"\s*:\s*\Z')
            if raw_keys else None
        )
        self._skip = _SKIP_TO_STRING if raw_keys else _SKIP
        self._skeleton = bytearray()
        self._state = _OUTSIDE
        self._escaped = False  # string scan: the input ended on an unpaired backslash
        self._head = bytearray()  # raw start of the current string, until judged
        self._images = 0
        self._carry = b""  # data URL: an escape cut by the end of a chunk
        self._rem = b""  # data URL: base64 characters short of a group of 4
        self._padded = False
        self._out: list[bytes] = []
        self._failed = False

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume the next body bytes; MalformedResponse on bad base64 or escapes."""
        if self._failed:
            raise MalformedResponse("body decoder already failed")
        events: list[Event] = []
        try:
            self._feed(chunk, events)
        except MalformedResponse:
            self._failed = True
            raise
        return events

    def finish(self) -> Any:
        """The body's JSON with data URLs replaced; MalformedResponse if truncated/invalid."""
        if self._failed:
            raise MalformedResponse("body decoder already failed")
        if self._state != _OUTSIDE:
            raise MalformedResponse("body is truncated: it ends inside a string")
        try:
            return json.loads(self._skeleton.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
            raise MalformedResponse(f"body is not valid JSON: {exc}") from None

    def _feed(self, chunk: bytes, events: list[Event]) -> None:
        pos, end = 0, len(chunk)
        while pos < end:
            state = self._state
            if state == _OUTSIDE:
                match = self._skip.match(chunk, pos)
                assert match is not None  # the pattern matches the empty string
                quote = match.end()  # at a quote unless the chunk ended
                self._keep(memoryview(chunk)[pos:quote])
                if quote >= end:
                    break
                pos = quote + 1
                self._state = _HEAD
            elif state == _DATA:
                pos = self._data(chunk, pos, end, events)
            elif state == _PLAIN:
                stop, closed = self._string_run(chunk, pos, end)
                self._keep(memoryview(chunk)[pos : stop + closed])
                pos = stop + closed
                if closed:
                    self._state = _OUTSIDE
            else:
                limit = min(end, pos + _HEAD_RAW_BYTES - len(self._head))
                stop, closed = self._string_run(chunk, pos, limit)
                self._head += chunk[pos:stop]
                pos = stop
                # The closing quote is left for the next state to consume.
                if closed or len(self._head) >= _HEAD_RAW_BYTES:
                    self._judge(events)
        self._flush(events)

    def _keep(self, data: bytes | memoryview) -> None:
        """Copy ``data`` to the skeleton (a memoryview slice avoids one copy)."""
        self._skeleton += data
        if len(self._skeleton) > self._max_skeleton:
            raise MalformedResponse(f"body has over {self._max_skeleton} bytes besides its images")

    def _string_run(self, chunk: bytes, pos: int, endpos: int) -> tuple[int, bool]:
        """How far the current string goes in ``chunk[pos:endpos]``: (stop, closed).

        ``stop`` is the closing quote's index when closed, else ``endpos``.
        """
        if self._escaped:
            if pos >= endpos:
                return pos, False
            pos += 1  # the character after a backslash that ended the last chunk
            self._escaped = False
        match = _STRING_BODY.match(chunk, pos, endpos)
        assert match is not None  # the pattern matches the empty string
        stop = match.end()
        if stop == endpos:
            return stop, False
        if chunk[stop] == 0x22:
            return stop, True
        self._escaped = True  # a backslash is the last byte before endpos
        return endpos, False

    def _judge(self, events: list[Event]) -> None:
        """Decide whether the string whose head is buffered is a data URL."""
        head = bytes(self._head)
        self._head.clear()
        found = _data_url_header(head)
        if (
            found is None
            and self._raw_key is not None
            and self._raw_key.search(self._skeleton, max(0, len(self._skeleton) - 64))
        ):
            found = ("", 0)
        if found is None:
            self._keep(b'"' + head)
            self._state = _PLAIN
            return
        mime, offset = found
        index = self._images
        self._images += 1
        events.append(ImageBegin(index, mime))
        self._keep(json.dumps(placeholder(index)).encode())
        self._state = _DATA
        self._escaped = False  # a cut escape in the head is now the data URL's carry
        self._carry, self._rem, self._padded = b"", b"", False
        self._segment(head[offset:], closed=False)

    def _data(self, chunk: bytes, pos: int, end: int, events: list[Event]) -> int:
        """Stream data URL content from ``pos``; return where scanning goes on."""
        quote = chunk.find(b'"', pos)
        self._segment(chunk[pos : end if quote < 0 else quote], closed=quote >= 0)
        if quote < 0:
            return end
        if self._rem.translate(None, _WHITESPACE):
            raise MalformedResponse("base64 in data URL is not a multiple of 4 characters")
        self._flush(events)
        events.append(ImageEnd(self._images - 1))
        self._state = _OUTSIDE
        return quote + 1

    def _segment(self, seg: bytes, *, closed: bool) -> None:
        """Un-escape a raw piece of data URL content and decode it."""
        if self._carry:
            seg, self._carry = self._carry + seg, b""
        if b"\\" in seg:
            cut = seg.rfind(b"\\", max(0, len(seg) - 6))
            if cut >= 0 and len(seg) - cut < (6 if seg[cut + 1 : cut + 2] == b"u" else 2):
                if closed:  # e.g. \" : a quote is never base64
                    raise MalformedResponse("data URL ends inside an escape sequence")
                seg, self._carry = seg[:cut], seg[cut:]
            seg = _unescape(seg)
        self._push(seg)

    def _push(self, data: bytes) -> None:
        """Decode base64 text (possibly with whitespace) in strict groups of 4."""
        if self._rem:
            data = self._rem + data
        if self._padded:
            if data.translate(None, _WHITESPACE):
                raise MalformedResponse("base64 in data URL goes on after its padding")
            self._rem = b""
            return
        cut = len(data) - len(data) % 4
        try:
            decoded = binascii.a2b_base64(memoryview(data)[:cut], strict_mode=True)
        except binascii.Error as exc:
            # Some encoders wrap base64 in lines: drop whitespace, then try again once.
            stripped = data.translate(None, _WHITESPACE)
            if len(stripped) == len(data):
                raise MalformedResponse(f"bad base64 in data URL: {exc}") from None
            self._rem = b""
            self._push(stripped)
            return
        if decoded:
            self._out.append(decoded)
        self._rem = data[cut:]
        if cut and data[cut - 1] == 0x3D:  # "="
            self._padded = True
            if self._rem.translate(None, _WHITESPACE):
                raise MalformedResponse("base64 in data URL goes on after its padding")

    def _flush(self, events: list[Event]) -> None:
        """One ImageBytes for what this chunk decoded, not one per piece."""
        if self._out:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            events.append(ImageBytes(data))


def _data_url_header(raw: bytes) -> tuple[str, int] | None:
    """(declared mime, raw offset of the base64 text) if ``raw`` starts a data URL.

    ``raw`` is the escaped start of a string, without its closing quote. Invalid
    escapes make it "not a data URL": the skeleton's JSON parse then reports them.
    """
    # Almost every string (keys, text) fails on its first byte: answer at once.
    if raw[:1] not in (b"d", b"D", b"\\"):
        return None
    text: list[str] = []
    i, size = 0, len(raw)
    while i < size and len(text) < _HEADER_CHARS:
        byte = raw[i]
        if byte != 0x5C:
            char = chr(byte)  # a non-ASCII byte never belongs to a data URL header
            i += 1
        elif raw[i + 1 : i + 2] == b"u":
            digits = raw[i + 2 : i + 6]
            if not _HEX4.fullmatch(digits):
                return None
            char = chr(int(digits, 16))
            i += 6
        else:
            simple = _SIMPLE_ESCAPES.get(raw[i + 1]) if i + 1 < size else None
            if simple is None:
                return None
            char = simple
            i += 2
        text.append(char)
        if len(text) == 5 and "".join(text).lower() != "data:":
            return None
        if char == ",":
            header = "".join(text)
            lower = header.lower()
            if lower.startswith("data:") and lower.endswith(";base64,") and header.isascii():
                return header[5:].split(";", 1)[0], i
            return None
    return None


def _unescape(seg: bytes) -> bytes:
    """Undo the JSON escapes in data URL text; whitespace escapes are dropped.

    ``seg`` holds no cut escape. The two fast paths are exact because they only
    run when every backslash starts an escape of "/" (or of n, r, t): with no
    escaped backslash around, escapes cannot overlap, so deleting is unescaping.
    """
    if _NOT_SLASH_ESCAPE.search(seg) is None:
        return seg.replace(b"\\", b"")  # the usual case: "\/" only
    if _NOT_SIMPLE_ESCAPE.search(seg) is None:
        return _WHITESPACE_ESCAPE.sub(b"", seg).replace(b"\\", b"")
    return _ESCAPE.sub(_escape, seg)


def _escape(match: re.Match[bytes]) -> bytes:
    """What one escape inside a data URL stands for; MalformedResponse if not base64."""
    body = match.group(1)
    if body == b"/":
        return body
    if body in (b"n", b"r", b"t"):
        return b""
    if len(body) == 5:
        code = int(body[1:], 16)
        if code in _B64_CHARS:
            return bytes((code,))
        if code < 0x80 and code in _WHITESPACE:  # bytes' "in" raises for ints over 255
            return b""
    raise MalformedResponse(f"invalid escape in data URL: \\{body.decode('latin-1')}")
