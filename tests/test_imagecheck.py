"""Full verification: images whose structure is sound but whose data is not are refused.

Every corrupt case is first shown to pass the streaming structural check (``probe``),
so each test proves what the decode adds, not what the structure walk already caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batch import imagecheck
from batch.imagecheck import (
    INLINE_PNG_PIXELS,
    DecodeChecked,
    _png,
    _png_rows,
    decode_check,
    decode_problem,
)
from batch.imageinfo import ImageFormatError, probe
from batch.images import LocalImages, StagedImage, discard
from batch.jobs import DEFAULT_MODEL, Job
from batch.storage.base import ImageSink
from tests.test_crash import all_gone, wait_for

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def noise(fmt: str, size: tuple[int, int] = (96, 64), **options: object) -> bytes:
    """An image of noise (so its compressed data is long) saved by Pillow."""
    image = Image.effect_noise(size, 60).convert("RGB" if fmt != "GIF" else "L")
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def check(tmp_path: Path, data: bytes, mime: str) -> None:
    path = tmp_path / "image"
    path.write_bytes(data)
    decode_check(path, mime)


def jpeg_scan(data: bytes) -> tuple[int, int]:
    """Start and end (before EOI) of a baseline JPEG's entropy-coded data."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    return start, data.rindex(b"\xff\xd9")


def png_with_idat(data: bytes, idat: bytes) -> bytes:
    """``data`` with its image data replaced by ``idat`` in one chunk with a correct CRC."""
    start = data.index(b"IDAT") - 4
    end = data.index(b"IEND") - 4
    chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat
    return data[:start] + chunk + struct.pack(">I", zlib.crc32(chunk[4:])) + data[end:]


def png_raw(data: bytes) -> bytes:
    """The inflated image data of a PNG (its IDAT chunks joined)."""
    idat, at = b"", 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        if kind == b"IDAT":
            idat += data[at + 8 : at + 8 + length]
        at += 12 + length
    return zlib.decompress(idat)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_sound_images_pass(tmp_path: Path, fmt: str) -> None:
    check(tmp_path, noise(fmt), MIME[fmt])


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1", "I;16"])
def test_png_of_every_pixel_layout_passes(tmp_path: Path, mode: str) -> None:
    out = io.BytesIO()
    Image.new(mode, (37, 23)).save(out, "PNG")
    check(tmp_path, out.getvalue(), "image/png")


@pytest.mark.parametrize(("width", "height", "bits"), [(1, 1, 8), (7, 5, 24), (37, 23, 1),
                                                       (8, 8, 48), (3, 9, 4), (2, 1, 16)])
def test_png_row_layout_plain_and_adam7(width: int, height: int, bits: int) -> None:
    # Brute force from the Adam7 pattern: the pass of pixel (x, y) is looked up in the 8x8 grid.
    grid = ["16462646", "77777777", "56565656", "77777777",
            "36463646", "77777777", "56565656", "77777777"]
    expected = []
    for number in "1234567":
        for y in range(height):
            xs = [x for x in range(width) if grid[y % 8][x % 8] == number]
            if xs:
                expected.append(-(-len(xs) * bits // 8))
    assert list(_png_rows(width, height, bits, interlaced=True)) == expected
    plain = list(_png_rows(width, height, bits, interlaced=False))
    assert plain == [-(-width * bits // 8)] * height


@pytest.mark.parametrize("where", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("how", ["zeroed", "cut"])
def test_jpeg_with_corrupt_scan_data_is_refused(tmp_path: Path, where: float, how: str) -> None:
    data = noise("JPEG", (256, 192), quality=90)
    start, end = jpeg_scan(data)
    at = start + int((end - start) * where)
    # A run of zeros inside the entropy-coded data, or the scan cut short before its EOI.
    bad = data[:at] + bytes(64) + data[at + 64 :] if how == "zeroed" else data[:at] + data[end:]
    assert probe(bad).width == 256  # the structure walk cannot see it
    with pytest.raises(ImageFormatError, match="does not decode"):
        check(tmp_path, bad, "image/jpeg")


def test_webp_cut_short_with_consistent_sizes_is_refused(tmp_path: Path) -> None:
    data = noise("WEBP", (256, 192), quality=80)
    assert data[12:16] == b"VP8 "
    keep = 20 + (len(data) - 20) // 2
    keep += keep & 1
    bad = bytearray(data[:keep])
    bad[4:8] = struct.pack("<I", keep - 8)  # RIFF size
    bad[16:20] = struct.pack("<I", keep - 20)  # VP8 chunk size
    assert probe(bytes(bad)).width == 256
    with pytest.raises(ImageFormatError):
        check(tmp_path, bytes(bad), "image/webp")


def png_cases() -> dict[str, bytes]:
    good = noise("PNG", (40, 30))
    raw = png_raw(good)
    row = 1 + 40 * 3
    garbled = bytearray(zlib.compress(raw))
    garbled[len(garbled) // 2] ^= 0x55
    bad_filter = bytearray(raw)
    bad_filter[5 * row] = 7
    return {
        "garbled deflate data": png_with_idat(good, bytes(garbled)),
        "one scanline short": png_with_idat(good, zlib.compress(raw[:-row])),
        "one scanline too many": png_with_idat(good, zlib.compress(raw + raw[:row])),
        "bad filter type": png_with_idat(good, zlib.compress(bytes(bad_filter))),
        "deflate stream not ended": png_with_idat(good, zlib.compressobj().compress(raw)),
    }


def _verdict(data: bytes, strided: bool) -> str:
    try:
        _png(io.BytesIO(data), strided=strided)
    except ImageFormatError:
        return "refused"
    return "passed"


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 40), height=st.integers(1, 12),
       layout=st.sampled_from([(8, 2), (8, 6), (1, 0), (16, 2), (4, 3), (8, 4)]),
       piece=st.integers(1, 64), seed=st.integers(0, 2**32 - 1),
       damage=st.sampled_from(["none", "byte", "cut", "extend", "filter", "trailing",
                               "second stream"]))
def test_the_plain_png_check_by_slices_says_what_the_row_walk_says(
    width: int, height: int, layout: tuple[int, int], piece: int, seed: int, damage: str,
) -> None:
    """A plain (not interlaced) PNG's rows are checked by slicing each inflated piece at the
    row stride: for any damage, at any piece size, its verdict is the row walk's."""
    depth, color = layout
    rng = random.Random(seed)
    stride = 1 + (width * depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color] + 7) // 8
    raw = bytearray()
    for _ in range(height):
        raw += bytes([rng.randrange(5)]) + rng.randbytes(stride - 1)
    if damage == "byte":
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif damage == "cut":
        del raw[rng.randrange(len(raw)):]
    elif damage == "extend":
        raw += rng.randbytes(rng.randrange(1, 2 * stride))
    elif damage == "filter":
        raw[rng.randrange(height) * stride] = rng.randrange(5, 256)
    idat = zlib.compress(bytes(raw))
    if damage == "trailing":  # bytes after the end of the stream: let be, never looped on
        idat += rng.randbytes(rng.randrange(1, 300))
    elif damage == "second stream":
        idat += zlib.compress(rng.randbytes(rng.randrange(1, 300)))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(
        b"IDAT", idat) + png_chunk(b"IEND", b"")
    saved = imagecheck._INFLATE_PIECE
    imagecheck._INFLATE_PIECE = piece  # pieces that cut rows anywhere
    previous = signal.signal(signal.SIGALRM, _too_long)
    signal.setitimer(signal.ITIMER_REAL, 2.0)  # a check that loops fails, not hangs
    try:
        assert _verdict(data, True) == _verdict(data, False)
        if damage in ("none", "trailing", "second stream"):
            assert _verdict(data, True) == "passed"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        imagecheck._INFLATE_PIECE = saved


def _too_long(signum: int, frame: object) -> None:
    raise TimeoutError("the PNG check did not end")


def test_a_big_png_with_bytes_after_its_stream_is_checked_off_the_loop_and_ends(
    tmp_path: Path,
) -> None:
    """Over 1 MiB of rows and 4 bytes after the deflate stream: the check used to feed zlib
    those bytes forever (found in review); it passes, in the run's PNG thread."""
    raw = b"".join(b"\x00" + bytes(3 * 1024) for _ in range(1024))
    ihdr = struct.pack(">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(raw) + b"JUNK") + png_chunk(b"IEND", b""))
    path = tmp_path / "junk.png"
    path.write_bytes(data)
    threads: list[str] = []
    real = imagecheck.decode_problem

    def seen(where: Path, mime: str) -> str | None:
        threads.append(threading.current_thread().name)
        return real(where, mime)

    async def once() -> str | None:
        children = imagecheck.DecodeChildren()
        try:
            return await asyncio.wait_for(children.check(path, probe(data), len(data)), 30)
        finally:
            children.close()

    imagecheck.decode_problem = seen  # type: ignore[assignment]
    try:
        assert asyncio.run(once()) is None
    finally:
        imagecheck.decode_problem = real  # type: ignore[assignment]
    assert threads and threads[0].startswith("imgbatch-png")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.mark.parametrize("case", list(png_cases()))
def test_png_with_bad_image_data_but_good_crcs_is_refused(tmp_path: Path, case: str) -> None:
    bad = png_cases()[case]
    assert probe(bad).width == 40  # chunk CRCs are all correct
    with pytest.raises(ImageFormatError):
        check(tmp_path, bad, "image/png")


# -- the provider wrapper ---------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    images: tuple[StagedImage, ...]


class Staging:
    """A provider that stages fixed bytes as its answer's images, as the real client does."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.closed = False

    async def generate(self, job: Job, sink: ImageSink) -> Answer:
        staged = []
        for index, body in enumerate(self.bodies):
            writer = sink.open(job.id, index, max_pixels=1 << 30)
            writer.write(body)
            staged.append(writer.finish())
        return Answer(tuple(staged))

    async def close(self) -> None:
        self.closed = True


def run_wrapped(tmp_path: Path, bodies: list[bytes]) -> tuple[Answer | ImageFormatError, Staging]:
    (tmp_path / "images").mkdir(exist_ok=True)
    inner = Staging(bodies)

    async def once() -> Answer | ImageFormatError:
        provider = DecodeChecked(inner)
        try:
            job = Job("j1", "p", DEFAULT_MODEL, "1:1", "1K")
            return await provider.generate(job, LocalImages(tmp_path))
        except ImageFormatError as exc:
            return exc
        finally:
            await provider.close()

    return asyncio.run(once()), inner


def test_wrapper_refuses_an_answer_with_one_corrupt_image_and_drops_all_of_it(
    tmp_path: Path,
) -> None:
    good = noise("JPEG", (256, 192))
    start, end = jpeg_scan(good)
    bad = good[: (start + end) // 2] + good[end:]
    result, inner = run_wrapped(tmp_path, [good, bad])
    assert isinstance(result, ImageFormatError) and result.job_id == "j1"
    assert list((tmp_path / "images").iterdir()) == []  # both temporaries discarded
    assert inner.closed


def test_wrapper_passes_sound_answers_through(tmp_path: Path) -> None:
    bodies = [noise("PNG"), noise("JPEG")]
    result, _ = run_wrapped(tmp_path, bodies)
    assert isinstance(result, Answer)
    for staged, body in zip(result.images, bodies, strict=True):
        staged.file.close()
        assert (tmp_path / staged.tmp_rel).read_bytes() == body


def test_a_decode_child_that_dies_is_replaced_and_the_image_checked_again(
    tmp_path: Path,
) -> None:
    # A child killed mid-check (as a decoder crash or the OOM killer would) fails every
    # image it held; a sound one must then pass in a fresh child, not be paid for again.
    (tmp_path / "images").mkdir()
    body = noise("JPEG")  # PNG is checked in the run's own process

    async def once() -> tuple[Answer, bool]:
        provider = DecodeChecked(Staging([body]))
        task = asyncio.create_task(
            provider.generate(Job("j1", "p", DEFAULT_MODEL, "1:1", "1K"), LocalImages(tmp_path))
        )
        while provider.children.pool is None or not provider.children.pool._processes:
            await asyncio.sleep(0)  # the child is spawned when the check is submitted
        first = provider.children.pool
        for process in list(first._processes.values()):
            process.kill()
        answer = await task
        replaced = provider.children.pool is not first
        await provider.close()
        return answer, replaced

    answer, replaced = asyncio.run(once())
    assert replaced
    (staged,) = answer.images
    staged.file.close()
    assert (tmp_path / staged.tmp_rel).read_bytes() == body


def test_a_decoder_bug_refuses_the_image_instead_of_ending_the_run(tmp_path: Path) -> None:
    good = noise("PNG", (8, 8))
    at = good.index(b"IHDR") + 4 + 9  # the colour type byte
    ihdr = bytearray(good[at - 13 : at + 4])
    ihdr[13] = 5  # no such colour type: the PNG check's own table has no entry
    bad = good[: at - 13] + bytes(ihdr) + struct.pack(">I", zlib.crc32(ihdr)) + good[at + 8 :]
    (tmp_path / "bad.png").write_bytes(bad)
    (tmp_path / "good.png").write_bytes(good)
    assert decode_problem(tmp_path / "good.png", "image/png") is None
    problem = decode_problem(tmp_path / "bad.png", "image/png")
    assert problem is not None and "KeyError" in problem


def test_ctrl_c_reaching_the_decode_child_leaves_it_to_the_run(tmp_path: Path) -> None:
    # The terminal sends SIGINT to the whole process group; the run handles it (grace,
    # then cancel), and the child must not die and fail the image it is checking.
    (tmp_path / "images").mkdir()
    job = Job("j1", "p", DEFAULT_MODEL, "1:1", "1K")

    async def once() -> bool:
        provider = DecodeChecked(Staging([noise("JPEG")]))
        (staged,) = (await provider.generate(job, LocalImages(tmp_path))).images
        discard(tmp_path, staged)  # its temporary name may be reused below
        first = provider.children.pool
        assert first is not None
        children = list(first._processes.values())
        for process in children:
            status = Path(f"/proc/{process.pid}/status").read_text()
            ignored = int(status.split("SigIgn:")[1].split()[0], 16)
            assert ignored >> (signal.SIGINT - 1) & 1, "the decode child takes SIGINT"
            os.kill(process.pid, signal.SIGINT)
        for process in children:  # a child that took the SIGINT dies within this
            process.join(timeout=0.5)
            assert process.is_alive()
        (staged,) = (await provider.generate(job, LocalImages(tmp_path))).images
        staged.file.close()
        kept = provider.children.pool is first
        await provider.close()
        return kept

    # Started in the background by a shell, this process may ignore SIGINT, and a child
    # would inherit that: make the child start from Python's usual KeyboardInterrupt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert asyncio.run(once())
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_abort_during_the_decode_keeps_the_paid_answer(tmp_path: Path) -> None:
    """A second signal while a received answer waits for its decode must not delete it:
    the caller gets the answer (to commit it) and the cancellation at its next await."""
    (tmp_path / "images").mkdir()
    inner = Staging([noise("JPEG")])
    received: list[Answer] = []

    async def once() -> None:
        provider = DecodeChecked(inner)
        entered = asyncio.Event()

        async def stuck(path: Path, mime: str) -> str | None:
            entered.set()
            await asyncio.Future()  # a decode that never ends
            return None

        provider.children.problem = stuck  # type: ignore[method-assign]

        async def caller() -> None:
            received.append(await provider.generate(
                Job("j1", "p", DEFAULT_MODEL, "1:1", "1K"), LocalImages(tmp_path)))
            await asyncio.Future()  # the caller's next await sees the cancellation

        task = asyncio.create_task(caller())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await provider.close()

    asyncio.run(once())
    (answer,) = received
    (staged,) = answer.images
    staged.file.close()
    assert (tmp_path / staged.tmp_rel).read_bytes() == inner.bodies[0]


@pytest.mark.parametrize("size", [(40, 30), (600, 400)])  # inline, and in a thread
def test_png_is_checked_in_the_run_without_a_child(tmp_path: Path, size: tuple[int, int]) -> None:
    """A run of PNG answers starts no decode child (a second of CPU it would not use); a PNG
    whose data does not decode is still refused, checked on the loop or in a thread."""
    assert (size[0] * size[1] <= INLINE_PNG_PIXELS) == (size == (40, 30))
    good = noise("PNG", size)
    raw = png_raw(good)
    bad = png_with_idat(good, zlib.compress(raw[: -(1 + 3 * size[0])]))  # a scanline short
    assert probe(bad).width == size[0]  # its structure is sound
    (tmp_path / "images").mkdir()

    async def once() -> tuple[object, object, bool]:
        provider = DecodeChecked(Staging([good]))
        refusing = DecodeChecked(Staging([bad]))
        try:
            passed = await provider.generate(Job("j1", "p", DEFAULT_MODEL, "1:1", "1K"),
                                             LocalImages(tmp_path))
            try:
                refused: object = await refusing.generate(
                    Job("j2", "p", DEFAULT_MODEL, "1:1", "1K"), LocalImages(tmp_path))
            except ImageFormatError as exc:
                refused = exc
            return passed, refused, provider.children.pool is None is refusing.children.pool
        finally:
            await provider.close()
            await refusing.close()

    passed, refused, no_child = asyncio.run(once())
    assert isinstance(passed, Answer)
    for staged in passed.images:
        staged.file.close()
    assert isinstance(refused, ImageFormatError) and "PNG" in refused.message
    assert no_child


KILLED_WITH_ITS_CHILDREN = """
import asyncio, os, signal, sys
from pathlib import Path
from batch.imagecheck import DecodeChildren

async def main() -> None:
    image = Path(sys.argv[1])
    check = DecodeChildren(int(sys.argv[2])).problem
    # Killed with images still queued for the child, as a run is mid-collection.
    queued = [asyncio.ensure_future(check(image, "image/png")) for _ in range(20)]
    done, _ = await asyncio.wait(queued, return_when=asyncio.FIRST_COMPLETED)
    print(next(iter(done)).result(), flush=True)
    kids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            kids += (task / "children").read_text().split()
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    print(" ".join(kids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_decode_children_end_with_a_run_killed_with_sigkill(tmp_path: Path, workers: int) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(noise("PNG", (1024, 1024)))
    said, errors = tmp_path / "said.txt", tmp_path / "errors.txt"
    # Files, not pipes: an orphan holding a pipe would keep the read waiting.
    with said.open("w") as stdout, errors.open("w") as stderr:
        run = subprocess.run([sys.executable, "-c", KILLED_WITH_ITS_CHILDREN, str(image),
                              str(workers)],
                             stdout=stdout, stderr=stderr, timeout=120, check=False)
    assert run.returncode == -signal.SIGKILL, errors.read_text()
    verdict, kids = said.read_text().splitlines()
    assert verdict == "None"  # the image was decoded in a child: the child existed
    pids = [int(pid) for pid in kids.split()]
    assert pids, "no decode child was running"
    try:
        # Adopted by init once the run is gone; the parent-death signal must end them.
        assert wait_for(lambda: all_gone(pids), 20), f"left running after the run: {pids}"
    finally:
        for pid in pids:  # what a failure left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
