"""Tests for batch.imageinfo: probe and the streaming ImageVerifier."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batch.errors import MalformedResponse
from batch.imagecheck import decode_check
from batch.imageinfo import (
    DEFAULT_MAX_PIXELS,
    ImageFormatError,
    ImageInfo,
    ImageVerifier,
    probe,
    sniff_mime,
)

# Real 16x16 files from CPython's test data (Lib/test/test_email/data/python.*).
REAL_JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010101000100010000ffdb00430003020202020203020202030303030406040404"
    "0404080606050609080a0a090809090a0c0f0c0a0b0e0b09090d110d0e0f101011100a0c12131210130f1010"
    "10ffdb00430103030304030408040408100b090b101010101010101010101010101010101010101010101010"
    "1010101010101010101010101010101010101010101010101010ffc000110800100010030122000211010311"
    "01ffc400160001010100000000000000000000000000070405ffc40024100001040104020203000000000000"
    "00000102030406050708121311220014093132ffc4001501010100000000000000000000000000000006ffc4"
    "00231100010205030500000000000000000000010211030405062100123115166181e1ffda000c0301000211"
    "0311003f0014a6d26a1b73c1e61312d4951cf31163e42565beba5aec694540b1e520b254a51fd2cab8faf220"
    "ab963d976c9335e69b77d7e66da71781a5571c7f1cea71e24b39d7e32253f21a69ded4714a38b482e84b892a"
    "71691ecd2d213bf1efb91a74aceea15a758ed548ac655b858b81857b21299867a96b94b949654fb9c8852911"
    "4b812af07ad9f23c807e55be0df662a140cce8e69a3d5cb743b3d77a6558b1d9512188bf64b8d3f1c3680429"
    "c0d0febb3c02e03c5407b4bdd97b54e627fb6edf9460148262138db8529828370589727960e432896fc3828e"
    "a7528cea208dbe78191f07ad7fffd9"
)
REAL_WEBP = bytes.fromhex(  # VP8X + ALPH + VP8
    "52494646a801000057454250565038580a000000100000000f00000f0000414c5048c30000000127a2a89124"
    "e57ae7185fe7df2a998898ff74718de02630e2e18b7732c8c1115c832b30e8b078158e785135c1080c024f92"
    "a06ab055191cd6b66d462f4ec6763cb6ed77fbaf29ae21a2ff49d1fd8f90f7ba4449241b3a259134f3146d0e"
    "c7d3e51620f40b14be90e183b71a329e36827f1d297e4e7608fb889eb391ef997346e83282dbf8cc48b2f745"
    "307d20fd36178c2132562da5d66b23bc5de3a55915d59c81a4d96e96758a18310f8aaa2c5034fa3082dfba6b"
    "505229b52dcfe954140a0100000056503820be0000009002009d012a1000100003003425b00274304f08850c"
    "7c031d082cfde800fefd74a0fd029b1f8af7437c9c37f6d20cafd3ff3568e2eea7bdc96f1bf4aac563aeba9f"
    "9784df41a23bda5be4eff8cbf1bd7fe1affa3fe509ecf4bb665fffaa29d97fc96ce786e6ac97b9e4c6f49323"
    "8c5fdd8f3955207f954ffc39f8ff6fd26b03e89fbc8398666db1d513ff7617e6b1fe5d8ae49f47bfb3fabffe"
    "1d1df3128ffe5ccfc1faf918c3bdcfcf1f9139a001fd9a014b312cdebcd97baaac000000"
)
REAL_GIF = bytes.fromhex(
    "47494638396110001000f53f00ebbb18ebbe21f3c11afac719fdcb1bffcc1cebc22affcf23ffcf24ffd025ff"
    "d32debc534e8c73dffd330ffd430fdd536fad339ffd739f9d53effd83aecce45ffda41ffdb44ffde4bffdf4e"
    "ffe255ffe358ffe762f2e16ef5e36ffde96affeb6c326087366690366791366993376896376a96396c963a6f"
    "9b3a709c3b709c3c719e3d73a23e74a23f76a54078a6427baa437cab437dad457faf4680b14781b24883b448"
    "85b64a86ba4c89bc4c8abc4c8abf4f8dc1508fc35291c6ffffff00000021ff0b496d6167654d616769636b07"
    "67616d6d613d300021f9040500003f002c000000001000100000069bc09ff0b7bbcd622d1569c814e67cb317"
    "0b556a326d5156aa34b2fe74b618cb143295aaccde0e5793b954a7d1f997b9487e3c1d4df6828ffe203f1715"
    "0f5f3634522a67228114840a3f87302e5d4d15110a073f472e223f1c1e1b191815130a08043f31523f1d1f1b"
    "1a1816110d080502422b293fafb1a5a7050556b0180c0b060100005eb1b30d09c25e3fb2110e093ea9d23f10"
    "cf0503dae04341003b"
)


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def make_png(width: int, height: int, *, idat_pieces: int = 1, ancillary: bool = False) -> bytes:
    """A real RGB PNG (gray gradient), its zlib stream split over ``idat_pieces`` IDATs."""
    rows = b"".join(b"\x00" + bytes((x + y) % 256 for x in range(width * 3)) for y in range(height))
    packed = zlib.compress(rows)
    step = -(-len(packed) // idat_pieces)
    idats = [png_chunk(b"IDAT", packed[i : i + step]) for i in range(0, len(packed), step)]
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    extra = png_chunk(b"tEXt", b"Comment\x00made by hand") if ancillary else b""
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra + b"".join(idats) + png_chunk(b"IEND", b"")


def jpeg_segment(code: int, body: bytes) -> bytes:
    return bytes((0xFF, code)) + struct.pack(">H", len(body) + 2) + body


def make_jpeg(
    width: int, height: int, *, app: bytes = b"", scans: int = 1, sof: int = 0xC0
) -> bytes:
    """A structurally valid JPEG; the entropy data holds stuffing, RST and fill bytes."""
    entropy = b"\x12\x34\xff\x00\x56\xff\xd0\x78\x9a\xff\xff\xd1\xbc"
    scan = jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + entropy
    dht = jpeg_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
    return (
        b"\xff\xd8"
        + jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + app
        + jpeg_segment(0xDB, b"\x00" + bytes([1] * 64))
        + jpeg_segment(sof, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + dht
        + (scan + dht) * (scans - 1)
        + scan
        + b"\xff\xd9"
    )


def make_webp(fourcc: bytes, payload: bytes) -> bytes:
    body = (
        b"WEBP" + fourcc + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) & 1)
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def vp8(width: int, height: int) -> bytes:
    return make_webp(
        b"VP8 ", b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 7
    )


def vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | (height - 1) << 14
    return make_webp(b"VP8L", b"\x2f" + struct.pack("<I", bits) + b"\x00" * 4)


def vp8x(width: int, height: int) -> bytes:
    head = (
        b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    )
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + head
    inner = vp8(width, height)[12:]  # the VP8 chunk after the VP8X one
    body += inner
    return b"RIFF" + struct.pack("<I", len(body)) + body


def make_gif(width: int, height: int, *, table: bool = True) -> bytes:
    """GIF89a with a graphic-control extension, one frame and a comment.

    The color table is global when ``table``, else local to the frame.
    """
    screen = struct.pack("<HHBBB", width, height, 0x80 if table else 0, 0, 0)
    colors = b"\x00\x00\x00\xff\xff\xff"
    gce = b"\x21\xf9\x04\x00\x00\x00\x00\x00"
    local = b"" if table else colors
    frame = (
        b"\x2c"
        + struct.pack("<HHHHB", 0, 0, width, height, 0 if table else 0x80)
        + local
        + b"\x02\x02\x44\x01\x00"
    )
    colors = colors if table else b""
    comment = b"\x21\xfe\x03abc\x00"
    return b"GIF89a" + screen + colors + gce + frame + comment + b"\x3b"


VALID = [
    pytest.param(make_png(3, 2), ImageInfo("image/png", "png", 3, 2), id="png"),
    pytest.param(
        make_png(40, 30, idat_pieces=5, ancillary=True),
        ImageInfo("image/png", "png", 40, 30),
        id="png-multi-idat",
    ),
    pytest.param(REAL_JPEG, ImageInfo("image/jpeg", "jpg", 16, 16), id="jpeg-real"),
    pytest.param(make_jpeg(640, 480), ImageInfo("image/jpeg", "jpg", 640, 480), id="jpeg"),
    pytest.param(
        make_jpeg(
            7, 9, scans=3, sof=0xC2, app=jpeg_segment(0xE1, b"Exif\x00\x00\xff\xd9") + b"\xff\x01"
        ),
        ImageInfo("image/jpeg", "jpg", 7, 9),
        id="jpeg-progressive-eoi-in-app",
    ),
    pytest.param(REAL_WEBP, ImageInfo("image/webp", "webp", 16, 16), id="webp-real"),
    pytest.param(vp8(300, 200), ImageInfo("image/webp", "webp", 300, 200), id="webp-vp8"),
    pytest.param(vp8l(5, 16384), ImageInfo("image/webp", "webp", 5, 16384), id="webp-vp8l"),
    pytest.param(vp8x(1000, 3), ImageInfo("image/webp", "webp", 1000, 3), id="webp-vp8x"),
    pytest.param(REAL_GIF, ImageInfo("image/gif", "gif", 16, 16), id="gif-real"),
    pytest.param(make_gif(2, 3), ImageInfo("image/gif", "gif", 2, 3), id="gif"),
    pytest.param(
        make_gif(59, 59, table=False), ImageInfo("image/gif", "gif", 59, 59), id="gif-bare"
    ),
]


@pytest.mark.parametrize(("data", "info"), VALID)
def test_probe_reads_type_and_size(data: bytes, info: ImageInfo) -> None:
    assert probe(data) == info
    assert sniff_mime(data) == info.mime


@pytest.mark.parametrize(("data", "info"), VALID)
def test_every_split_point_and_single_bytes_agree(data: bytes, info: ImageInfo) -> None:
    for cut in range(len(data) + 1):
        verifier = ImageVerifier()
        verifier.feed(data[:cut])
        verifier.feed(data[cut:])
        assert verifier.finish() == info
    verifier = ImageVerifier()
    for byte in data:
        verifier.feed(bytes((byte,)))
    assert verifier.finish() == info


@pytest.mark.parametrize(("data", "info"), VALID)
def test_truncated_at_every_length_is_an_error(data: bytes, info: ImageInfo) -> None:
    for cut in range(len(data)):
        with pytest.raises(ImageFormatError):
            probe(data[:cut])


@pytest.mark.parametrize(
    "data",
    [make_png(3, 2), make_jpeg(4, 4), make_gif(2, 2)],
    ids=["png", "jpeg", "gif"],
)
def test_bytes_after_the_end_marker_are_tolerated(data: bytes) -> None:
    assert probe(data + b"\x00\x00trailing").width > 0


def test_webp_length_must_match_riff_size() -> None:
    data = vp8(10, 10)
    verifier = ImageVerifier()
    with pytest.raises(ImageFormatError, match="RIFF"):
        verifier.feed(data + b"\x00\x00")
    verifier = ImageVerifier()
    verifier.feed(data)
    with pytest.raises(ImageFormatError, match="RIFF"):
        verifier.feed(b"\x00")
    short_riff = data[:4] + struct.pack("<I", len(data) - 10) + data[8:]
    with pytest.raises(ImageFormatError):
        probe(short_riff)


def test_failed_verifier_stays_failed() -> None:
    verifier = ImageVerifier()
    with pytest.raises(ImageFormatError):
        verifier.feed(b"nope, not an image")
    with pytest.raises(ImageFormatError, match="not an image"):
        verifier.feed(make_png(1, 1))


def test_every_png_byte_corruption_is_caught() -> None:
    data = make_png(4, 3, ancillary=True)
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x55
        with pytest.raises(ImageFormatError):
            probe(bytes(bad))


def test_png_crc_error_is_raised_while_feeding() -> None:
    data = bytearray(make_png(8, 8))
    data[40] ^= 1  # inside the IDAT data
    verifier = ImageVerifier()
    with pytest.raises(ImageFormatError, match="CRC"):
        verifier.feed(bytes(data[:-12]))  # before IEND arrives
    with pytest.raises(ImageFormatError):  # the verifier stays failed
        verifier.finish()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IDAT", b"x") + png_chunk(b"IEND", b""), "IHDR"),
        (
            make_png(2, 2)[:33] + png_chunk(b"IEND", b""),  # IHDR then IEND: no pixel data
            "IDAT",
        ),
        (
            make_png(2, 2)[:16] + struct.pack(">IIBBBBB", 2, 2, 3, 2, 0, 0, 0),  # depth 3
            "depth",
        ),
        (b"\xff\xd8\xff\xd9", "before any image data"),
        (b"\xff\xd8\xff\xfe\x00\x02\x00", "marker"),
        (b"\xff\xd8" + jpeg_segment(0xDA, b"\x00" * 6) + b"\xff\xd9", "scan before"),
        (make_webp(b"ALPH", b"\x00" * 10), "ALPH"),
        (make_webp(b"VP8 ", b"\x11" + b"\x00" * 9), "key frame"),
        (make_webp(b"VP8L", b"\x00" * 5), "VP8L"),
        (b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0) + b"\x3b", "no image"),
        (b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0) + b"\x99", "block"),
        (b"\xff\xd8\xff\xe0\x00\x01", "length"),
        (b"\xff\xd8" + jpeg_segment(0xC0, b"\x08\x00\x01\x00"), "too short"),
        (b"RIFF\x04\x00\x00\x00WEBP", "no image"),
        (b"RIFF\x08\x00\x00\x00WEBPVP8 ", "crosses"),
        (b"RIFF\x14\x00\x00\x00WEBPVP8L\x64\x00\x00\x00\x2f" + bytes(7), "crosses"),
        (b"\xff\xd8\xff\xd8", "stray"),
        (b"GIF89a" + struct.pack("<HHBBB", 0, 5, 0, 0, 0), "empty size"),
    ],
)
def test_structural_corruption(data: bytes, message: str) -> None:
    with pytest.raises(ImageFormatError, match=message):
        probe(data)


@pytest.mark.parametrize(
    "head",
    [
        b"<html><body>",  # cannot become a signature: fails on the first byte
        b"hello world!",
        b"RIFF\x00\x00\x00\x00WAVE",
        b"GIF90a",
        b"\x89PNG\r\n\x1a\x0b",
    ],
)
def test_not_an_image_fails_by_twelve_bytes(head: bytes) -> None:
    verifier = ImageVerifier()
    with pytest.raises(ImageFormatError, match="not an image"):
        for byte in head:
            verifier.feed(bytes((byte,)))


def test_unknown_prefix_fails_at_once() -> None:
    with pytest.raises(ImageFormatError):
        ImageVerifier().feed(b"{")


def test_too_short_to_tell() -> None:
    verifier = ImageVerifier()
    verifier.feed(b"\x89PN")
    with pytest.raises(ImageFormatError):
        verifier.finish()
    with pytest.raises(ImageFormatError):
        probe(b"")


BOMBS = [
    pytest.param(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 10**5, 10**5, 8, 2, 0, 0, 0)),
        id="png",
    ),
    pytest.param(make_jpeg(65535, 65535).split(b"\xff\xc4")[0], id="jpeg"),  # up to the SOF
    pytest.param(vp8x(16384, 16384)[:30], id="webp-vp8x"),
    pytest.param(vp8l(16384, 16384)[:25], id="webp-vp8l"),
    pytest.param(make_gif(65535, 65535)[:13], id="gif"),
]


@pytest.mark.parametrize("head", BOMBS)
def test_pixel_bomb_header_fails_before_finish(head: bytes) -> None:
    verifier = ImageVerifier()
    with pytest.raises(ImageFormatError, match="over the cap"):
        verifier.feed(head)


def test_pixel_cap_is_configurable() -> None:
    data = make_png(10, 10)
    assert probe(data, max_pixels=100).width == 10
    with pytest.raises(ImageFormatError, match="over the cap"):
        probe(data, max_pixels=99)
    assert DEFAULT_MAX_PIXELS == 64 * 1024 * 1024


def test_jpeg_header_region_is_bounded() -> None:
    icc = jpeg_segment(0xE2, b"\x00" * 65000)
    with pytest.raises(ImageFormatError, match="frame header"):
        probe(make_jpeg(8, 8, app=icc * 17))  # ~1.1 MB of metadata before the SOF
    assert probe(make_jpeg(8, 8, app=icc * 8)).width == 8


def test_large_png_streams_in_slices() -> None:
    # ~8 MB of IDAT in one chunk, fed in 64 KiB pieces; the CRCs must still check.
    payload = bytes(range(256)) * 32768
    data = (
        make_png(1, 1)[:33]
        + png_chunk(b"IDAT", payload)
        + png_chunk(b"IDAT", payload[:1000])
        + png_chunk(b"IEND", b"")
    )
    verifier = ImageVerifier()
    for start in range(0, len(data), 65536):
        verifier.feed(data[start : start + 65536])
    assert verifier.finish() == ImageInfo("image/png", "png", 1, 1)


def test_image_format_error_is_a_retryable_malformed_response() -> None:
    assert issubclass(ImageFormatError, MalformedResponse)
    with pytest.raises(MalformedResponse):
        probe(b"not an image at all")


@settings(max_examples=60, deadline=None)
@given(
    index=st.sampled_from(range(len(VALID))),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_arbitrary_chunking(index: int, cuts: list[int]) -> None:
    data, info = VALID[index].values
    assert isinstance(data, bytes)
    verifier = ImageVerifier()
    points = sorted({min(c, len(data)) for c in cuts})
    for start, stop in zip([0, *points], [*points, len(data)], strict=True):
        verifier.feed(data[start:stop])
    assert verifier.finish() == info


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_raises_only_image_format_error(data: bytes) -> None:
    with contextlib.suppress(ImageFormatError):
        probe(data)


@settings(max_examples=300, deadline=None)
@given(
    index=st.sampled_from(range(len(VALID))),
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.integers(min_value=0),
)
def test_mutated_images_raise_only_image_format_error(
    index: int, edits: list[tuple[int, int]], cut: int
) -> None:
    data = VALID[index].values[0]
    assert isinstance(data, bytes)
    bad = bytearray(data)
    for pos, value in edits:
        bad[pos % len(bad)] = value
    try:
        info = probe(bytes(bad[: len(bad) - cut % 3]))
    except ImageFormatError:
        return
    assert info.width > 0 and info.height > 0


def pillow_made(fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((24, 16), 50).convert("RGB").save(out, fmt, **options)
    return out.getvalue()


# Real encoders' output, so that Pillow (the independent judge) can decode the originals.
DECODABLE = {
    "png": pillow_made("PNG"), "jpeg": pillow_made("JPEG", quality=80),
    "webp-lossy": pillow_made("WEBP", quality=80),
    "webp-lossless": pillow_made("WEBP", lossless=True),
    "gif": pillow_made("GIF"),
}


# IMGBATCH_FUZZ_EXAMPLES=6000 found the GIF whose frame lay outside its screen.
@settings(max_examples=int(os.environ.get("IMGBATCH_FUZZ_EXAMPLES", "300")), deadline=None)
@given(
    name=st.sampled_from(sorted(DECODABLE)),
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.integers(min_value=0, max_value=2),
)
def test_mutated_real_images_that_pass_decode_as_pillow_says(
    tmp_path_factory: pytest.TempPathFactory, name: str, edits: list[tuple[int, int]], cut: int
) -> None:
    """What the streaming check and then --verify decode accept, Pillow decodes to that size."""
    bad = bytearray(DECODABLE[name])
    for pos, value in edits:
        bad[pos % len(bad)] = value
    data = bytes(bad[: len(bad) - cut])
    try:
        info = probe(data)
    except ImageFormatError:
        return
    path = tmp_path_factory.mktemp("mutated") / "image"
    path.write_bytes(data)
    try:
        decode_check(path, info.mime)
    except ImageFormatError:
        return
    with Image.open(io.BytesIO(data)) as image:
        assert Image.MIME[image.format] == info.mime
        assert image.size == (info.width, info.height)
        image.load()
