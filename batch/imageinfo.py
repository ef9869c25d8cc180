"""Image facts read from bytes, never from what a server claims.

(Helper A completes this module: streaming verifier, dimensions.)
"""

from __future__ import annotations


def sniff_mime(head: bytes) -> str | None:
    """The image type the magic bytes say, or None if they are not an image we know."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None
