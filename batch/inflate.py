"""Content-Encoding undone in bounded pieces, before the body decoder sees the bytes.

:class:`Inflater` takes gzip (several members too), zlib-wrapped or raw deflate,
or no coding, and never yields a piece over INFLATE_PIECE_BYTES nor a body over
its cap, so a small compressed answer cannot blow up in memory. Pure logic, no
I/O; every failure is a MalformedResponse.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from batch.errors import MalformedResponse

INFLATE_PIECE_BYTES = 256 * 1024
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class Inflater:
    """Undoes a Content-Encoding in pieces of at most INFLATE_PIECE_BYTES."""

    def __init__(self, content_encoding: str | None, *, max_output_bytes: int) -> None:
        codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
            raise MalformedResponse(f"unsupported Content-Encoding {content_encoding!r}")
        self._coding = codings[0] if codings else None
        self._max = max_output_bytes
        self._total = 0
        self._head = b""  # deflate: held until the first two bytes tell the wrapping
        self._inflater: zlib._Decompress | None = None
        if self._coding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(_GZIP_WBITS)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The decoded bytes that ``chunk`` completes, in bounded pieces.

        Iterate it to the end: the input is consumed as the pieces are taken.
        """
        if self._coding is None:
            if chunk:
                yield self._count(chunk)
            return
        if self._inflater is None:
            self._head += chunk
            if len(self._head) < 2:
                return
            chunk, self._head = self._head, b""
            # "deflate" should be zlib-wrapped (RFC 9110) but some servers send it raw.
            wrapped = chunk[0] & 0x0F == 8 and (chunk[0] << 8 | chunk[1]) % 31 == 0
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        yield from self._inflate(chunk)

    def finish(self) -> Iterator[bytes]:
        """The last decoded bytes; MalformedResponse if the stream is incomplete."""
        if self._coding is None:
            return
        if self._inflater is not None:
            yield from self._inflate(b"")
        if self._inflater is None or not self._inflater.eof:
            raise MalformedResponse(f"{self._coding} body is truncated")

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        inflater = self._inflater
        assert inflater is not None
        while True:
            if inflater.eof:
                if not data:
                    return
                if self._coding == "deflate":
                    raise MalformedResponse("bytes after the end of the deflate body")
                inflater = self._inflater = zlib.decompressobj(_GZIP_WBITS)  # next gzip member
            try:
                out = inflater.decompress(data, INFLATE_PIECE_BYTES)
            except zlib.error as exc:
                raise MalformedResponse(f"corrupt {self._coding} body: {exc}") from None
            eof = inflater.eof
            data = inflater.unused_data if eof else inflater.unconsumed_tail
            if out:
                yield self._count(out)
            # A full piece may leave output inside zlib even when the input is used up.
            if not data and (eof or len(out) < INFLATE_PIECE_BYTES):
                return

    def _count(self, piece: bytes) -> bytes:
        self._total += len(piece)
        if self._total > self._max:
            raise MalformedResponse(f"body is over {self._max} bytes once decoded")
        return piece
