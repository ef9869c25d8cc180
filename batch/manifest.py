"""Load a manifest (YAML, JSON or JSONL) into validated, expanded Jobs.

This is the one boundary where file, YAML and JSON failures become a
ManifestError: every problem in the file is collected (capped) and raised
together, and no other exception escapes whatever the file holds. Nothing is
written. Id rules, templates and expansion live in :mod:`batch.expand`.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import json
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode

from batch import expand as ex
from batch.errors import ManifestError, Problem
from batch.imageinfo import sniff_mime
from batch.jobs import (
    ASPECT_RATIOS,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MODEL,
    IMAGE_SIZES,
    MAX_INPUT_IMAGE_BYTES,
    MAX_INPUT_IMAGES,
    InputImage,
    InputKind,
    Job,
)

try:  # the libyaml parser is several times faster; the pure one gives the same values
    from yaml import CSafeLoader as _SafeBase
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _SafeBase  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_JSONL_LINE_BYTES = 1024 * 1024
MAX_JOBS = 1_000_000  # after expansion; guards memory against a runaway cross product
JOB_FIELDS = ("id", "prompt", "aspect_ratio", "image_size", "model", "images", "params",
              "count", "vars")
TOP_LEVEL_KEYS = ("defaults", "jobs", "pricing")
_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".jsonl": "jsonl",
            ".ndjson": "jsonl"}
_BOM = b"\xef\xbb\xbf"
_SNIFF_BYTES = 4096
_URL_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# YAML 1.1 reads an unquoted 16:9 as the base-60 integer 969 (and 1:1 as 61).
_SEXAGESIMAL_RE = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")


class _Loader(_SafeBase):
    """yaml.safe_load's loader, except that `16:9` stays a string and duplicate keys fail."""

    # A class-level table is how PyYAML configures resolvers; this copy is never mutated.
    yaml_implicit_resolvers = {  # noqa: RUF012
        ch: ([("tag:yaml.org,2002:str", _SEXAGESIMAL_RE)] if ch in "+-0123456789" else [])
        + list(resolvers)
        for ch, resolvers in _SafeBase.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        # PyYAML silently keeps the last of two equal keys: a pasted second `prompt:` would win.
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag.endswith(":str"):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} appears twice", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


class _DuplicateKey(ValueError):
    pass


def _pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _DuplicateKey(f"key {ex.show(dup)} appears twice in one object")
    return out


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest: its jobs in order, and the optional price table."""

    path: Path
    jobs: tuple[Job, ...]
    pricing: Mapping[str, Mapping[str, float]]  # model -> image_size -> USD per image


class _Problems:
    """Collects problems up to a cap and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.items: list[Problem] = []
        self.cap = max(1, cap)
        self.more = 0

    def add(self, location: str, field: str | None, message: str) -> None:
        if len(self.items) < self.cap:
            self.items.append(Problem(location, field, message))
        else:
            self.more += 1

    def __len__(self) -> int:
        return len(self.items) + self.more


def load_manifest(
    path: Path, *, default_model: str = DEFAULT_MODEL, max_problems: int = 50
) -> Manifest:
    """Read, validate and expand a manifest; raises ManifestError listing every problem."""
    where = str(path)
    probs = _Problems(max_problems)
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        probs.add(where, None, "unknown manifest type; use .yaml, .yml, .json, .jsonl or .ndjson")
        raise ManifestError(probs.items)
    text = _read_text(Path(path), where, probs)
    builder = _Builder(Path(path), default_model, probs)
    pricing: dict[str, dict[str, float]] = {}
    if text is not None:
        decoder = json.JSONDecoder(object_pairs_hook=_pairs_to_dict)
        if fmt == "jsonl":
            builder.build(_jsonl_entries(text, where, decoder, probs))
        else:
            doc = _parse_document(text, fmt, where, decoder, probs)
            if doc is not _FAILED:
                pricing = builder.build_document(doc)
        if builder.entries == 0 and not probs:
            probs.add(where, None, "the manifest lists no jobs")
    if probs:
        raise ManifestError(probs.items, probs.more)
    log.debug("%s: %d job(s) from %d entr(ies), %d input file(s) hashed", where,
              len(builder.jobs), builder.entries, len(builder.files))
    return Manifest(Path(path), tuple(builder.jobs), pricing)


def _read_text(path: Path, where: str, probs: _Problems) -> str | None:
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            probs.add(where, None, "is a directory, not a manifest file")
        elif not stat.S_ISREG(info.st_mode):
            probs.add(where, None, "is not a regular file")
        elif info.st_size > MAX_MANIFEST_BYTES:
            probs.add(where, None, f"is {info.st_size} bytes; the limit is {MAX_MANIFEST_BYTES}")
        else:
            data = path.read_bytes()
            return _decode(data, where, probs)
    except FileNotFoundError:
        probs.add(where, None, "file not found")
    except (OSError, ValueError) as exc:  # permissions, I/O, a NUL byte in the path
        probs.add(where, None, f"cannot read the manifest: {getattr(exc, 'strerror', None) or exc}")
    return None


def _decode(data: bytes, where: str, probs: _Problems) -> str | None:
    skipped = len(_BOM) if data.startswith(_BOM) else 0  # editors on Windows add one
    try:
        return data[skipped:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skipped
        line = data.count(b"\n", 0, offset) + 1
        column = offset - data.rfind(b"\n", 0, offset)
        probs.add(f"{where}:{line}", None,
                  f"not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} "
                  f"(line {line}, column {column}); save the file as UTF-8")
        return None


_FAILED = object()


def _parse_document(
    text: str, fmt: str, where: str, decoder: json.JSONDecoder, probs: _Problems
) -> Any:
    try:
        if fmt == "json":
            return decoder.decode(text)
        doc = yaml.load(text, Loader=_Loader)
        if _exceeds(doc, 10 * len(text) + 10_000):
            probs.add(where, None, "YAML aliases expand to too much data (or refer to themselves)")
            return _FAILED
        return doc
    except json.JSONDecodeError as exc:
        probs.add(f"{where}:{exc.lineno}", None,
                  f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        message = f"invalid YAML{at}: {exc.problem or exc.context}"
        if exc.problem and "constructor for the tag" in exc.problem:
            message += " (tags that build objects are not allowed)"
        probs.add(f"{where}:{mark.line + 1}" if mark else where, None, message)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        probs.add(f"{where}:{line}", None, f"invalid YAML at line {line}: character "
                  f"U+{exc.character:04X} is not allowed ({exc.reason})")
    except RecursionError:
        probs.add(where, None, "nested too deeply to read")
    except Exception as exc:  # constructor ValueErrors (!!int abc), giant ints, duplicates...
        probs.add(where, None, f"cannot be parsed as {fmt.upper()}: {_reason(exc)}")
    return _FAILED


def _lines(text: str) -> Iterator[str]:
    # Lazily, so a big catalog is not held twice; only "\n" ends a line, since JSON
    # strings may hold a raw U+2028 that str.splitlines() would split on.
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def _reason(exc: BaseException) -> str:
    # Giant ints fail with advice about sys.set_int_max_str_digits(), not for our users.
    return str(exc).split("; use sys.")[0]


def _exceeds(doc: Any, budget: int) -> bool:
    # Without aliases a YAML text cannot hold more values than characters; with them
    # ("billion laughs", or a list that contains itself) later checks would never end.
    stack = [doc]
    while stack:
        budget -= 1
        if budget < 0:
            return True
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _jsonl_entries(
    text: str, where: str, decoder: json.JSONDecoder, probs: _Problems
) -> Iterator[tuple[Any, str]]:
    for number, line in enumerate(_lines(text), 1):
        if not line or line.isspace():
            continue
        location = f"{where}:{number}"
        # chars <= bytes <= 4 * chars, so only long lines pay for the exact count
        if len(line) * 4 > MAX_JSONL_LINE_BYTES and len(line.encode()) > MAX_JSONL_LINE_BYTES:
            probs.add(location, None, f"line is longer than {MAX_JSONL_LINE_BYTES} bytes")
            yield _FAILED, location
            continue
        try:
            yield decoder.decode(line), location
        except json.JSONDecodeError as exc:
            probs.add(location, None, f"invalid JSON at column {exc.colno}: {exc.msg}")
            yield _FAILED, location
        except (ValueError, RecursionError) as exc:
            probs.add(location, None, f"invalid JSON: {_reason(exc)}")
            yield _FAILED, location


class _Builder:
    """Validates entries and turns them into Jobs; holds the per-load caches."""

    def __init__(self, path: Path, default_model: str, probs: _Problems) -> None:
        self.where = str(path)
        self.base_dir = path.parent
        self.default_model = default_model
        self.probs = probs
        self.jobs: list[Job] = []
        self.entries = 0
        self.defaults: dict[str, Any] = {}
        self.defaults_written: dict[str, Any] = {}
        self.no_params: dict[str, Any] = {}  # one shared empty mapping per load
        self.files: dict[str, tuple[str, str, int] | str] = {}  # resolved path -> facts/error
        self.derived: Counter[str] = Counter()
        self.ids: dict[str, tuple[str, str]] = {}  # lowercased id -> (id, location)

    def bad(self, location: str, field: str | None, message: str) -> None:
        self.probs.add(location, field, message)

    # -- documents and entries -------------------------------------------------

    def build_document(self, doc: Any) -> dict[str, dict[str, float]]:
        """Handle the YAML/JSON top level; returns the price table."""
        if isinstance(doc, list):
            jobs: Any = doc
        elif isinstance(doc, dict):
            for key in doc:
                if key not in TOP_LEVEL_KEYS:
                    self._unknown(self.where, key, TOP_LEVEL_KEYS, "top-level key")
            if "defaults" in doc:
                self._defaults(doc["defaults"])
            jobs = doc.get("jobs", [])
            if not isinstance(jobs, list):
                self.bad(self.where, "jobs", f"must be a list of jobs, got {ex.describe(jobs)}")
                jobs = []
        elif doc is None:
            jobs = []
        else:
            self.bad(self.where, None, "must be a list of jobs or a mapping with 'jobs:', "
                     f"got {ex.describe(doc)}")
            return {}
        self.build((raw, self._place(n, raw)) for n, raw in enumerate(jobs, 1))
        if not isinstance(doc, dict) or doc.get("pricing") is None:
            return {}
        pricing, found = ex.check_pricing(doc["pricing"])
        for suffix, message in found:
            self.bad(f"{self.where}: pricing", "pricing" + suffix, message)
        return pricing

    def _place(self, number: int, raw: Any) -> str:
        ident = raw.get("id") if isinstance(raw, dict) else None
        named = isinstance(ident, str) and ex.ID_RE.fullmatch(ident)
        return f"{self.where}: job {number}" + (f" (id '{ident}')" if named else "")

    def _defaults(self, raw: Any) -> None:
        location = f"{self.where}: defaults"
        if not isinstance(raw, dict):
            self.bad(location, None, f"must be a mapping of job fields, got {ex.describe(raw)}")
            return
        for key in ("id", "prompt"):
            if key in raw:
                self.bad(location, key, "cannot be set in defaults; every job writes its own")
        fields = tuple(f for f in JOB_FIELDS if f not in ("id", "prompt"))
        values = self._fields({k: v for k, v in raw.items() if k not in ("id", "prompt")},
                              location, fields)
        if values is not None:
            self.defaults = values
            self.defaults_written = {k: raw[k] for k in values}

    def build(self, entries: Iterator[tuple[Any, str]]) -> None:
        """Validate every entry and append its expanded jobs."""
        for raw, location in entries:
            self.entries += 1
            if raw is not _FAILED:
                self._entry(raw, location)

    def _entry(self, raw: Any, location: str) -> None:
        if not isinstance(raw, dict):
            self.bad(location, None, f"a job must be a mapping of fields, got {ex.describe(raw)}")
            return
        own = self._fields(raw, location, JOB_FIELDS)
        if "prompt" not in raw:
            self.bad(location, "prompt", "is required")
            return
        if own is None:
            return
        job = {**self.defaults, **own}
        variables: dict[str, list[ex.Scalar]] = job.get("vars", {})
        count: int = job.get("count", 1)
        template = None
        if variables:
            template, found = ex.parse_template(job["prompt"], list(variables))
            for field, message in found:
                self.bad(location, field, message)
            if template is None:
                return
        size = ex.variant_count(variables, count)
        if len(self.jobs) + size > MAX_JOBS:
            self.bad(location, None, f"expands to {size} jobs; a manifest may hold {MAX_JOBS}")
            return
        base = own.get("id") or self._derived_id(raw)
        model = job.get("model", self.default_model)
        ratio = job.get("aspect_ratio", DEFAULT_ASPECT_RATIO)
        image_size = job.get("image_size", DEFAULT_IMAGE_SIZE)
        images = job.get("images", ())
        params = job.get("params", self.no_params)
        for ident, prompt in ex.expand(base, job["prompt"], template, variables, count):
            self._register(ident, location)
            self.jobs.append(Job(ident, prompt, model, ratio, image_size, images, params,
                                 len(self.jobs), location))

    def _derived_id(self, raw: dict[str, Any]) -> str:
        # Hash what the user wrote (after defaults), never --model or built-ins, so
        # changing the command line does not rename finished jobs.
        written = {**self.defaults_written, **{k: v for k, v in raw.items() if k != "id"}}
        ident = ex.derived_id(raw["prompt"], written)
        self.derived[ident] += 1
        seen = self.derived[ident]
        return ident if seen == 1 else f"{ident}-{seen}"

    def _register(self, ident: str, location: str) -> None:
        key = ident.lower()
        first = self.ids.get(key)
        if first is None:
            self.ids[key] = (ident, location)
        elif first[0] == ident:
            self.bad(location, "id", f"duplicate id '{ident}' (also at {first[1]})")
        else:  # ids name files; Windows and macOS file names ignore case
            self.bad(location, "id", f"id '{ident}' differs only in case from '{first[0]}' "
                     f"at {first[1]}")

    def _fields(self, raw: dict[Any, Any], location: str,
                allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """The entry's fields, normalised, or None once their problems are reported."""
        out: dict[str, Any] = {}
        ok = True
        for key, value in raw.items():
            if key not in allowed:
                self._unknown(location, key, allowed, "field")
                ok = False
            elif key == "images":
                out[key] = self._images(value, location)
                ok = ok and out[key] is not None
            else:
                for suffix, message in ex.FIELD_CHECKS[key](value):
                    self.bad(location, key + suffix, message)
                    ok = False
                out[key] = value.strip() if key == "model" and ok else value
        return out if ok else None

    def _unknown(self, location: str, key: Any, allowed: tuple[str, ...], what: str) -> None:
        if not isinstance(key, str):
            self.bad(location, None, f"{what} names must be strings, got {ex.describe(key)}")
            return
        close = difflib.get_close_matches(key[:100], allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(allowed)}"
        self.bad(location, ex.show(key, 40).strip("'\""), f"unknown {what}{hint}")

    def _images(self, value: Any, location: str) -> tuple[InputImage, ...] | None:
        field = "images"
        if not isinstance(value, list):
            self.bad(location, field, f"must be a list of paths or URLs, got {ex.describe(value)}")
            return None
        if len(value) > MAX_INPUT_IMAGES:
            self.bad(location, field, f"has {len(value)} entries; a job takes at most "
                     f"{MAX_INPUT_IMAGES} input images")
            return None
        out = [self._image(item, location, f"{field}[{n}]") for n, item in enumerate(value)]
        if any(image is None for image in out):
            return None
        return tuple(image for image in out if image is not None)

    def _image(self, item: Any, location: str, field: str) -> InputImage | None:
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
            facts = self.files[resolved] = _probe_file(resolved)
        if isinstance(facts, str):
            self.bad(location, field, f"{ex.show(text)}: {facts}")
            return None
        mime, digest, size = facts
        return InputImage(InputKind.FILE, resolved, item, mime, digest, size)


def _probe_file(resolved: str) -> tuple[str, str, int] | str:
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


def summarize(manifest: Manifest) -> dict[str, Any]:
    """A plan for `imgbatch validate`: job counts by size/ratio and model, input images."""
    jobs = manifest.jobs
    pairs = Counter((j.image_size, j.aspect_ratio) for j in jobs)
    by_size: dict[str, dict[str, int]] = {}
    for size, ratio in sorted(pairs, key=lambda p: (_rank(IMAGE_SIZES, p[0]),
                                                   _rank(ASPECT_RATIOS, p[1]))):
        by_size.setdefault(size, {})[ratio] = pairs[(size, ratio)]
    images = [image for job in jobs for image in job.images]
    kinds = Counter(image.kind.value for image in images)
    return {
        "jobs": len(jobs),
        "by_size_and_ratio": by_size,
        "by_model": dict(sorted(Counter(j.model for j in jobs).items())),
        "input_images": {kind.value: kinds.get(kind.value, 0) for kind in InputKind},
        # bytes sent over the whole run: a file used by 10 jobs counts 10 times
        "input_image_bytes": sum(image.size_bytes or 0 for image in images),
    }


def _rank(order: tuple[str, ...], value: str) -> int:
    return order.index(value) if value in order else len(order)
