"""Provenance streamed into images: PNG iTXt, JPEG APP1 XMP, WebP XMP (simple files made extended).

Each image is stamped in chunks of every size, decoded fully by Pillow (pixels
unchanged), checked by imgbatch's own verifier, and read back by Pillow, by
imgbatch inspect and, where installed, by exiftool.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batch.errors import MalformedResponse
from batch.imageinfo import ImageVerifier
from batch.images import ImageWriter
from batch.jobs import Job
from batch.provenance import FIELD_CHARS, ImageStamp, Provenance, Stamper
from batch.xmpread import describe, parse_packet
from tests.conftest import read_results, run_args, run_cli, simulator

FACTS = Provenance(
    job_id="fox-7",
    prompt='A red fox <in> "snow" & ice',
    model="gemini-3.0-pro-image-preview",
    provider="chat",
    endpoint="https://api.qnaigc.com/v1",
    settings={"aspect_ratio": "3:2", "image_size": "2K", "params": {}, "input_images": []},
    created="2026-12-01T01:15:00Z",
)


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "a description"  # ImageDescription
    return exif.tobytes()


def _encode(fmt: str, mode: str = "RGB", **options: object) -> bytes:
    image = Image.new(mode, (48, 32), (200, 40, 10) if mode == "RGB" else (200, 40, 10, 128))
    for x in range(0, 48, 6):
        image.putpixel((x, x % 32), (0, 90, 255) if mode == "RGB" else (0, 90, 255, 255))
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


SAMPLES = {
    "png": _encode("PNG"),
    "jpeg": _encode("JPEG", quality=90),
    "jpeg-progressive-exif": _encode("JPEG", progressive=True, exif=_exif()),
    "webp-lossy-vp8": _encode("WEBP", quality=80),
    "webp-lossless-vp8l": _encode("WEBP", lossless=True),
    "webp-alpha-vp8x": _encode("WEBP", mode="RGBA", quality=80),
    "webp-lossless-alpha-vp8l": _encode("WEBP", mode="RGBA", lossless=True),
}


def stamp(data: bytes, cuts: list[int] | None = None, xmp: bytes | None = None) -> bytes:
    stamper = ImageStamp(FACTS.xmp() if xmp is None else xmp)
    pieces, start = [], 0
    for cut in sorted(set(cuts or [])):
        pieces.append(stamper.feed(data[start:cut]))
        start = cut
    pieces.append(stamper.feed(data[start:]))
    pieces.append(stamper.finish())
    return b"".join(pieces)


def pillow_xmp(data: bytes) -> dict[str, str]:
    image = Image.open(io.BytesIO(data))
    image.load()  # a PNG's trailing chunks are read with the pixels
    packet = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    assert packet, f"Pillow found no XMP in {image.format}: {sorted(image.info)}"
    return parse_packet(packet if isinstance(packet, bytes) else packet.encode())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_format_reads_back_with_pillow_and_keeps_its_pixels(name: str) -> None:
    original = SAMPLES[name]
    stamped = stamp(original)
    assert len(stamped) > len(original) + 500
    before, after = Image.open(io.BytesIO(original)), Image.open(io.BytesIO(stamped))
    assert after.format == before.format and after.size == before.size
    assert after.mode == before.mode
    assert after.tobytes() == before.tobytes()  # a full decode, and the pixels are the same
    facts = pillow_xmp(stamped)
    assert facts["job_id"] == "fox-7"
    assert facts["prompt"] == FACTS.prompt
    assert json.loads(facts["settings"])["image_size"] == "2K"
    verifier = ImageVerifier(max_pixels=1 << 30)
    verifier.feed(stamped)
    info = verifier.finish()  # imgbatch's own structure check accepts what it stores
    assert (info.width, info.height) == before.size


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(SAMPLES)), data=st.data())
def test_the_output_does_not_depend_on_how_the_stream_is_cut(
    name: str, data: st.DataObject
) -> None:
    original = SAMPLES[name]
    cuts = data.draw(st.lists(st.integers(0, len(original)), max_size=40))
    assert stamp(original, cuts) == stamp(original)


def test_byte_at_a_time_equals_one_piece() -> None:
    for original in SAMPLES.values():
        assert stamp(original, list(range(len(original)))) == stamp(original)


def _png_with(kind: bytes, payload: bytes) -> bytes:
    png = SAMPLES["png"]
    chunk = struct.pack(">I", len(payload)) + kind + payload
    chunk += struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))
    return png[:33] + chunk + png[33:]  # after IHDR


@pytest.mark.parametrize(
    "original",
    [
        _png_with(b"caBX", b"jumb c2pa manifest"),  # a C2PA manifest: its hash would break
        _png_with(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x/>"),
        SAMPLES["jpeg"][:2] + b"\xff\xeb\x00\x0aJP\x00\x01c2pa" + SAMPLES["jpeg"][2:],
        SAMPLES["jpeg"][:2] + b"\xff\xe1\x00\x25http://ns.adobe.com/xap/1.0/\0<x/>"
        + SAMPLES["jpeg"][2:],
        b"GIF89a" + bytes(40),
        b"not an image at all",
    ],
    ids=["png-c2pa", "png-xmp", "jpeg-c2pa", "jpeg-xmp", "gif", "text"],
)
def test_files_with_their_own_xmp_or_c2pa_and_other_types_pass_unchanged(original: bytes) -> None:
    assert stamp(original) == original
    stamper = ImageStamp(FACTS.xmp())
    stamper.feed(original)
    stamper.finish()
    assert not stamper.embedded and stamper.skipped


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_cut_short_image_is_stored_as_far_as_it_came_and_still_refused(name: str) -> None:
    original = SAMPLES[name]
    whole = stamp(original)
    for end in (1, 5, 20, 40, len(original) // 2, len(original) - 3):
        cut = stamp(original[:end])
        # Before the packet's place: the server's bytes as they came; after: the stamped
        # stream as far as it went. Nothing held back, nothing invented.
        assert cut == original[:end] or whole.startswith(cut)
        verifier = ImageVerifier(max_pixels=1 << 30)
        with pytest.raises(MalformedResponse):
            verifier.feed(cut)
            verifier.finish()


def test_hostile_and_huge_prompts_stay_valid_xml_within_a_jpeg_segment() -> None:
    prompt = "\x00\x1b]]><!-- &amp; \ud800 " + "漢" * 40_000
    facts = Provenance("x", prompt, "m", "chat", "e", {"params": {"k": "<>" * 9000}}, "t")
    stamped = stamp(SAMPLES["jpeg"], xmp=facts.xmp())
    read = pillow_xmp(stamped)
    assert read["prompt"].startswith("\ufffd\ufffd]]><!-- &amp; \ufffd")
    assert len(read["prompt"]) == FIELD_CHARS and read["prompt"].endswith("…")
    Image.open(io.BytesIO(stamped)).load()


def test_the_writer_hashes_verifies_and_stores_the_stamped_bytes(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    job = Job("fox-7", "A red fox", "gemini-3.0-pro-image-preview", "1:1", "1K")
    writer = ImageWriter(tmp_path, job.id, 0, max_pixels=1 << 30,
                         transform=Stamper("chat", "https://user:pw@gw.example/v1?k=1")(job))
    original = SAMPLES["webp-lossy-vp8"]
    for start in range(0, len(original), 7):
        writer.write(original[start:start + 7])
    staged = writer.finish()
    staged.file.close()
    stored = (tmp_path / staged.tmp_rel).read_bytes()
    assert staged.sha256 == hashlib.sha256(stored).hexdigest() and staged.bytes == len(stored)
    kind, facts = describe(tmp_path / staged.tmp_rel)
    assert kind == "webp" and facts["job_id"] == "fox-7"
    assert facts["endpoint"] == "https://gw.example/v1"  # no credentials, no query


def test_inspect_prints_what_an_image_says_about_itself(tmp_path: Path) -> None:
    image = tmp_path / "fox.png"
    image.write_bytes(stamp(SAMPLES["png"]))
    done = run_cli("inspect", str(image))
    assert done.returncode == 0, done.stderr
    assert "job id: fox-7" in done.stdout and FACTS.prompt in done.stdout
    as_json = json.loads(run_cli("inspect", str(image), "--json").stdout)
    assert as_json["provenance"]["model"] == "gemini-3.0-pro-image-preview"
    bare = tmp_path / "bare.jpg"
    bare.write_bytes(SAMPLES["jpeg"])
    done = run_cli("inspect", str(bare))
    assert done.returncode == 1 and "no imgbatch provenance" in done.stdout
    assert run_cli("inspect", str(tmp_path / "missing.png")).returncode == 2


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed "
                    "(Debian: libimage-exiftool-perl)")
@pytest.mark.parametrize("name", ["png", "jpeg", "webp-lossless-vp8l", "webp-alpha-vp8x"])
def test_exiftool_reads_the_provenance(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"image.{name.split('-')[0]}"
    path.write_bytes(stamp(SAMPLES[name]))
    done = subprocess.run(["exiftool", "-j", "-XMP:all", "-warning", str(path)],
                          capture_output=True, text=True, timeout=60, check=True)
    tags = json.loads(done.stdout)[0]
    assert tags["JobId"] == "fox-7" and tags["Prompt"] == FACTS.prompt, tags
    assert tags["CreatorTool"].startswith("imgbatch")
    assert "Warning" not in tags, tags["Warning"]


def test_a_run_stamps_every_image_and_records_the_stored_hash(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("jobs:\n  - {id: fox, prompt: A red fox in the snow}\n"
                        "  - {id: owl, prompt: An owl at dusk, aspect_ratio: '3:2'}\n")
    with simulator("--scale", "0.3", "--jpeg-lie", "0.5", "--seed", "4") as sim:
        stamped = run_cli(*run_args(manifest, tmp_path / "a", sim, "--no-gallery"))
        verbatim = run_cli(*run_args(manifest, tmp_path / "b", sim, "--no-gallery",
                                     "--no-embed-metadata"))
    assert stamped.returncode == 0 and verbatim.returncode == 0, stamped.stderr + verbatim.stderr
    for row in read_results(tmp_path / "a"):
        image = row["images"][0]
        path = tmp_path / "a" / image["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == image["sha256"]
        _, facts = describe(path)
        assert facts["job_id"] == row["id"] and facts["prompt"] == row["prompt"]
        assert facts["provider"] == "chat" and facts["endpoint"] == sim.url
        Image.open(path).load()
    for row in read_results(tmp_path / "b"):
        path = tmp_path / "b" / row["images"][0]["path"]
        assert describe(path)[1] == {}
        assert b"imgbatch:JobId" not in path.read_bytes()


@pytest.mark.parametrize("packet", [
    b"<!DOCTYPE x [<!ENTITY a 'aaaa'>]><x>&a;</x>",  # entities are refused, not expanded
    b"<x><unclosed></x>",
])
def test_inspect_refuses_a_hostile_packet_without_a_traceback(
    tmp_path: Path, packet: bytes
) -> None:
    image = tmp_path / "bad.png"
    image.write_bytes(stamp(SAMPLES["png"], xmp=packet))
    done = run_cli("inspect", str(image))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "XMP packet" in done.stderr
