"""The manifest loader: formats, every validation rule, ids, expansion, input images."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch import manifest as manifest_module
from batch.errors import ManifestError, Problem
from batch.jobs import DEFAULT_ASPECT_RATIO, DEFAULT_IMAGE_SIZE, InputKind
from batch.manifest import Manifest, load_manifest
from batch.manifestjobs import summarize

DATA = Path(__file__).parent / "data" / "manifests"
PNG = (DATA / "pixel.png").read_bytes()
PNG_DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def jsonl(*jobs: Any) -> str:
    return "".join(json.dumps(job) + "\n" for job in jobs)


def problems_of(path: Path, **kwargs: Any) -> list[Problem]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, **kwargs)
    return caught.value.problems


def assert_problem(found: list[Problem], location: str, field: str | None, text: str) -> None:
    for problem in found:
        if (
            location in problem.location
            and problem.field == field
            and text.lower() in problem.message.lower()
        ):
            return
    pytest.fail(
        f"no problem at {location!r} / {field!r} ~ {text!r} in:\n" + "\n".join(map(str, found))
    )


# -- valid forms ---------------------------------------------------------------

VALID = [
    ("list.yaml", "- prompt: a cat\n  id: cat\n  image_size: 2K\n- prompt: a dog\n  id: dog\n"),
    ("list.yml", "- {prompt: a cat, id: cat, image_size: 2K}\n- {prompt: a dog, id: dog}\n"),
    (
        "defaults.yaml",
        "defaults: {model: m}\njobs:\n  - {prompt: a cat, id: cat, image_size: 2K}"
        "\n  - {prompt: a dog, id: dog}\n",
    ),
    (
        "lines.jsonl",
        jsonl({"prompt": "a cat", "id": "cat", "image_size": "2K"}, {}).replace(
            "{}\n", '\n  \n{"prompt": "a dog", "id": "dog"}\r\n'
        ),
    ),
    (
        "lines.ndjson",
        jsonl(
            {"prompt": "a cat", "id": "cat", "image_size": "2K"}, {"prompt": "a dog", "id": "dog"}
        ),
    ),
    (
        "doc.json",
        json.dumps(
            {
                "jobs": [
                    {"prompt": "a cat", "id": "cat", "image_size": "2K"},
                    {"prompt": "a dog", "id": "dog"},
                ]
            }
        ),
    ),
    (
        "list.json",
        json.dumps(
            [{"prompt": "a cat", "id": "cat", "image_size": "2K"}, {"prompt": "a dog", "id": "dog"}]
        ),
    ),
]


@pytest.mark.parametrize(("name", "content"), VALID)
def test_valid_forms(tmp_path: Path, name: str, content: str) -> None:
    manifest = load_manifest(write(tmp_path, name, content), default_model="cli-model")
    assert isinstance(manifest, Manifest)
    cat, dog = manifest.jobs
    assert (cat.id, cat.prompt, cat.image_size, cat.index) == ("cat", "a cat", "2K", 0)
    assert (dog.id, dog.image_size, dog.aspect_ratio, dog.index) == (
        "dog",
        DEFAULT_IMAGE_SIZE,
        DEFAULT_ASPECT_RATIO,
        1,
    )
    assert dog.model == ("m" if name.startswith("defaults") else "cli-model")
    assert manifest.pricing == {}


def test_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.jsonl", '\n{"prompt": "x", "id": "a"}\n\n{"prompt": "y"}\n')
    write(tmp_path, "a.yaml", "- {prompt: x, id: a}\n- {prompt: y}\n")
    assert [j.location for j in load_manifest(Path("a.jsonl")).jobs] == ["a.jsonl:2", "a.jsonl:4"]
    assert [j.location for j in load_manifest(Path("a.yaml")).jobs] == [
        "a.yaml: job 1 (id 'a')",
        "a.yaml: job 2",
    ]


def test_catalog_fixture_uses_every_feature() -> None:
    manifest = load_manifest(DATA / "catalog.yaml")
    ids = [job.id for job in manifest.jobs]
    assert ids[:4] == [
        "poster-retro-cat",
        "poster-retro-dog",
        "poster-modern-cat",
        "poster-modern-dog",
    ]
    assert ids[4:7] == ["sketch-1", "sketch-2", "sketch-3"]
    assert ids[7].startswith("a-lighthouse-at-dusk-")
    assert manifest.jobs[2].prompt == "A modern poster of a cat"
    assert {j.aspect_ratio for j in manifest.jobs[:4]} == {"16:9"}
    assert manifest.jobs[4].aspect_ratio == "1:1"
    assert {j.model for j in manifest.jobs} == {"house-model"}
    assert manifest.jobs[7].params == {"temperature": 0.7}
    image = manifest.jobs[4].images[0]
    assert image.kind is InputKind.FILE and image.ref == str((DATA / "pixel.png").resolve())
    assert image.mime == "image/png" and image.size_bytes == len(PNG)
    assert image.digest == hashlib.sha256(PNG).hexdigest() and image.source == "pixel.png"
    assert manifest.pricing == {"house-model": {"1K": 0.04, "2K": 0.08}}
    assert summarize(manifest.jobs) == {
        "jobs": 8,
        "by_size_and_ratio": {"2K": {"1:1": 3, "16:9": 5}},
        "by_model": {"house-model": 8},
        "input_images": {"file": 3, "url": 0, "data": 0},
        "input_image_bytes": 3 * len(PNG),
    }
    lines = load_manifest(DATA / "catalog.jsonl")
    assert [j.location.rsplit("/", 1)[-1] for j in lines.jobs] == [
        "catalog.jsonl:1",
        "catalog.jsonl:3",
    ]
    assert lines.jobs[1].images[0].kind is InputKind.URL


@pytest.mark.parametrize(
    ("written", "expected"), [("16:9", "16:9"), ("1:1", "1:1"), ("21:9", "21:9"), ('"4:3"', "4:3")]
)
def test_unquoted_yaml_ratio_stays_a_ratio(tmp_path: Path, written: str, expected: str) -> None:
    # Plain PyYAML reads 16:9 as the base-60 integer 969 and 1:1 as 61.
    plain = yaml.safe_load(f"a: {written}")["a"]
    assert plain == expected if written.startswith('"') else isinstance(plain, int)
    path = write(tmp_path, "r.yaml", f"- prompt: x\n  aspect_ratio: {written}\n")
    assert load_manifest(path).jobs[0].aspect_ratio == expected


def test_bom_is_tolerated(tmp_path: Path) -> None:
    content = b"\xef\xbb\xbf" + jsonl({"prompt": "x", "id": "a"}).encode()
    path = write(tmp_path, "bom.jsonl", content)
    assert load_manifest(path).jobs[0].id == "a"


# -- invalid input: (file name, content, location substring, field, message substring) ----

J = "m.jsonl"
Y = "m.yaml"
DEEP = "[" * 100_000 + "]" * 100_000

INVALID: list[tuple[str, str | bytes, str, str | None, str]] = [
    ("m.txt", "x", "m.txt", None, "unknown manifest type"),
    (Y, "", "m.yaml", None, "lists no jobs"),
    (J, "\n \n", "m.jsonl", None, "lists no jobs"),
    ("m.json", "[]", "m.json", None, "lists no jobs"),
    (Y, "defaults: {model: m}\n", "m.yaml", None, "lists no jobs"),
    (Y, "- prompt: x\n- prompt: [unclosed\n", "m.yaml:", None, "line 3, column"),
    (
        Y,
        "- prompt: !!python/object/apply:os.system [echo hi]\n",
        "m.yaml:1",
        None,
        "tags that build objects",
    ),
    (Y, b"- prompt: ok\n- prompt: caf\xe9\n", "m.yaml:2", None, "byte offset 26"),
    (Y, "- prompt: x\n  prompt: y\n", "m.yaml:2", None, "appears twice"),
    (Y, DEEP, "m.yaml", None, ""),
    (Y, "just text\n", "m.yaml", None, "must be a list of jobs"),
    (Y, "jobs: {prompt: x}\n", "m.yaml", "jobs", "must be a list"),
    (Y, "job: [{prompt: x}]\n", "m.yaml", "job", "did you mean 'jobs'"),
    (
        Y,
        "defaults: {prompt: x}\njobs: [{prompt: y}]\n",
        "m.yaml: defaults",
        "prompt",
        "cannot be set in defaults",
    ),
    (Y, "defaults: {id: x}\njobs: [{prompt: y}]\n", "m.yaml: defaults", "id", "defaults"),
    (Y, "defaults: [1]\njobs: [{prompt: y}]\n", "m.yaml: defaults", None, "mapping"),
    (
        Y,
        "defaults: {image_size: 8K}\njobs: [{prompt: y}]\n",
        "m.yaml: defaults",
        "image_size",
        "one of",
    ),
    (Y, "jobs: [{prompt: y}]\npricing: [1]\n", "m.yaml: pricing", "pricing", "mapping"),
    (Y, "jobs: [{prompt: y}]\npricing: {m: {1K: -1}}\n", "m.yaml: pricing", "pricing.m.1K", ">= 0"),
    (
        Y,
        "jobs: [{prompt: y}]\npricing: {m: {8K: 1}}\n",
        "m.yaml: pricing",
        "pricing.m.8K",
        "1K, 2K or 4K",
    ),
    (J, '{"prompt": "x"}\n{"prompt": "y",}\n', "m.jsonl:2", None, "invalid JSON"),
    (J, '["prompt"]\n', "m.jsonl:1", None, "mapping of fields"),
    (J, '{"prompt": "x", "prompt": "y"}\n', "m.jsonl:1", None, "appears twice"),
    (J, '{"prompt": "' + "x" * (1024 * 1024) + '"}\n', "m.jsonl:1", None, "longer than"),
    (J, '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "m.jsonl:1", None, ""),
    (J, '{"prompt": 1' + "0" * 5000 + "}\n", "m.jsonl:1", None, ""),
    ("m.json", '{"jobs": [\n{"prompt": x}]}', "m.json:2", None, "line 2, column"),
    (J, "{}\n", "m.jsonl:1", "prompt", "required"),
    (J, jsonl({"prompt": "  "}), "m.jsonl:1", "prompt", "empty"),
    (J, jsonl({"prompt": ["a"]}), "m.jsonl:1", "prompt", "must be a string"),
    (J, jsonl({"prompt": "x", "promt": "y"}), "m.jsonl:1", "promt", "did you mean 'prompt'"),
    (J, jsonl({"prompt": "x", "zzz": 1}), "m.jsonl:1", "zzz", "unknown field"),
    (Y, "- {prompt: x, 3: y}\n", "m.yaml: job 1", None, "must be strings"),
    (J, jsonl({"prompt": "x", "id": ".hidden"}), "m.jsonl:1", "id", "dot"),
    (J, jsonl({"prompt": "x", "id": "a b"}), "m.jsonl:1", "id", "1-128 characters"),
    (J, jsonl({"prompt": "x", "id": "x" * 129}), "m.jsonl:1", "id", "1-128 characters"),
    (J, jsonl({"prompt": "x", "id": ""}), "m.jsonl:1", "id", "1-128 characters"),
    (J, jsonl({"prompt": "x", "id": 7}), "m.jsonl:1", "id", "must be a string"),
    (J, jsonl({"prompt": "x", "id": "end."}), "m.jsonl:1", "id", "end with a dot"),
    *[
        (J, jsonl({"prompt": "x", "id": name}), "m.jsonl:1", "id", "reserved device name")
        for name in ("CON", "nul", "Aux.png", "com1", "LPT9.tar.gz", "prn")
    ],
    (J, jsonl({"prompt": "x", "aspect_ratio": "7:5"}), "m.jsonl:1", "aspect_ratio", "one of"),
    (
        J,
        jsonl({"prompt": "x", "aspect_ratio": "16x9"}),
        "m.jsonl:1",
        "aspect_ratio",
        'write "16:9"',
    ),
    (
        J,
        jsonl({"prompt": "x", "aspect_ratio": 969}),
        "m.jsonl:1",
        "aspect_ratio",
        "unquoted 16:9 as 969",
    ),
    (Y, "- {prompt: x, aspect_ratio: 1.5}\n", "m.yaml: job 1", "aspect_ratio", "not valid"),
    (J, jsonl({"prompt": "x", "image_size": "2k"}), "m.jsonl:1", "image_size", "'2K' (capital"),
    (J, jsonl({"prompt": "x", "image_size": 2048}), "m.jsonl:1", "image_size", "1K, 2K, 4K"),
    (J, jsonl({"prompt": "x", "model": " "}), "m.jsonl:1", "model", "non-empty string"),
    (J, jsonl({"prompt": "x", "model": None}), "m.jsonl:1", "model", "null"),
    (J, jsonl({"prompt": "x", "images": "a.png"}), "m.jsonl:1", "images", "must be a list"),
    (
        J,
        jsonl({"prompt": "x", "images": ["https://e.com/a.png"] * 15}),
        "m.jsonl:1",
        "images",
        "at most 14",
    ),
    (
        J,
        jsonl({"prompt": "x", "images": ["https://e.com/a.png", 3]}),
        "m.jsonl:1",
        "images[1]",
        "path or URL",
    ),
    (
        J,
        jsonl({"prompt": "x", "images": ["ftp://e.com/a.png"]}),
        "m.jsonl:1",
        "images[0]",
        "only http(s)",
    ),
    (
        J,
        jsonl({"prompt": "x", "images": ["https://e.com/a b.png"]}),
        "m.jsonl:1",
        "images[0]",
        "not a valid URL",
    ),
    (
        J,
        jsonl({"prompt": "x", "images": ["data:image/png;base64,@@@"]}),
        "m.jsonl:1",
        "images[0]",
        "not valid base64",
    ),
    (
        J,
        jsonl({"prompt": "x", "images": ["data:image/png;base64,aGVsbG8="]}),
        "m.jsonl:1",
        "images[0]",
        "not an image",
    ),
    (
        J,
        jsonl({"prompt": "x", "images": ["data:text/plain;base64,aGVsbG8="]}),
        "m.jsonl:1",
        "images[0]",
        "data:image/png;base64",
    ),
    (
        J,
        jsonl({"prompt": "x", "images": ["missing.png"]}),
        "m.jsonl:1",
        "images[0]",
        "file not found",
    ),
    (J, jsonl({"prompt": "x", "images": ["."]}), "m.jsonl:1", "images[0]", "not a regular file"),
    (
        J,
        jsonl({"prompt": "x", "images": ["~nosuchuser_imgbatch/a.png"]}),
        "m.jsonl:1",
        "images[0]",
        "",
    ),
    (J, jsonl({"prompt": "x", "images": ["a\u0000b.png"]}), "m.jsonl:1", "images[0]", ""),
    *[
        (
            J,
            jsonl({"prompt": "x", "params": {key: 1}}),
            "m.jsonl:1",
            f"params.{key}",
            "would overwrite",
        )
        for key in ("model", "messages", "stream", "image_config")
    ],
    (J, jsonl({"prompt": "x", "params": [1]}), "m.jsonl:1", "params", "mapping"),
    (J, '{"prompt": "x", "params": {"t": NaN}}\n', "m.jsonl:1", "params", "JSON values"),
    (Y, "- {prompt: x, params: {when: 2020-01-01}}\n", "m.yaml: job 1", "params", "JSON values"),
    (J, jsonl({"prompt": "x", "count": "3"}), "m.jsonl:1", "count", "whole number"),
    (J, jsonl({"prompt": "x", "count": True}), "m.jsonl:1", "count", "boolean"),
    (J, jsonl({"prompt": "x", "count": 0}), "m.jsonl:1", "count", "1 to 1000"),
    (J, jsonl({"prompt": "x", "count": 1001}), "m.jsonl:1", "count", "1 to 1000"),
    (J, jsonl({"prompt": "x", "count": 2.0}), "m.jsonl:1", "count", "whole number"),
    (J, jsonl({"prompt": "x", "vars": []}), "m.jsonl:1", "vars", "mapping"),
    (J, jsonl({"prompt": "{a}", "vars": {"a": []}}), "m.jsonl:1", "vars.a", "non-empty list"),
    (J, jsonl({"prompt": "{a}", "vars": {"a": "x"}}), "m.jsonl:1", "vars.a", "non-empty list"),
    (J, jsonl({"prompt": "{a}", "vars": {"a": [True]}}), "m.jsonl:1", "vars.a[0]", "quote yes"),
    (J, jsonl({"prompt": "{a}", "vars": {"a": [[1]]}}), "m.jsonl:1", "vars.a[0]", "text or"),
    (J, jsonl({"prompt": "{a}", "vars": {"a": ["x", "x"]}}), "m.jsonl:1", "vars.a[1]", "twice"),
    (
        J,
        jsonl({"prompt": "{a}", "vars": {"a": ["x"], "b": ["y"]}}),
        "m.jsonl:1",
        "vars.b",
        "never used",
    ),
    (
        J,
        jsonl({"prompt": "{a} {c}", "vars": {"a": ["x"]}}),
        "m.jsonl:1",
        "prompt",
        "{c} is not one of the vars",
    ),
    (J, jsonl({"prompt": "{a!r}", "vars": {"a": ["x"]}}), "m.jsonl:1", "prompt", "plain"),
    (J, jsonl({"prompt": "{a.b}", "vars": {"a": ["x"]}}), "m.jsonl:1", "prompt", "plain {a}"),
    (J, jsonl({"prompt": "{a", "vars": {"a": ["x"]}}), "m.jsonl:1", "prompt", "{{ and }}"),
    (J, jsonl({"prompt": "{9}", "vars": {"9": ["x"]}}), "m.jsonl:1", "vars.9", "var names"),
    (
        J,
        jsonl({"prompt": "x", "id": "a"}, {"prompt": "y", "id": "a"}),
        "m.jsonl:2",
        "id",
        "duplicate id 'a' (also at m.jsonl:1)",
    ),
    (
        J,
        jsonl({"prompt": "x", "id": "Cat"}, {"prompt": "y", "id": "cat"}),
        "m.jsonl:2",
        "id",
        "differs only in case",
    ),
    (
        J,
        jsonl({"prompt": "x", "id": "a-1"}, {"prompt": "y", "id": "a", "count": 2}),
        "m.jsonl:2",
        "id",
        "duplicate id 'a-1'",
    ),
    (
        Y,
        "- {prompt: x, id: a}\n- {prompt: y, id: a}\n",
        "m.yaml: job 2 (id 'a')",
        "id",
        "also at m.yaml: job 1 (id 'a')",
    ),
]


@pytest.mark.parametrize(("name", "content", "location", "field", "message"), INVALID)
def test_invalid(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    content: str | bytes,
    location: str,
    field: str | None,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative manifest path stays relative in messages
    write(tmp_path, name, content)
    found = problems_of(Path(name))
    assert_problem(found, location, field, message)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_manifest(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "m.yaml"
    if kind == "directory":
        path.mkdir()
    found = problems_of(path)
    assert_problem(found, str(path), None, "not found" if kind == "missing" else "directory")


def test_non_utf8_names_offset_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "m.jsonl", b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "\xff"}\n')
    (problem,) = problems_of(path)
    assert problem.location == f"{path}:2"
    assert "0xff at byte offset 31 (line 2, column 13)" in problem.message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.jsonl",
        jsonl(
            {"prompt": "x", "count": 0, "image_size": "8K"}, {"id": "a"}, {"prompt": "y", "foo": 1}
        ),
    )
    found = problems_of(path)
    assert [(p.location.rsplit(":", 1)[-1], p.field) for p in found] == [
        ("1", "count"),
        ("1", "image_size"),
        ("2", "prompt"),
        ("3", "foo"),
    ]


def test_problems_are_capped(tmp_path: Path) -> None:
    path = write(tmp_path, "m.jsonl", "nope\n" * 30)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, max_problems=10)
    assert len(caught.value.problems) == 10 and caught.value.more == 20
    assert "20 more" in str(caught.value)


# -- ids -----------------------------------------------------------------------


def test_derived_ids_are_stable_and_local(tmp_path: Path) -> None:
    jobs = [
        {"prompt": "A red fox in the snow, photographed at dawn with a long lens"},
        {"prompt": "An owl", "image_size": "2K"},
        {"prompt": "A cat"},
    ]
    path = write(tmp_path, "m.jsonl", jsonl(*jobs))
    first = [j.id for j in load_manifest(path).jobs]
    assert first == [j.id for j in load_manifest(path, default_model="other").jobs]
    assert first[0].rsplit("-", 1)[0] == "a-red-fox-in-the-snow-photographed-at"
    assert len(first[0].rsplit("-", 1)[1]) == 10
    jobs[1]["prompt"] = "An owl at night"
    write(tmp_path, "m.jsonl", jsonl(*jobs))
    second = [j.id for j in load_manifest(path).jobs]
    assert second[0] == first[0] and second[2] == first[2] and second[1] != first[1]
    assert second[1].startswith("an-owl-at-night-")


def test_derived_ids_follow_defaults_but_not_the_command_line(tmp_path: Path) -> None:
    plain = write(tmp_path, "a.yaml", "- prompt: a cat\n")
    with_default = write(tmp_path, "b.yaml", "defaults: {image_size: 2K}\njobs: [{prompt: a cat}]")
    ids = {load_manifest(p, default_model=m).jobs[0].id for p in (plain,) for m in ("x", "y")}
    assert len(ids) == 1
    assert load_manifest(with_default).jobs[0].id not in ids


def test_identical_content_gets_numbered(tmp_path: Path) -> None:
    path = write(tmp_path, "m.jsonl", jsonl(*[{"prompt": "Café au lait"}] * 3, {"prompt": "猫"}))
    ids = [j.id for j in load_manifest(path).jobs]
    assert ids[1] == ids[0] + "-2" and ids[2] == ids[0] + "-3"
    assert ids[0].startswith("cafe-au-lait-") and ids[3].startswith("job-")


def test_expansion_cross_product_count_and_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.yaml",
        """\
- id: p
  prompt: "{size} {animal} {{literal}}"
  vars: {size: [Big, 2], animal: [cat, dog, cat!]}
  count: 2
""",
    )
    jobs = load_manifest(path).jobs
    assert len(jobs) == 12 and [j.index for j in jobs] == list(range(12))
    assert [j.prompt for j in jobs[:4]] == ["Big cat {literal}"] * 2 + ["Big dog {literal}"] * 2
    assert jobs[11].prompt == "2 cat! {literal}"
    ids = [j.id for j in jobs]
    assert ids[2:4] == ["p-big-dog-1", "p-big-dog-2"] and ids[8:10] == ["p-2-dog-1", "p-2-dog-2"]
    # "cat" and "cat!" share the slug "cat", so both fall back to slug + hash of the values
    assert re.fullmatch(r"p-big-cat-[0-9a-f]{8}-1", ids[0]) and ids[1] == ids[0][:-1] + "2"
    assert re.fullmatch(r"p-big-cat-[0-9a-f]{8}-1", ids[4]) and ids[4] != ids[0]
    assert re.fullmatch(r"p-2-cat-[0-9a-f]{8}-2", ids[7])
    assert len(set(ids)) == 12


def test_expanded_ids_stay_within_128_chars(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.jsonl",
        jsonl(
            {"id": "b" * 128, "prompt": "{v}", "vars": {"v": ["x" * 100, "short"]}, "count": 1000}
        ),
    )
    jobs = load_manifest(path).jobs
    assert len(jobs) == 2000 and all(len(j.id) <= 128 for j in jobs)
    assert jobs[-1].id.endswith("-short-1000") and jobs[0].id.endswith("-1")
    assert len({j.id for j in jobs}) == 2000


def test_count_without_vars_and_no_suffix_for_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.jsonl",
        jsonl({"id": "a", "prompt": "x", "count": 3}, {"id": "b", "prompt": "{x}", "count": 1}),
    )
    jobs = load_manifest(path).jobs
    assert [j.id for j in jobs] == ["a-1", "a-2", "a-3", "b"]
    assert jobs[3].prompt == "{x}"  # without vars a prompt is not a template


# -- input images --------------------------------------------------------------


def test_input_images_of_every_kind(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    write(tmp_path / "img", "a.png", PNG)
    jpeg_declared_png = "data:image/jpeg;base64,\n" + base64.b64encode(PNG).decode()
    path = write(
        tmp_path,
        "m.yaml",
        yaml.safe_dump(
            [
                {
                    "prompt": "x",
                    "images": [
                        "img/a.png",
                        str(tmp_path / "img" / "a.png"),
                        "https://example.com/a.png",
                        PNG_DATA_URL,
                        jpeg_declared_png,
                    ],
                }
            ]
        ),
    )
    rel, absolute, url, data, relabelled = load_manifest(path).jobs[0].images
    assert rel.ref == absolute.ref == str((tmp_path / "img" / "a.png").resolve())
    assert rel.source == "img/a.png" and rel.digest == hashlib.sha256(PNG).hexdigest()
    assert (url.kind, url.mime, url.ref) == (InputKind.URL, None, "https://example.com/a.png")
    assert url.digest == hashlib.sha256(b"https://example.com/a.png").hexdigest()
    assert (data.kind, data.mime, data.ref, data.size_bytes) == (
        InputKind.DATA,
        "image/png",
        PNG_DATA_URL,
        len(PNG),
    )
    assert data.digest == rel.digest
    assert relabelled.mime == "image/png" and relabelled.ref == PNG_DATA_URL


def test_input_image_problems(tmp_path: Path) -> None:
    write(tmp_path, "text.png", b"not an image at all")
    big = tmp_path / "big.png"
    with big.open("wb") as handle:  # sparse: 8 MB on paper, nothing on disk
        handle.write(PNG[:16])
        handle.truncate(8 * 1024 * 1024)
    huge_data = "data:image/png;base64," + "A" * (10 * 1024 * 1024)
    path = write(
        tmp_path,
        "m.json",
        json.dumps(  # .json: the data URL is over JSONL's 1 MB
            [{"prompt": "x", "images": ["text.png", "big.png", "nope/a.png", huge_data]}]
        ),
    )
    found = problems_of(path)
    assert_problem(found, "m.json: job 1", "images[0]", "not an image")
    assert_problem(found, "m.json: job 1", "images[1]", "8388608 bytes")
    assert_problem(
        found, "m.json: job 1", "images[2]", f"looked for {tmp_path.resolve()}/nope/a.png"
    )
    assert_problem(found, "m.json: job 1", "images[3]", "over 7340032 bytes")


def test_a_shared_file_is_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "a.png", PNG)
    calls: list[str] = []
    real = manifest_module._probe_file

    def counting(resolved: str) -> Any:
        calls.append(resolved)
        return real(resolved)

    monkeypatch.setattr(manifest_module, "_probe_file", counting)
    path = write(
        tmp_path,
        "m.jsonl",
        jsonl(*[{"prompt": f"p{i}", "images": ["a.png", "./a.png"]} for i in range(1000)]),
    )
    assert len(load_manifest(path).jobs) == 1000 and len(calls) == 1


def test_images_in_defaults_apply_to_every_job(tmp_path: Path) -> None:
    write(tmp_path, "a.png", PNG)
    path = write(
        tmp_path,
        "m.yaml",
        "defaults: {images: [a.png]}\njobs:\n- {prompt: x}\n- {prompt: y, images: []}\n",
    )
    jobs = load_manifest(path).jobs
    assert len(jobs[0].images) == 1 and jobs[1].images == ()


# -- never any other exception ---------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Values near the edges of the rules, so generated jobs often get past the type checks.
EDGES = st.sampled_from(
    [
        "16:9",
        "1:1",
        "2K",
        "2k",
        "x",
        "{a}",
        "{a} {b}",
        "{{a}}",
        "{a",
        "CON",
        ".x",
        "a" * 130,
        0,
        1,
        2,
        1000,
        1001,
        -1,
        969,
        1.5,
        True,
        None,
        "",
        " ",
        "https://e.com/a.png",
        "data:image/png;base64,",
        PNG_DATA_URL,
        "~",
        "/",
        "..",
        "a\u0000b",
        "missing.png",
        {"a": ["x", 1, 1.5]},
        {"a": ["x"], "b": [2, 3]},
        {"a": []},
        {"temperature": 0.5},
        {"model": "m"},
        ["https://e.com/a.png", PNG_DATA_URL],
        [".", "/dev/null"],
        [1, 2],
    ]
)
FIELDS = [
    "id",
    "prompt",
    "aspect_ratio",
    "image_size",
    "model",
    "images",
    "params",
    "count",
    "vars",
    "defaults",
    "jobs",
]
JOB_OBJECTS = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=6), EDGES | JSON_VALUES, max_size=6
)
FAST = settings(
    max_examples=int(os.environ.get("MANIFEST_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def load_or_manifest_error(path: Path) -> None:
    try:
        load_manifest(path)
    except ManifestError as exc:
        assert exc.problems or exc.more
        str(exc)


@FAST
@given(text=st.text(max_size=300))
def test_any_text_as_yaml_or_jsonl(tmp_path: Path, text: str) -> None:
    for name in ("p.yaml", "p.jsonl", "p.json"):
        load_or_manifest_error(write(tmp_path, name, text.encode("utf-8", "surrogatepass")))


@FAST
@given(data=st.binary(max_size=200))
def test_any_bytes(tmp_path: Path, data: bytes) -> None:
    for name in ("b.yaml", "b.jsonl"):
        load_or_manifest_error(write(tmp_path, name, data))


@FAST
@given(jobs=st.lists(JOB_OBJECTS | JSON_VALUES, min_size=0, max_size=4), wrap=st.booleans())
def test_any_json_values_as_jobs(tmp_path: Path, jobs: list[Any], wrap: bool) -> None:
    lines = "".join(json.dumps(job) + "\n" for job in jobs)
    load_or_manifest_error(write(tmp_path, "v.jsonl", lines))
    document = {"defaults": jobs[0], "jobs": jobs[1:]} if wrap and jobs else jobs
    load_or_manifest_error(write(tmp_path, "v.json", json.dumps(document)))
    try:
        text = yaml.safe_dump(document, allow_unicode=True)
    except yaml.YAMLError:
        return
    load_or_manifest_error(write(tmp_path, "v.yaml", text.encode("utf-8", "surrogatepass")))
