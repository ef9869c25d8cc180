"""The pure half of the manifest loader: field rules, ids, prompt templates, expansion.

Nothing here touches the file system (input images are checked in
:mod:`batch.manifest`); everything is deterministic, so the same manifest
always yields the same ids, which name output files and checkpoints.

Field checks yield ``(suffix, message)`` problems; the suffix is appended to the
field name ("" for the field itself, ".style" under ``vars``, "[2]" in a list).

Id scheme:

* explicit ``id`` -> used as written;
* no ``id`` -> ``<slug of the prompt's first words, <= 40 chars>-<10 hex of sha256 of the
  job's written fields>`` (``a-red-fox-in-snow-3f2a9c01bd``); the 2nd, 3rd... job with
  exactly the same content gets ``-2``, ``-3``;
* ``vars`` -> ``<base>-<slug of the values>`` per combination (``poster-retro-cat``); a
  combination whose slug is empty, longer than 48 chars or shared with another
  combination of the same job gets ``<slug cut to 32 chars>-<8 hex of the values>``;
* ``count: N`` (N >= 2) -> ``-1`` .. ``-N`` appended last (``poster-retro-cat-3``).

The base is cut so that an expanded id stays within 128 characters.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batch.jobs import ASPECT_RATIOS, IMAGE_SIZES

ID_MAX = 128
PROMPT_SLUG_MAX = 40
VALUES_SLUG_MAX = 48
FALLBACK_SLUG_MAX = 32

MAX_COUNT = 1000
RESERVED_PARAMS = {
    "model": "set it with the job's 'model' field",
    "messages": "imgbatch builds them from 'prompt' and 'images'",
    "stream": "imgbatch decides how it reads the answer",
    "image_config": "use the 'aspect_ratio' and 'image_size' fields",
}

Scalar = str | int | float
Found = Iterator[tuple[str, str]]  # (field suffix, message)

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_GPT_PRICE_KEY = re.compile(r"(low|medium|high)/(1024x1024|1536x1024|1024x1536)")
VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD_RE = re.compile(r"[a-z0-9]+")
_RATIO_SEPARATOR_RE = re.compile(r"\s*[x/:×]\s*")
# Device names Windows refuses as file names, with any extension ("con.png" too).
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)]
)


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a job id, or None if it can."""
    if not ID_RE.fullmatch(value):
        return "must be 1-128 characters from A-Z a-z 0-9 . _ -"
    if value.startswith("."):
        return "must not start with a dot (it would name a hidden file)"
    if value.endswith("."):
        return "must not end with a dot (Windows drops it from file names)"
    if value.split(".", 1)[0].upper() in _WINDOWS_RESERVED:
        return "is a reserved device name on Windows; ids become file names"
    return None


def show(value: object, limit: int = 60) -> str:
    """A short repr for messages; never raises (giant ints, deep nesting)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: object) -> str:
    """What a value is, in the words of a YAML/JSON author: "a list", "a number (3)"."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "a mapping", type(None): "null"}
    name = names.get(type(value), type(value).__name__)
    if isinstance(value, list | dict) and not value:
        return f"an empty {name[2:]}"
    return f"{name} ({show(value, 30)})" if isinstance(value, int | float | str) else name


def check_id(value: Any) -> Found:
    """Problems of an explicit ``id``."""
    if not isinstance(value, str):
        yield "", f"must be a string, got {describe(value)}"
    elif why := id_problem(value):
        yield "", f"{show(value)} {why}"


def check_prompt(value: Any) -> Found:
    """Problems of ``prompt``: a string with some non-space text (kept as written)."""
    if not isinstance(value, str):
        yield "", f"must be a string, got {describe(value)}"
    elif not value.strip():
        yield "", "is empty"


def check_model(value: Any) -> Found:
    """Problems of ``model``: a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        yield "", f"must be a non-empty string, got {describe(value)}"


def check_aspect_ratio(value: Any) -> Found:
    """Problems of ``aspect_ratio``, with the fix when it is recognisable."""
    if isinstance(value, str) and value in ASPECT_RATIOS:
        return
    hint = f"one of {', '.join(ASPECT_RATIOS)}"
    if isinstance(value, int) and not isinstance(value, bool):
        # What YAML 1.1 tools (not ours) make of an unquoted 16:9: the base-60 number 969.
        for ratio in ASPECT_RATIOS:
            a, b = ratio.split(":")
            if int(a) * 60 + int(b) == value:
                hint = f'"{ratio}" in quotes; YAML 1.1 reads an unquoted {ratio} as {value}'
    elif isinstance(value, str):
        near = _RATIO_SEPARATOR_RE.sub(":", value.strip())
        if near in ASPECT_RATIOS:
            hint = f'"{near}"'
    yield "", f"{show(value)} is not valid; write {hint}"


def check_image_size(value: Any) -> Found:
    """Problems of ``image_size``; strict about the capital K, but says so."""
    if isinstance(value, str) and value in IMAGE_SIZES:
        return
    upper = value.strip().upper() if isinstance(value, str) else ""
    hint = f"write '{upper}' (capital K)" if upper in IMAGE_SIZES else "one of 1K, 2K, 4K"
    yield "", f"{show(value)} is not valid; {hint}"


def check_count(value: Any) -> Found:
    """Problems of ``count``: a whole number 1..1000 (true/false are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        yield "", f"must be a whole number from 1 to {MAX_COUNT}, got {describe(value)}"


def check_params(value: Any) -> Found:
    """Problems of ``params``: JSON request fields that leave the protocol's own alone."""
    if not isinstance(value, dict):
        yield "", f"must be a mapping of extra request fields, got {describe(value)}"
        return
    for key in value:
        if not isinstance(key, str):
            yield "", f"keys must be strings, got {describe(key)}"
        elif key in RESERVED_PARAMS:
            yield f".{key}", f"would overwrite the request's own '{key}'; {RESERVED_PARAMS[key]}"
    try:
        canonical_json(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        yield "", ("must hold only JSON values (text, finite numbers, true/false, null, "
                   "lists, mappings with text keys)")


def check_vars(value: Any) -> Found:
    """Problems of ``vars``: name -> non-empty list of distinct text/number values."""
    if not isinstance(value, dict) or not value:
        yield "", f"must be a mapping of name -> list of values, got {describe(value)}"
        return
    for name, values in value.items():
        where = f".{show(name, 40).strip(chr(39))}"
        if not isinstance(name, str) or not VAR_NAME_RE.fullmatch(name):
            yield where, "var names are letters, digits and _ (not starting with a digit)"
        elif not isinstance(values, list) or not values:
            yield where, f"must be a non-empty list of values, got {describe(values)}"
        else:
            seen: set[str] = set()
            for n, item in enumerate(values):
                if isinstance(item, bool) or not isinstance(item, str | int | float):
                    quote = "; quote yes/no/on/off in YAML" if isinstance(item, bool) else ""
                    yield f"{where}[{n}]", f"must be text or a number, got {describe(item)}{quote}"
                    continue
                try:
                    text = render_value(item)
                except ValueError:  # an int too long to print
                    yield f"{where}[{n}]", "number is too large"
                    continue
                if text in seen:
                    yield f"{where}[{n}]", f"value {show(text)} is listed twice"
                seen.add(text)


FIELD_CHECKS: Mapping[str, Callable[[Any], Found]] = {
    "id": check_id, "prompt": check_prompt, "model": check_model,
    "aspect_ratio": check_aspect_ratio, "image_size": check_image_size,
    "count": check_count, "params": check_params, "vars": check_vars,
}


def check_pricing(raw: Any) -> tuple[dict[str, dict[str, float]], list[tuple[str, str]]]:
    """The price table (model -> image size -> USD per image) and its problems."""
    out: dict[str, dict[str, float]] = {}
    if not isinstance(raw, dict):
        return out, [("", "must be a mapping: model -> image size -> USD per image")]
    found: list[tuple[str, str]] = []
    for model, sizes in raw.items():
        where = f".{show(model, 40).strip(chr(39))}"
        if not isinstance(model, str) or not isinstance(sizes, dict):
            found.append((where, "must map a model name to {image size: USD per image}"))
            continue
        for size, price in sizes.items():
            try:
                ok = not isinstance(price, bool) and math.isfinite(price) and price >= 0
            except (TypeError, OverflowError):
                ok = False
            if size not in IMAGE_SIZES and not (isinstance(size, str)
                                                and _GPT_PRICE_KEY.fullmatch(size)):
                found.append((f"{where}.{show(size, 20).strip(chr(39))}",
                              "image size must be 1K, 2K or 4K (gpt-image: quality/size, "
                              "e.g. low/1024x1024)"))
            elif not ok:
                found.append((f"{where}.{size}", f"must be a number >= 0, got {describe(price)}"))
            else:
                out.setdefault(model, {})[size] = float(price)
    return out, found


def canonical_json(value: object, *, allow_nan: bool = True) -> str:
    """The one JSON text of ``value`` used for hashing (sorted keys, ASCII, no spaces)."""
    # ensure_ascii keeps lone surrogates (legal in JSON input) encodable for hashing.
    return json.dumps(
        value, sort_keys=True, ensure_ascii=True, separators=(",", ":"), allow_nan=allow_nan
    )


def short_hash(value: object, length: int) -> str:
    """The first ``length`` hex digits of sha256 over the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode("ascii")).hexdigest()[:length]


def slugify(text: str, limit: int) -> str:
    """Lowercase ASCII words of ``text`` joined by "-", cut at a word boundary within limit."""
    # NFKD first so "Café" gives "cafe" rather than "caf"; only a prefix can reach the slug.
    folded = unicodedata.normalize("NFKD", text[: limit * 8]).encode("ascii", "ignore")
    out = ""
    for match in _WORD_RE.finditer(folded.decode("ascii").lower()):
        word = match.group()
        candidate = f"{out}-{word}" if out else word
        if len(candidate) > limit:
            return out or word[:limit]
        out = candidate
    return out


def derived_id(prompt: str, written: Mapping[str, object]) -> str:
    """The id of a job written without one: prompt slug plus a hash of its fields."""
    return f"{slugify(prompt, PROMPT_SLUG_MAX) or 'job'}-{short_hash(written, 10)}"


@dataclass(frozen=True, slots=True)
class Template:
    """A prompt split into (literal text, var name or None) pieces."""

    parts: tuple[tuple[str, str | None], ...]

    def render(self, values: Mapping[str, str]) -> str:
        """The prompt with each placeholder replaced by its value."""
        return "".join(lit + values[name] if name else lit for lit, name in self.parts)


def parse_template(
    prompt: str, names: Sequence[str]
) -> tuple[Template | None, list[tuple[str, str]]]:
    """Parse ``{name}`` placeholders; returns the template or (field, message) problems."""
    try:
        pieces = list(string.Formatter().parse(prompt))
    except ValueError as exc:
        hint = "write literal braces as {{ and }}"
        return None, [("prompt", f"is not a valid template ({exc}); {hint}")]
    problems: list[tuple[str, str]] = []
    parts: list[tuple[str, str | None]] = []
    used: set[str] = set()
    known = set(names)
    for literal, name, spec, conversion in pieces:
        if name is None:
            parts.append((literal, None))
        elif (base := name.split(".", 1)[0].split("[", 1)[0]) not in known:  # "a" of "a.b"
            listed = ", ".join(names)
            problems.append(("prompt", f"placeholder {{{name}}} is not one of the vars ({listed})"))
        elif spec or conversion or base != name:
            used.add(base)  # the var is meant; saying it is unused too would be noise
            problems.append(("prompt", f"placeholder {{{name}}} must be plain {{{base}}}, "
                             "without . [ ! or :"))
        else:
            used.add(name)
            parts.append((literal, name))
    problems += [(f"vars.{n}", "is never used in the prompt") for n in names if n not in used]
    return (None if problems else Template(tuple(parts))), problems


def render_value(value: Scalar) -> str:
    """How a var value reads in a prompt (may raise ValueError for giant ints)."""
    return value if isinstance(value, str) else str(value)


def variant_count(variables: Mapping[str, Sequence[Scalar]], count: int) -> int:
    """How many jobs one entry expands to."""
    total = count
    for values in variables.values():
        total *= len(values)
    return total


def expand(
    base_id: str,
    prompt: str,
    template: Template | None,
    variables: Mapping[str, Sequence[Scalar]],
    count: int,
) -> list[tuple[str, str]]:
    """The (id, prompt) pairs of one entry: vars cross product (in order written) x count."""
    variants: list[tuple[str, str]] = [("", prompt)]
    if template is not None and variables:
        names = list(variables)
        combos = list(itertools.product(*variables.values()))
        shown = [[render_value(v) for v in combo] for combo in combos]
        slugs = [slugify(" ".join(texts), ID_MAX) for texts in shown]
        seen = Counter(slugs)
        variants = []
        for combo, texts, slug in zip(combos, shown, slugs, strict=True):
            if not slug or len(slug) > VALUES_SLUG_MAX or seen[slug] > 1:
                # Keep a readable prefix but make the suffix unique and bounded.
                short = slugify(slug, FALLBACK_SLUG_MAX)
                digest = short_hash(list(combo), 8)
                slug = f"{short}-{digest}" if short else digest
            variants.append((f"-{slug}", template.render(dict(zip(names, texts, strict=True)))))
    copies = [f"-{k}" for k in range(1, count + 1)] if count > 1 else [""]
    out: list[tuple[str, str]] = []
    for suffix, text in variants:
        for copy in copies:
            tail = suffix + copy
            out.append((base_id[: ID_MAX - len(tail)] + tail, text))
    return out
