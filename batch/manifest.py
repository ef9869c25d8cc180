"""Load a manifest (YAML, JSON or JSONL) into validated, expanded Jobs.

This is the one boundary where file, YAML and JSON failures become a
ManifestError: every problem in the file is collected (capped) and raised
together, and no other exception escapes whatever the file holds. Nothing is
written. Reading and parsing the file live in :mod:`batch.manifestfile`, input
images in :mod:`batch.inputs`, id rules, templates and expansion in
:mod:`batch.expand`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch import expand as ex
from batch.endpoints import (
    CHAT,
    OPTION_FIELDS,
    Endpoint,
    check_job,
    check_option,
    parse_endpoints,
    resolve,
)
from batch.errors import ManifestError
from batch.inputs import InputImages
from batch.inputs import probe_file as _probe_file
from batch.jobs import (
    ASPECT_RATIOS,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_IMAGE_SIZE,
    IMAGE_SIZES,
    Job,
)
from batch.linememo import digest64
from batch.manifestfile import (
    FAILED,
    FORMATS,
    Problems,
    json_decoder,
    parse_document,
    read_text,
)
from batch.manifestfile import MAX_JSONL_LINE_BYTES as MAX_JSONL_LINE_BYTES
from batch.manifestfile import MAX_MANIFEST_BYTES as MAX_MANIFEST_BYTES
from batch.manifestjobs import JobDigests, ManifestJobs

log = logging.getLogger(__name__)

_QUICK_KEYS = frozenset(("id", "prompt", "aspect_ratio", "image_size", "model"))
_RATIOS = frozenset(ASPECT_RATIOS)
_SIZES = frozenset(IMAGE_SIZES)

MAX_JOBS = 1_000_000  # after expansion; guards memory against a runaway cross product
JOB_FIELDS = ("id", "prompt", "aspect_ratio", "image_size", "model", "images", "params",
              "count", "vars", "endpoint", *OPTION_FIELDS)
TOP_LEVEL_KEYS = ("endpoints", "defaults", "jobs", "pricing")
_FIELD_CHECKS = {**ex.FIELD_CHECKS, "endpoint": ex.check_model,
                 **{name: check_option for name in OPTION_FIELDS}}


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest: its jobs in order, and the optional price table."""

    path: Path
    jobs: ManifestJobs  # a sequence; a JSONL catalog is read again at each pass
    pricing: Mapping[str, Mapping[str, float]]  # model -> image_size -> USD per image
    # name -> endpoint, in manifest order; empty: one endpoint from the command line
    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)


def load_manifest(
    path: Path,
    *,
    default_model: str | None = None,
    max_problems: int = 50,
    provider: str = CHAT,
    endpoint: str | None = None,
    memo: Path | None = None,
) -> Manifest:
    """Read, validate and expand a manifest; raises ManifestError listing every problem.

    A JSONL catalog streams (:mod:`batch.catalog`); ``memo`` (the output folder's
    line memo, :mod:`batch.linememo`) lets it skip lines known from a previous run
    and plan by digest.

    ``provider`` serves every job when the manifest names no endpoints; ``endpoint``
    (``--endpoint``) serves the jobs that name none when it does. ``default_model``
    (``--model``) is for jobs naming no model, else their endpoint's default.
    """
    where = str(path)
    probs = Problems(max_problems)
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        probs.add(where, None, "unknown manifest type; use .yaml, .yml, .json, .jsonl or .ndjson")
        raise ManifestError(probs.items)
    if fmt == "jsonl":
        from batch.catalog import load_jsonl

        return load_jsonl(Path(path), _Options(default_model, provider, endpoint, max_problems),
                          probs, memo)
    text = read_text(Path(path), where, probs)
    builder = _Builder(Path(path), default_model, probs)
    builder.single = Endpoint.default(provider)
    builder.chosen = endpoint
    pricing: dict[str, dict[str, float]] = {}
    if text is not None:
        doc = parse_document(text, fmt, where, json_decoder(), probs)
        if doc is not FAILED:
            pricing = builder.build_document(doc)
        if builder.entries == 0 and not probs:
            probs.add(where, None, "the manifest lists no jobs")
    if endpoint is not None and endpoint not in builder.endpoints:
        probs.add(where, "endpoints", f"--endpoint {endpoint}: the manifest names no such "
                  "endpoint" + (f" (it names {', '.join(builder.endpoints)})"
                                if builder.endpoints else ""))
    if probs:
        raise ManifestError(probs.items, probs.more)
    log.debug("%s: %d job(s) from %d entr(ies), %d input file(s) hashed", where,
              len(builder.jobs), builder.entries, len(builder.inputs.files))
    return Manifest(Path(path), ManifestJobs.held(builder.jobs), pricing, builder.endpoints)


@dataclass(frozen=True)
class _Options:
    """What shapes the jobs besides the file: the command line's say."""

    default_model: str | None
    provider: str
    endpoint: str | None
    max_problems: int


class _Builder:
    """Validates entries and turns them into Jobs; holds the per-load caches."""

    def __init__(self, path: Path, default_model: str | None, probs: Problems) -> None:
        self.where = str(path)
        self.default_model = default_model
        self.endpoints: dict[str, Endpoint] = {}
        self.single = Endpoint.default(CHAT)  # when the manifest names no endpoints
        self.chosen: str | None = None
        self.probs = probs
        self.jobs: list[Job] = []
        self.entries = 0
        self.defaults: dict[str, Any] = {}
        self.defaults_written: dict[str, Any] = {}
        self.no_params: dict[str, Any] = {}  # one shared empty mapping per load
        # Looked up here, at load time, so tests can patch batch.manifest._probe_file.
        self.inputs = InputImages(path.parent, self.bad, _probe_file)
        self.derived: Counter[str] = Counter()
        self.ids: dict[str, tuple[str, str]] = {}  # lowercased id -> (id, location)
        self.count = 0  # jobs made so far
        self.keep = True  # False: a streamed catalog; jobs are returned, not kept
        self.digests: JobDigests | None = None  # streamed: ids are checked from digests
        self.naming: set[int] | None = None  # lowercased-id digests whose clash is named
        self.replaying = False  # building again what was validated: no checks
        self.ordinal: int | None = None  # building one entry again: its derived id's "-n"

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
            if "endpoints" in doc:
                self.endpoints, found = parse_endpoints(doc["endpoints"])
                for field_name, message in found:
                    self.bad(self.where, field_name, message)
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
            if raw is not FAILED:
                self.entry(raw, location)

    def quick(self, raw: dict[str, Any], location: str) -> Job | None:
        """The job of the commonest entry (explicit id, prompt, model, size and ratio, all
        plainly valid), checked in a few lines; None: ask :meth:`entry`, which names the
        problems. A catalog of a million such lines spends most of its time here."""
        if not _QUICK_KEYS.issuperset(raw) or self.defaults or self.endpoints:
            return None
        ident = raw.get("id")
        prompt = raw.get("prompt")
        if not isinstance(ident, str) or not isinstance(prompt, str):
            return None
        if not self.replaying and (not prompt.strip() or ex.id_problem(ident) is not None):
            return None
        ratio = raw.get("aspect_ratio", DEFAULT_ASPECT_RATIO)
        size = raw.get("image_size", DEFAULT_IMAGE_SIZE)
        model = raw.get("model")
        if ratio not in _RATIOS or size not in _SIZES:
            return None
        if model is None:
            model = self.default_model or self.single.model
        elif not isinstance(model, str) or not model.strip():
            return None
        else:
            model = model.strip()
        job = Job(ident, prompt, model, ratio, size, (), self.no_params, self.count, location,
                  self.single.name, {})
        if not self.replaying:
            if next(iter(check_job(self.single.provider, job)), None) is not None:
                return None
            self._register(ident, location)
        self.count += 1
        if self.keep:
            self.jobs.append(job)
        return job

    def entry(self, raw: Any, location: str) -> list[Job]:
        """Validate one entry; its jobs (also kept in ``jobs`` unless streaming)."""
        if not isinstance(raw, dict):
            self.bad(location, None, f"a job must be a mapping of fields, got {ex.describe(raw)}")
            return []
        own = self._fields(raw, location, JOB_FIELDS)
        if "prompt" not in raw:
            self.bad(location, "prompt", "is required")
            return []
        if own is None:
            return []
        job = {**self.defaults, **own}
        variables: dict[str, list[ex.Scalar]] = job.get("vars", {})
        count: int = job.get("count", 1)
        template = None
        if variables:
            template, found = ex.parse_template(job["prompt"], list(variables))
            for field, message in found:
                self.bad(location, field, message)
            if template is None:
                return []
        size = ex.variant_count(variables, count)
        if self.count + size > MAX_JOBS:
            self.bad(location, None, f"expands to {size} jobs; a manifest may hold {MAX_JOBS}")
            return []
        target = self._endpoint(job.get("endpoint", ""), location)
        if target is None:
            return []
        base = own.get("id") or self._derived_id(raw)
        model = job.get("model", self.default_model or target.model)
        ratio = job.get("aspect_ratio", DEFAULT_ASPECT_RATIO)
        image_size = job.get("image_size", DEFAULT_IMAGE_SIZE)
        images = job.get("images", ())
        params = job.get("params", self.no_params)
        options = {name: job[name] for name in OPTION_FIELDS if name in job}
        made = []
        for ident, prompt in ex.expand(base, job["prompt"], template, variables, count):
            if not self.replaying:
                self._register(ident, location)
            made.append(Job(ident, prompt, model, ratio, image_size, images, params,
                            self.count, location, target.name, options))
            self.count += 1
        if made and not self.replaying:  # every variant asks the same of its provider
            for field_name, message in check_job(target.provider, made[0]):
                self.bad(location, field_name, message)
        if self.keep:
            self.jobs += made
        return made

    def _endpoint(self, name: str, location: str) -> Endpoint | None:
        if not self.endpoints:
            if name:
                self.bad(location, "endpoint", f"names endpoint {name!r}, but the manifest "
                         "has no endpoints: mapping")
                return None
            return self.single
        found, problem = resolve(self.endpoints, name, self.chosen)
        if found is None and name:  # a bad --endpoint is reported once, by load_manifest
            self.bad(location, "endpoint", problem)
        return found

    def _derived_id(self, raw: dict[str, Any]) -> str:
        # Hash what the user wrote (after defaults), never --model or built-ins, so
        # changing the command line does not rename finished jobs.
        written = {**self.defaults_written, **{k: v for k, v in raw.items() if k != "id"}}
        ident = ex.derived_id(raw["prompt"], written)
        if self.ordinal is not None:  # building one entry again, away from the others
            return ident if self.ordinal == 1 else f"{ident}-{self.ordinal}"
        self.derived[ident] += 1
        seen = self.derived[ident]
        if seen > 1 and self.digests is not None:
            self.digests.ordinals[self.count] = seen
        return ident if seen == 1 else f"{ident}-{seen}"

    def _register(self, ident: str, location: str) -> None:
        if self.digests is not None:  # streamed: clashes are found from digests at the end
            return
        key = ident.lower()
        if self.naming is not None and digest64(key.encode()) not in self.naming:
            return
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
        out: dict[str, Any]
        if self.replaying:  # checked when it was validated: the same values, faster
            out = dict(raw)
            if isinstance(out.get("model"), str):
                out["model"] = out["model"].strip()
            if "images" in out:
                out["images"] = self.inputs.images(out["images"], location)
            return out
        out = {}
        ok = True
        for key, value in raw.items():
            if key not in allowed:
                self._unknown(location, key, allowed, "field")
                ok = False
            elif key == "images":
                out[key] = self.inputs.images(value, location)
                ok = ok and out[key] is not None
            else:
                for suffix, message in _FIELD_CHECKS[key](value):
                    self.bad(location, key + suffix, message)
                    ok = False
                out[key] = value.strip() if key == "model" and ok else value
        return out if ok else None

    def _unknown(self, location: str, key: Any, allowed: tuple[str, ...], what: str) -> None:
        if not isinstance(key, str):
            self.bad(location, None, f"{what} names must be strings, got {ex.describe(key)}")
            return
        import difflib  # only for a misspelt key

        close = difflib.get_close_matches(key[:100], allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(allowed)}"
        self.bad(location, ex.show(key, 40).strip("'\""), f"unknown {what}{hint}")

