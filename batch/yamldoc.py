"""YAML manifests: PyYAML's safe loader, except that `16:9` stays a string and duplicate
keys fail. Its own module so that a JSONL run never loads PyYAML (:mod:`batch.manifestfile`
imports it for a YAML file only)."""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode

try:  # the libyaml parser is several times faster; the pure one gives the same values
    from yaml import CSafeLoader as _SafeBase
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _SafeBase  # type: ignore[assignment]

# YAML 1.1 reads an unquoted 16:9 as the base-60 integer 969 (and 1:1 as 61).
_SEXAGESIMAL_RE = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")


class YamlProblem(ValueError):
    """The document is not valid YAML: ``message`` says where, ``line`` is 1-based or 0."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


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


def load_yaml(text: str) -> Any:
    """The document's value; YamlProblem if it is not valid YAML. Other errors of the
    constructors (``!!int abc``, giant ints) propagate as they are."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        message = f"invalid YAML{at}: {exc.problem or exc.context}"
        if exc.problem and "constructor for the tag" in exc.problem:
            message += " (tags that build objects are not allowed)"
        raise YamlProblem(mark.line + 1 if mark else 0, message) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise YamlProblem(line, f"invalid YAML at line {line}: character "
                          f"U+{exc.character:04X} is not allowed ({exc.reason})") from None
