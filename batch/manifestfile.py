"""Read a manifest file into raw entries: size and encoding checks, YAML, JSON and JSONL.

Every failure is added to a :class:`Problems` collector instead of raised, so
:func:`batch.manifest.load_manifest` can report them all at once. The YAML
loader keeps `16:9` a string and rejects duplicate keys (JSON too), and alias
bombs are caught before anything walks the document.
"""

from __future__ import annotations

import json
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from batch import expand as ex
from batch.errors import Problem

T = TypeVar("T")

MAX_MANIFEST_BYTES = 256 * 1024 * 1024  # YAML and JSON, parsed whole
MAX_JSONL_BYTES = 64 * 1024**3  # JSONL streams: its size does not bound memory
MAX_JSONL_LINE_BYTES = 1024 * 1024
FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".jsonl": "jsonl",
           ".ndjson": "jsonl"}
_BOM = b"\xef\xbb\xbf"
class _DuplicateKey(ValueError):
    pass


def _pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _DuplicateKey(f"key {ex.show(dup)} appears twice in one object")
    return out


def json_decoder() -> json.JSONDecoder:
    """A JSON decoder that rejects duplicate keys within one object."""
    return json.JSONDecoder(object_pairs_hook=_pairs_to_dict)


class Problems:
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


def read_text(path: Path, where: str, probs: Problems) -> str | None:
    """The file's text (UTF-8, an optional BOM dropped), or None once the problem is added."""
    data = _opened(path, where, probs, MAX_MANIFEST_BYTES, Path.read_bytes)
    return None if data is None else _decode(data, where, probs)


def _opened(path: Path, where: str, probs: Problems, limit: int,
            read: Callable[[Path], T]) -> T | None:
    """``read(path)`` of a regular file of at most ``limit`` bytes, or None once the
    problem is added."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            probs.add(where, None, "is a directory, not a manifest file")
        elif not stat.S_ISREG(info.st_mode):
            probs.add(where, None, "is not a regular file")
        elif info.st_size > limit:
            probs.add(where, None, f"is {info.st_size} bytes; the limit is {limit}")
        else:
            return read(path)
    except FileNotFoundError:
        probs.add(where, None, "file not found")
    except (OSError, ValueError) as exc:  # permissions, I/O, a NUL byte in the path
        probs.add(where, None, f"cannot read the manifest: {getattr(exc, 'strerror', None) or exc}")
    return None


def _decode(data: bytes, where: str, probs: Problems) -> str | None:
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


FAILED = object()  # stands in for a document or JSONL line that could not be parsed


def parse_document(
    text: str, fmt: str, where: str, decoder: json.JSONDecoder, probs: Problems
) -> Any:
    """A whole YAML or JSON document's value, or FAILED once the problem is added."""
    try:
        if fmt == "json":
            return decoder.decode(text)
        # PyYAML is loaded for a YAML manifest only: a JSONL run starts without it.
        from batch.yamldoc import YamlProblem, load_yaml

        try:
            doc = load_yaml(text)
        except YamlProblem as exc:
            probs.add(f"{where}:{exc.line}" if exc.line else where, None, exc.message)
            return FAILED
        if _exceeds(doc, 10 * len(text) + 10_000):
            probs.add(where, None, "YAML aliases expand to too much data (or refer to themselves)")
            return FAILED
        return doc
    except json.JSONDecodeError as exc:
        probs.add(f"{where}:{exc.lineno}", None,
                  f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
    except RecursionError:
        probs.add(where, None, "nested too deeply to read")
    except Exception as exc:  # constructor ValueErrors (!!int abc), giant ints, duplicates...
        probs.add(where, None, f"cannot be parsed as {fmt.upper()}: {_reason(exc)}")
    return FAILED


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


def raw_lines(handle: BinaryIO) -> Iterator[tuple[bytes | None, int]]:
    """(line without its "\\n", or None if longer than the limit; bytes it took in the file).

    Only one line is held at a time; a giant line is skipped in chunks, never read whole.
    """
    limit = MAX_JSONL_LINE_BYTES
    while True:
        data = handle.readline(limit + 1)
        if not data:
            return
        length = len(data)
        if data[-1:] == b"\n":
            yield data[:-1], length
            continue
        if length <= limit:  # the last line, without a newline
            yield data, length
            return
        while not data.endswith(b"\n"):
            data = handle.readline(1 << 20)
            if not data:
                break
            length += len(data)
        yield None, length


def decode_line(data: bytes | None, number: int, offset: int, where: str,
                decoder: json.JSONDecoder, probs: Problems) -> Any:
    """The value of one JSONL line, FAILED once its problem is added, or None if blank."""
    if data is None:
        probs.add(f"{where}:{number}", None, f"line is longer than {MAX_JSONL_LINE_BYTES} bytes")
        return FAILED
    if offset:
        # The usual line, straight to the scanner (a million lines a catalog); anything
        # wrong, odd or blank goes the way below, which says what is wrong.
        try:
            text = data.decode("utf-8")
            value, end = decoder.scan_once(text, 0)  # type: ignore[attr-defined]
            if end == len(text):
                return value
        except Exception:
            pass
    location = f"{where}:{number}"
    skipped = len(_BOM) if offset == 0 and data.startswith(_BOM) else 0
    try:
        line = data[skipped:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = offset + skipped + exc.start
        probs.add(location, None,
                  f"not valid UTF-8: byte 0x{data[skipped + exc.start]:02x} at byte offset "
                  f"{at} (line {number}, column {skipped + exc.start + 1}); save the file "
                  "as UTF-8")
        return FAILED
    if not line or line.isspace():
        return None
    try:
        return decoder.decode(line)
    except json.JSONDecodeError as exc:
        probs.add(location, None, f"invalid JSON at column {exc.colno}: {exc.msg}")
    except (ValueError, RecursionError) as exc:
        probs.add(location, None, f"invalid JSON: {_reason(exc)}")
    return FAILED


def open_jsonl(path: Path, where: str, probs: Problems) -> BinaryIO | None:
    """The JSONL file open for reading, or None once the problem is added."""
    return _opened(path, where, probs, MAX_JSONL_BYTES,
                   lambda p: p.open("rb", buffering=1 << 20))


def identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten: device, inode, size and mtime."""
    info = path.stat()
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns
