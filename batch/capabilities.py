"""What each model accepts (sizes, ratios, input images), so a plan is checked before it is paid.

The table lives in ``capabilities.json`` beside this module: per provider, the
model names it answers to, each pointing at one entry of ``models``. A 4K job
on a model that draws 1K only would otherwise cost retries and a 400 from the
gateway; :func:`check` names the job, the field and what the model accepts,
and :func:`enforce` turns those into one ManifestError before anything is
sent. A model the table does not know passes, with one warning per model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from batch.errors import ManifestError, Problem
from batch.jobs import Job

log = logging.getLogger(__name__)

DATA_FILE = "capabilities.json"
DEFAULT_PROVIDER = "chat"
MAX_PROBLEMS = 50


@dataclass(frozen=True)
class ModelCaps:
    """What one model accepts and returns."""

    name: str
    image_sizes: tuple[str, ...]
    aspect_ratios: tuple[str, ...]
    max_input_images: int
    output_formats: tuple[str, ...]


@dataclass(frozen=True)
class CapabilityTable:
    """Provider -> model name as the provider spells it -> capabilities."""

    providers: Mapping[str, Mapping[str, ModelCaps]]

    def lookup(self, provider: str, model: str) -> ModelCaps | None:
        return self.providers.get(provider, {}).get(model)


def parse_table(raw: Mapping[str, Any]) -> CapabilityTable:
    """Build the table from the data file's JSON; raises ValueError naming a bad entry."""
    models: dict[str, ModelCaps] = {}
    for name, entry in raw.get("models", {}).items():
        try:
            models[name] = ModelCaps(
                name=name,
                image_sizes=tuple(entry["image_sizes"]),
                aspect_ratios=tuple(entry["aspect_ratios"]),
                max_input_images=int(entry["max_input_images"]),
                output_formats=tuple(entry.get("output_formats", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"capabilities: model {name!r}: bad or missing {exc}") from None
    providers: dict[str, dict[str, ModelCaps]] = {}
    for provider, names in raw.items():
        if provider.startswith("_") or provider == "models":
            continue
        for model, family in names.items():
            if family not in models:
                raise ValueError(f"capabilities: {provider}/{model} points at unknown {family!r}")
            providers.setdefault(provider, {})[model] = models[family]
    return CapabilityTable(providers)


def load_table(path: Path | None = None) -> CapabilityTable:
    """The table shipped with the package, or the one at ``path``."""
    if path is None:
        text = resources.files("batch").joinpath(DATA_FILE).read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return parse_table(json.loads(text))


def check(job: Job, provider_name: str, table: CapabilityTable | None = None) -> list[Problem]:
    """What ``job`` asks that its model on ``provider_name`` does not do (empty if fine or
    if the model is unknown; see :func:`is_known`)."""
    caps = (table or load_table()).lookup(provider_name, job.model)
    if caps is None:
        return []
    found = []

    def bad(field: str, message: str) -> None:
        found.append(Problem(job.location or f"job '{job.id}'", field,
                             f"job '{job.id}': {message}"))

    if job.image_size not in caps.image_sizes:
        bad("image_size", f"{job.model} does not make {job.image_size} images; it accepts "
            f"{', '.join(caps.image_sizes)}")
    if job.aspect_ratio not in caps.aspect_ratios:
        bad("aspect_ratio", f"{job.model} does not make {job.aspect_ratio} images; it accepts "
            f"{', '.join(caps.aspect_ratios)}")
    if len(job.images) > caps.max_input_images:
        bad("images", f"{len(job.images)} input images; {job.model} accepts at most "
            f"{caps.max_input_images}")
    return found


def is_known(model: str, provider_name: str, table: CapabilityTable) -> bool:
    return table.lookup(provider_name, model) is not None


def enforce(jobs: Iterable[Job], provider_name: str = DEFAULT_PROVIDER,
            table: CapabilityTable | None = None) -> None:
    """Raise one ManifestError listing every job its model cannot do; warn once per model
    the table does not know."""
    table = table or load_table()
    problems: list[Problem] = []
    more = 0
    unknown: set[str] = set()
    for job in jobs:
        if not is_known(job.model, provider_name, table):
            unknown.add(job.model)
            continue
        for problem in check(job, provider_name, table):
            if len(problems) < MAX_PROBLEMS:
                problems.append(problem)
            else:
                more += 1
    for model in sorted(unknown):
        log.warning("model %s is not in the capability table (batch/%s); its jobs are not "
                    "checked against what it accepts", model, DATA_FILE)
    if problems:
        raise ManifestError(problems, more)
