"""Judges of a run's output that share no code with the run: Pillow, hashlib, json.

The journal is read the way an operator would read it (JSON lines, the last line for an
id wins, a torn last line is ignored), never through ``batch.checkpoint``, and images
are judged by decoding them with Pillow, never by ``batch.imageinfo``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

TAG = "imgbatch-request"  # the simulator's tEXt keyword: which request an image answers


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decode(path: Path) -> tuple[tuple[int, int], dict[str, str]]:
    """Size and text chunks of an image Pillow decodes completely; raises if it cannot."""
    with Image.open(path) as image:
        image.load()  # every pixel: a truncated or corrupt file raises here
        text = dict(getattr(image, "text", {}) or {})
        return image.size, text


def journal(out: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """(last state of each job, run records) from ``.imgbatch/journal.jsonl``, if it exists."""
    path = out / ".imgbatch" / "journal.jsonl"
    lines = path.read_bytes().split(b"\n") if path.exists() else []
    states: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            # A kill can tear the line being appended: only the last, unterminated one.
            assert number == len(lines), f"journal line {number} is not JSON"
            continue
        if "run" in record:
            runs.append(record)
        else:
            states[record["id"]] = record
    return states, runs


def job_of(name: str) -> str:
    """The job id a published image name belongs to (``<id>.<ext>`` or ``<id>~<n>.<ext>``)."""
    return name.rsplit(".", 1)[0].split("~", 1)[0]


Decoded = dict[str, tuple[tuple[int, int], dict[str, str]]]


def check_recorded_images(
    out: Path, prompts: Mapping[str, str] | None = None, decoded: Decoded | None = None
) -> int:
    """Every success in the journal has its image on disk, byte for byte; returns how many.

    The image is under its final name, or (a crash between the record and the rename)
    under the temporary name the record gives. Its sha256 is computed here, Pillow
    decodes it to the recorded size, and with ``prompts`` the simulator's tag in it
    names the job's own prompt. Every file under a final name must be one of these.
    ``decoded`` (by sha256) carries Pillow's verdicts over from earlier checks of the
    same folder: bytes with a sha256 already decoded need not be decoded again.
    """
    decoded = {} if decoded is None else decoded
    states, _ = journal(out)
    recorded: dict[str, set[str]] = {}
    count = 0
    for job_id, state in states.items():
        if state["status"] != "succeeded":
            continue
        for image in state["images"]:
            candidates = [out / image["path"]]
            if image.get("tmp"):
                candidates.append(out / image["tmp"])
            found = [p for p in candidates if p.exists() and sha256_file(p) == image["sha256"]]
            assert found, f"{job_id}: recorded image {image['path']} is lost"
            if image["sha256"] not in decoded:
                decoded[image["sha256"]] = decode(found[0])
            size, text = decoded[image["sha256"]]
            assert size == (image["width"], image["height"]), job_id
            if prompts is not None:
                made_for = json.loads(text[TAG])["prompt_sha256"]
                assert made_for == hashlib.sha256(prompts[job_id].encode()).hexdigest(), job_id
            recorded.setdefault(job_id, set()).add(image["sha256"])
            count += 1
    folder = out / "images"
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name.startswith("."):
            continue  # a temporary name: never what a user opens
        # Recorded hashes were all decoded above: a file with one of them has those bytes.
        assert sha256_file(path) in recorded.get(job_of(path.name), set()), path.name
    return count
