"""The capability table: what each model accepts, checked before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batch.capabilities import check, load_table, parse_table
from batch.jobs import InputImage, InputKind, Job
from tests.conftest import run_args, run_cli, simulator

TABLE = load_table()  # the file shipped in the package
PRO, FLASH = "gemini-3.0-pro-image-preview", "gemini-2.5-flash-image"


def job(model: str, size: str = "1K", ratio: str = "1:1", inputs: int = 0) -> Job:
    images = tuple(InputImage(InputKind.URL, f"https://x/{i}.png", f"https://x/{i}.png", None,
                              str(i)) for i in range(inputs))
    return Job("j1", "p", model, ratio, size, images, location="m.yaml: job 1 (id 'j1')")


@pytest.mark.parametrize(("model", "size", "inputs", "fields"), [
    (PRO, "4K", 14, []),
    (PRO, "4K", 15, ["images"]),
    (FLASH, "1K", 3, []),
    (FLASH, "2K", 0, ["image_size"]),
    (FLASH, "4K", 4, ["image_size", "images"]),
    ("google/gemini-3-pro-image-preview", "4K", 0, []),
    ("some-new-model", "4K", 99, []),  # unknown: passes (the CLI warns)
])
def test_check_names_each_field_a_model_does_not_accept(
    model: str, size: str, inputs: int, fields: list[str]
) -> None:
    problems = check(job(model, size, inputs=inputs), "chat", TABLE)
    assert [p.field for p in problems] == fields
    for problem in problems:
        assert problem.location == "m.yaml: job 1 (id 'j1')" and "job 'j1'" in problem.message


def test_the_message_says_what_the_model_accepts() -> None:
    (problem,) = check(job(FLASH, "4K"), "chat", TABLE)
    assert str(problem) == ("m.yaml: job 1 (id 'j1'): image_size: job 'j1': "
                            "gemini-2.5-flash-image does not make 4K images; it accepts 1K")


def test_a_provider_has_its_own_model_names() -> None:
    assert TABLE.lookup("chat", "google/gemini-2.5-flash-image") is not None
    assert TABLE.lookup("gemini", "google/gemini-2.5-flash-image") is None
    assert check(job(FLASH, "4K"), "no-such-provider", TABLE) == []


@pytest.mark.parametrize(("raw", "message"), [
    ({"models": {"m": {"image_sizes": ["1K"]}}}, "model 'm'"),
    ({"chat": {"x": "nowhere"}, "models": {}}, "chat/x points at unknown 'nowhere'"),
])
def test_a_broken_table_names_the_bad_entry(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_table(raw)


def test_validate_rejects_a_4k_job_on_a_1k_model_with_exit_2(tmp_path: Path) -> None:
    manifest = tmp_path / "plan.yaml"
    manifest.write_text("jobs:\n  - {id: fine, prompt: a boat}\n"
                        f"  - {{id: boat-4k, prompt: a boat, model: {FLASH}, image_size: 4K}}\n")
    done = run_cli("validate", str(manifest))
    assert done.returncode == 2, done.stdout
    assert "job 2 (id 'boat-4k'): image_size: job 'boat-4k': gemini-2.5-flash-image does " \
           "not make 4K images; it accepts 1K" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_rejects_it_before_sending_anything(tmp_path: Path) -> None:
    manifest = tmp_path / "plan.jsonl"
    manifest.write_text(json.dumps({"id": "ok", "prompt": "x"}) + "\n"
                        + json.dumps({"id": "big", "prompt": "y", "model": FLASH,
                                      "image_size": "4K"}) + "\n")
    with simulator("--scale", "0.05") as sim:
        done = run_cli(*run_args(manifest, tmp_path / "out", sim))
        assert sim.stats()["requests"] == 0
    assert done.returncode == 2 and "plan.jsonl:2" in done.stderr and "image_size" in done.stderr


def test_an_unknown_model_passes_with_a_warning(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("- {prompt: x, model: brand-new-image-model, image_size: 4K}\n")
    done = run_cli("validate", str(manifest))
    assert done.returncode == 0, done.stderr
    assert "brand-new-image-model is not in the capability table" in done.stderr


def test_the_example_catalog_holds_no_job_its_model_cannot_do() -> None:
    done = run_cli("validate", "jobs/example.yaml")
    assert done.returncode == 0, done.stderr
    assert "capability table" not in done.stderr


def test_the_table_ships_as_package_data() -> None:
    import tomllib

    config = tomllib.loads(Path("pyproject.toml").read_text())
    assert "capabilities.json" in config["tool"]["setuptools"]["package-data"]["batch"]
