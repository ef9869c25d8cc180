"""Turn a manifest job's ``images`` entries into :class:`batch.jobs.InputImage` values.

Local paths are resolved against the manifest's folder and each file is read,
sniffed and hashed once per load, however many jobs name it; data: URLs are
decoded and checked; http(s) URLs are passed on untouched and never fetched, so
their digest (and the job's fingerprint) is that of the URL text, not of the image
behind it. Problems go to the caller's ``bad`` callback; nothing here raises.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batch import expand as ex
from batch.imageinfo import sniff_mime
from batch.jobs import MAX_INPUT_IMAGE_BYTES, MAX_INPUT_IMAGES, InputImage, InputKind

_SNIFF_BYTES = 4096
_URL_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

FileFacts = tuple[str, str, int]  # mime, sha256, size
Report = Callable[[str, str | None, str], None]  # (location, field, message)
Probe = Callable[[str], FileFacts | str]


class InputImages:
    """Checks ``images`` lists for one manifest load; caches what it learns of local files."""

    def __init__(self, base_dir: Path, bad: Report, probe: Probe | None = None) -> None:
        self.base_dir = base_dir
        self.bad = bad
        self.probe = probe or probe_file
        self.files: dict[str, FileFacts | str] = {}  # resolved path -> facts/error

    def images(self, value: Any, location: str) -> tuple[InputImage, ...] | None:
        """The entries of an ``images`` field, or None once their problems are reported."""
        field = "images"
        if not isinstance(value, list):
            self.bad(location, field, f"must be a list of paths or URLs, got {ex.describe(value)}")
            return None
        if len(value) > MAX_INPUT_IMAGES:
            self.bad(location, field, f"has {len(value)} entries; a job takes at most "
                     f"{MAX_INPUT_IMAGES} input images")
            return None
        out = [self.image(item, location, f"{field}[{n}]") for n, item in enumerate(value)]
        if any(image is None for image in out):
            return None
        return tuple(image for image in out if image is not None)

    def image(self, item: Any, location: str, field: str) -> InputImage | None:
        """One entry: an http(s) URL, a data: URL or a local path."""
        if not isinstance(item, str) or not item.strip():
            self.bad(location, field, f"must be a path or URL, got {ex.describe(item)}")
            return None
        text = item.strip()
        lower = text[:8].lower()
        if lower.startswith(("http://", "https://")):
            if any(c.isspace() for c in text) or len(text) <= len("https://"):
                self.bad(location, field, f"{ex.show(text)} is not a valid URL")
                return None
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            return InputImage(InputKind.URL, text, item, None, digest)
        if lower.startswith("data:"):
            return self._data_url(text, item, location, field)
        if _URL_SCHEME_RE.match(text):
            self.bad(location, field, f"{ex.show(text)}: only http(s) URLs, data: URLs and "
                     "local paths are supported")
            return None
        return self._file(text, item, location, field)

    def _data_url(self, text: str, item: str, location: str, field: str) -> InputImage | None:
        head, comma, payload = text.partition(",")
        meta = head[5:].lower().split(";")
        if not comma or "base64" not in meta[1:] or not meta[0].startswith("image/"):
            self.bad(location, field, "data URLs must look like data:image/png;base64,...")
            return None
        payload = "".join(payload.split())  # YAML folded strings may wrap the base64
        if len(payload) // 4 * 3 > MAX_INPUT_IMAGE_BYTES + 3:
            self.bad(location, field, f"data URL image is over {MAX_INPUT_IMAGE_BYTES} bytes")
            return None
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            self.bad(location, field, "data URL is not valid base64")
            return None
        mime = sniff_mime(data[:_SNIFF_BYTES])
        if len(data) > MAX_INPUT_IMAGE_BYTES or mime is None:
            why = "too large" if mime else f"not an image (declared {meta[0]})"
            self.bad(location, field, f"data URL content is {why}")
            return None
        # Rebuilt with the sniffed type so a wrong declared type never reaches the server.
        ref = f"data:{mime};base64,{payload}"
        digest = hashlib.sha256(data).hexdigest()
        return InputImage(InputKind.DATA, ref, item, mime, digest, len(data))

    def _file(self, text: str, item: str, location: str, field: str) -> InputImage | None:
        try:
            candidate = Path(text).expanduser()
            resolved = str((self.base_dir / candidate).resolve())  # absolute paths win in "/"
        except (OSError, RuntimeError, ValueError) as exc:  # ~nobody, symlink loops, NUL
            self.bad(location, field, f"{ex.show(text)}: cannot resolve the path ({exc})")
            return None
        facts = self.files.get(resolved)
        if facts is None:  # hash each file once per load, however many jobs use it
            facts = self.files[resolved] = self.probe(resolved)
        if isinstance(facts, str):
            self.bad(location, field, f"{ex.show(text)}: {facts}")
            return None
        mime, digest, size = facts
        return InputImage(InputKind.FILE, resolved, item, mime, digest, size)


def probe_file(resolved: str) -> FileFacts | str:
    """(mime, sha256, size) of a local input image, or why it cannot be used."""
    try:
        info = os.stat(resolved)
        if not stat.S_ISREG(info.st_mode):
            return f"{resolved} is not a regular file"
        if info.st_size > MAX_INPUT_IMAGE_BYTES:
            return (f"{resolved} is {info.st_size} bytes; input images may be at most "
                    f"{MAX_INPUT_IMAGE_BYTES} bytes")
        with open(resolved, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
            mime = sniff_mime(head)
            if mime is None:
                return f"{resolved} is not an image (PNG, JPEG, WebP or GIF by its bytes)"
            digest = hashlib.sha256(head)
            size = len(head)
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                if size > MAX_INPUT_IMAGE_BYTES:  # grew since stat
                    return f"{resolved} is larger than {MAX_INPUT_IMAGE_BYTES} bytes"
    except FileNotFoundError:
        return f"file not found (looked for {resolved})"
    except (OSError, ValueError) as exc:
        return f"cannot read {resolved}: {getattr(exc, 'strerror', None) or exc}"
    return mime, digest.hexdigest(), size
