"""Tests for batch.decoder (the streaming body decoder) and batch.inflate (the Inflater)."""

from __future__ import annotations

import base64
import json
import random
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.decoder import BodyDecoder, ImageBegin, ImageBytes, ImageEnd, placeholder
from batch.errors import MalformedResponse
from batch.inflate import INFLATE_PIECE_BYTES, Inflater

Decoded = tuple[list[tuple[str, bytes]], Any]


def image(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def data_url(data: bytes, mime: str = "image/png", *, wrap: bool = False) -> str:
    text = base64.b64encode(data).decode()
    if wrap:  # MIME-style lines, as some encoders emit
        text = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    return f"data:{mime};base64,{text}"


def chat(urls: list[str], *, reasoning: str = "Drawing a cat.", openrouter: bool = False) -> Any:
    """A chat-completions answer with ``urls`` as its images (OpenRouter omits "index")."""
    images = [
        {"type": "image_url", "image_url": {"url": url}, **({} if openrouter else {"index": i})}
        for i, url in enumerate(urls)
    ]
    message = {
        "role": "assistant",
        "content": "",
        "reasoning_content": reasoning,
        "images": images,
    }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1290, "total_tokens": 1302},
    }


ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "plain": lambda doc: json.dumps(doc).encode(),
    "compact": lambda doc: json.dumps(doc, separators=(",", ":")).encode(),
    "slashes": lambda doc: json.dumps(doc).replace("/", "\\/").encode(),
    "indent": lambda doc: json.dumps(doc, indent=2).encode(),
    "utf8": lambda doc: json.dumps(doc, ensure_ascii=False).encode(),
    "u-escapes": lambda doc: (
        json.dumps(doc).replace("+", "\\u002B").replace("A", "\\u0041").encode()
    ),
}


def decode(pieces: Iterable[bytes], **kwargs: Any) -> Decoded:
    """Run a decoder over ``pieces``, checking event order; return (images, skeleton)."""
    decoder = BodyDecoder(**kwargs)
    images: list[tuple[str, bytearray]] = []
    current: int | None = None
    for piece in pieces:
        for event in decoder.feed(piece):
            if isinstance(event, ImageBegin):
                assert current is None and event.index == len(images)
                images.append((event.declared_mime, bytearray()))
                current = event.index
            elif isinstance(event, ImageBytes):
                assert current is not None and event.data
                images[current][1].extend(event.data)
            else:
                assert isinstance(event, ImageEnd) and event.index == current
                current = None
    skeleton = decoder.finish()
    assert current is None
    return [(mime, bytes(data)) for mime, data in images], skeleton


def split(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(body)) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


def case(images: list[bytes], *, wrap: bool = False, mime: str = "image/png", **kw: Any) -> Any:
    """(document with data URLs, the skeleton expected back)."""
    urls = [data_url(data, mime, wrap=wrap) for data in images]
    return chat(urls, **kw), chat([placeholder(i) for i in range(len(images))], **kw)


TRICKY_TEXT = 'He said "draw \\ a cat"\n\ttabs, ünïcödé, emoji 🐈, </script> and a//path'
CASES = {
    "one": case([image(3000)]),
    "several": case([image(500, 1), image(0, 2), image(1, 3), image(2, 4), image(7000, 5)]),
    "wrapped": case([image(4000)], wrap=True),
    "tricky-reasoning": case([image(900)], reasoning=TRICKY_TEXT),
    "long-reasoning": case([image(100)], reasoning=('\\x"é' * 3000)),
    "openrouter": case([image(1200), image(30, 9)], openrouter=True, mime="image/jpeg"),
    "no-image": case([]),
    "lookalikes": case(
        [image(10)],
        reasoning="data:image/png;base64 is how images come; data:text/plain,hi",
    ),
}


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", CASES)
def test_images_and_skeleton_round_trip(name: str, encoder: str) -> None:
    doc, expected = CASES[name]
    body = ENCODERS[encoder](doc)
    images, skeleton = decode(split(body, range(0, len(body), 997)))
    originals = [item["image_url"]["url"] for item in doc["choices"][0]["message"]["images"]]
    assert [(mime, base64.b64encode(data).decode()) for mime, data in images] == [
        (url[5:].split(";")[0], url.split(",", 1)[1].replace("\n", "")) for url in originals
    ]
    assert skeleton == expected


def test_error_body_has_no_image() -> None:
    doc = {"error": {"message": "Provider returned error", "code": 429, "metadata": {"raw": "x"}}}
    assert decode([json.dumps(doc).encode()]) == ([], doc)


def small_body() -> bytes:
    doc, _ = case([image(40), image(5, 1)], wrap=True, reasoning=TRICKY_TEXT)
    return ENCODERS["slashes"](doc)


def test_every_split_point_gives_the_same_result() -> None:
    body = small_body()
    reference = decode([body])
    assert [len(data) for _, data in reference[0]] == [40, 5]
    for cut in range(len(body) + 1):
        assert decode([body[:cut], body[cut:]]) == reference, cut
    assert decode([body[i : i + 1] for i in range(len(body))]) == reference


def test_plain_strings_before_a_data_url_keep_the_scanner_in_place() -> None:
    # The JSON around an image is skipped by one regex; on CPython 3.11.0-3.11.4 a
    # possessive form of it stopped two bytes late here and lost every image.
    body = (b'{"choices":[{"message":{"content":"hello world","images":[{"type":'
            b'"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]}}]}')
    reference = decode([body])
    assert [bytes(data) for _, data in reference[0]] == [b"\x89PNG\r\n\x1a\n"]
    for cut in range(len(body) + 1):
        assert decode([body[:cut], body[cut:]]) == reference, cut


def test_one_image_bytes_event_per_chunk() -> None:
    data = image(1_000_000)
    body = json.dumps(chat([data_url(data)])).replace("/", "\\/").encode()
    decoder = BodyDecoder()
    chunks = split(body, range(0, len(body), 65536))
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    pieces = [e.data for e in events if isinstance(e, ImageBytes)]
    assert b"".join(pieces) == data
    assert len(pieces) <= len(chunks)
    assert min(len(p) for p in pieces[:-1]) > 40_000


@pytest.mark.parametrize(
    ("url", "mime", "data"),
    [
        (b"data:image/jpeg;base64,QUFB", "image/jpeg", b"AAA"),
        (b"DATA:image/webp;BASE64,QUFB", "image/webp", b"AAA"),
        (b"data:image\\/png;charset=x;base64,QUFB", "image/png", b"AAA"),
        (b"\\u0064ata:;base64,\\u0051UFB", "", b"AAA"),
        (b"data:image/png;base64,", "image/png", b""),
        (b"data:image/png;base64,QQ==", "image/png", b"A"),
        (b"data:image/png;base64,QUFB\\r\\nQUFB\\u000a\\tQUE=", "image/png", b"AAAAAAAA"),
        (b"data:image/png;base64,QUFB\nQU FB\r\nQUE=\n", "image/png", b"AAAAAAAA"),
    ],
)
def test_data_url_forms(url: bytes, mime: str, data: bytes) -> None:
    body = b'{"url": "' + url + b'", "n": 1}'
    expected = ([(mime, data)], {"url": placeholder(0), "n": 1})
    assert decode([body]) == expected
    assert decode([body[i : i + 1] for i in range(len(body))]) == expected


@pytest.mark.parametrize(
    "payload",
    [
        b"QUFB*UFB",  # not in the alphabet
        b"QUFB-_FB",  # URL-safe alphabet
        b"QQ==QUFB",  # padding in the middle
        b"QQ=AQUFB",
        b"=QUF",
        b"Q===",
        b"QQ==Q",
        b"QUFBQ",  # not a multiple of 4
        b"QUFBQUE",
        b'QUFB\\"QUFB',  # an escaped quote
        b"QUFB\\\\QUFB",  # an escaped backslash
        b"QUFB\\u002aQUFB",  # \u escape of a non-alphabet character
        b"QUFB\\u00zzQUFB",
        b"QUFB\\bQUFB",
        b"QUFB\\x41QUFB",  # not a JSON escape at all
        b"QUFB\\",  # the closing quote is escaped: body is truncated
        b"QUFB\xc3\xa9QUFB",
    ],
)
@pytest.mark.parametrize("prefix", [b"", b"QUFB" * 600], ids=["in-head", "streamed"])
def test_bad_base64_is_malformed(payload: bytes, prefix: bytes) -> None:
    body = b'{"url":"data:image/png;base64,' + prefix + payload + b'"}'
    with pytest.raises(MalformedResponse):
        decode([body])
    with pytest.raises(MalformedResponse):
        decode([body[i : i + 1] for i in range(len(body))])


def test_padding_then_more_in_a_later_chunk_is_malformed() -> None:
    head = b'{"url":"data:image/png;base64,' + b"QUFB" * 600 + b"QQ=="
    decoder = BodyDecoder()
    decoder.feed(head)
    with pytest.raises(MalformedResponse, match="padding"):
        decoder.feed(b'QUFB"}')
    with pytest.raises(MalformedResponse):  # a failed decoder stays failed
        decoder.feed(b"")
    with pytest.raises(MalformedResponse):
        decoder.finish()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b'{"a": "text',
        b'{"a": "text\\',
        b'{"a": 1',
        b'{"a": 1}}',
        b'{"a": 1} {"b": 2}',
        b'{"url": "data:image/png;base64,QUFB',
        b'{"url": "data:image/png;base64,QUFB"',
        b"<html>Bad gateway</html>",
        b'{"a": "\xff"}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_truncated_or_invalid_bodies_are_malformed(body: bytes) -> None:
    with pytest.raises(MalformedResponse):
        decode([body])


def test_skeleton_cap() -> None:
    doc, _ = case([image(50_000)], reasoning="x" * 5000)
    body = json.dumps(doc).encode()
    images, _ = decode([body], max_skeleton_bytes=6000)  # images do not count
    assert len(images[0][1]) == 50_000
    with pytest.raises(MalformedResponse, match="besides its images"):
        decode([body], max_skeleton_bytes=4000)


def test_placeholder_is_not_ordinary_text() -> None:
    assert placeholder(0) != placeholder(1)
    assert "\x00" in placeholder(7)
    assert json.loads(json.dumps(placeholder(3))) == placeholder(3)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, list[bytes], Any]:
    images = draw(st.lists(st.binary(max_size=120), max_size=3))
    reasoning = draw(st.text(max_size=40))
    wrap = draw(st.booleans())
    encoder = draw(st.sampled_from(sorted(ENCODERS)))
    doc, expected = case(images, wrap=wrap, reasoning=reasoning)
    return ENCODERS[encoder](doc), images, expected


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(bodies(), st.lists(st.integers(min_value=0, max_value=3000), max_size=12))
def test_any_chunking_gives_exact_bytes(
    case: tuple[bytes, list[bytes], Any], cuts: list[int]
) -> None:
    body, images, expected = case
    decoded, skeleton = decode(split(body, cuts))
    assert [data for _, data in decoded] == images
    assert skeleton == expected


@PROPERTY
@given(bodies(), st.data())
def test_truncated_body_never_passes(
    case: tuple[bytes, list[bytes], Any], data: st.DataObject
) -> None:
    body = case[0]
    cut = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    chunks = data.draw(st.lists(st.integers(min_value=0, max_value=cut), max_size=4))
    with pytest.raises(MalformedResponse):
        decode(split(body[:cut], chunks))


class Pairs(list[tuple[str, Any]]):
    """A JSON object's members in body order, duplicate keys kept."""


def reference(body: bytes) -> tuple[list[bytes], Any] | None:
    """What a body means by the rules the decoder documents, computed without it.

    json.loads, then every string (key or value) whose first 256 characters hold an
    ASCII ``data:...;base64,`` header is an image: its text after the comma, whitespace
    dropped, strictly base64-decoded. None when the body is not valid JSON or such an
    image is not base64. Raw control characters are allowed in strings (strict=False):
    the decoder lets them pass inside data URLs (wrapped base64 has raw newlines), and
    the rest of the body is judged by its own strict json.loads.
    """
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=Pairs, strict=False)
    except (ValueError, RecursionError):
        return None
    images: list[bytes] = []

    def text(value: str) -> str:
        comma = value.find(",", 0, 256)
        header = value[: comma + 1]
        lower = header.lower()
        if comma < 0 or not (lower.startswith("data:") and lower.endswith(";base64,")
                             and header.isascii()):
            return value
        payload = value[comma + 1 :].translate({ord(c): None for c in " \t\r\n"})
        images.append(base64.b64decode(payload, validate=True))
        return placeholder(len(images) - 1)

    def walk(value: Any) -> Any:
        if isinstance(value, Pairs):
            return {text(key): walk(item) for key, item in value}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return text(value) if isinstance(value, str) else value

    try:
        return images, walk(doc)
    except ValueError:  # binascii.Error: an image that is not base64
        return None


def decode_or_malformed(pieces: list[bytes]) -> None:
    """The decoder may refuse a body; what it accepts must mean what the reference says."""
    try:
        decoded, skeleton = decode(pieces)
    except MalformedResponse:
        return
    expected = reference(b"".join(pieces))
    assert expected is not None, "the decoder accepted a body the reference refuses"
    assert ([data for _, data in decoded], skeleton) == expected


@pytest.mark.parametrize("url", [
    "dxta:image/png;base64,AAAA", "DATA:IMAGE/PNG;BASE64,AAAA", "data:image/png;base64 AAAA",
    "data:image/pngé;base64,AAAA", "data:" + "x" * 260 + ";base64,AAAA",
    "data:image/png;charset=x;base64,AAAA", "data:image/png;base64,AA\nAA", "data:,AAAA",
    "data:image/png;base64,\u0141AAA",  # once a ValueError out of the decoder
])
def test_lookalike_headers_mean_what_the_reference_says(url: str) -> None:
    for ascii_only in (False, True):  # raw UTF-8, or \u escapes
        body = json.dumps(chat([url]), ensure_ascii=ascii_only).encode()
        decode_or_malformed([body])
        decode_or_malformed(split(body, [len(body) // 2]))


@PROPERTY
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=4))
def test_garbage_is_malformed_or_parsed(garbage: bytes, cuts: list[int]) -> None:
    decode_or_malformed(split(garbage, cuts))


JSONISH = st.text(alphabet='{}[]",:\\/ \nadt;bse64uU0AQ=+*é', max_size=300)


@PROPERTY
@given(JSONISH, st.lists(st.integers(min_value=0, max_value=300), max_size=4))
def test_json_like_garbage_is_malformed_or_parsed(text: str, cuts: list[int]) -> None:
    decode_or_malformed(split(text.encode(), cuts))


@PROPERTY
@given(bodies(), st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=3))
def test_mutated_body_is_malformed_or_parsed(
    case: tuple[bytes, list[bytes], Any], edits: list[tuple[int, int]]
) -> None:
    body = bytearray(case[0])
    for pos, value in edits:
        body[pos % len(body)] = value
    decode_or_malformed(split(bytes(body), [len(body) // 3]))


# Inflater


def gzip_bytes(data: bytes, wbits: int = 31) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


def inflate(encoding: str | None, pieces: Iterable[bytes], limit: int = 10**9) -> list[bytes]:
    inflater = Inflater(encoding, max_output_bytes=limit)
    out = [piece for chunk in pieces for piece in inflater.feed(chunk)]
    out.extend(inflater.finish())
    assert all(len(piece) > 0 for piece in out)
    return out


PAYLOAD = image(30_000) + bytes(600_000) + b"tail"


@pytest.mark.parametrize(
    ("encoding", "wbits"),
    [("gzip", 31), ("x-gzip", 31), ("GZip", 31), ("deflate", 15), ("deflate", -15)],
)
def test_inflater_round_trips(encoding: str, wbits: int) -> None:
    packed = gzip_bytes(PAYLOAD, wbits)
    for cuts in ([], [1], [2, 3], range(0, len(packed), 4096)):
        out = inflate(encoding, split(packed, cuts))
        assert b"".join(out) == PAYLOAD
        assert max(len(piece) for piece in out) <= INFLATE_PIECE_BYTES


@pytest.mark.parametrize("encoding", [None, "", "identity", " Identity "])
def test_identity_passes_through(encoding: str | None) -> None:
    assert b"".join(inflate(encoding, [b"ab", b"", b"c"])) == b"abc"
    with pytest.raises(MalformedResponse):
        inflate(encoding, [b"ab", b"cd"], limit=3)


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "compress"])
def test_unsupported_encoding(encoding: str) -> None:
    with pytest.raises(MalformedResponse, match="unsupported"):
        Inflater(encoding, max_output_bytes=100)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3000), max_size=10), st.binary(max_size=2000))
def test_inflater_any_chunking(cuts: list[int], data: bytes) -> None:
    packed = gzip_bytes(data)
    assert b"".join(inflate("gzip", split(packed, cuts))) == data


def test_gzip_members_concatenate() -> None:
    packed = gzip_bytes(b"first ") + gzip_bytes(b"second")
    assert b"".join(inflate("gzip", split(packed, [5, 30]))) == b"first second"


def test_decompression_bomb_is_stopped_in_bounded_pieces() -> None:
    bomb = gzip_bytes(bytes(50 * 1024 * 1024))
    inflater = Inflater("gzip", max_output_bytes=10 * 1024 * 1024)
    seen: list[int] = []
    with pytest.raises(MalformedResponse, match="once decoded"):
        for chunk in split(bomb, range(0, len(bomb), 16384)):
            seen.extend(len(piece) for piece in inflater.feed(chunk))
    assert max(seen) <= INFLATE_PIECE_BYTES
    assert sum(seen) <= 10 * 1024 * 1024


@pytest.mark.parametrize(("encoding", "wbits"), [("gzip", 31), ("deflate", 15), ("deflate", -15)])
def test_truncated_stream_fails_at_finish(encoding: str, wbits: int) -> None:
    packed = gzip_bytes(image(2000), wbits)
    for cut in [0, 1, 2, 10, len(packed) // 2, len(packed) - 1]:
        with pytest.raises(MalformedResponse, match="truncated"):
            inflate(encoding, [packed[:cut]])


def test_corrupt_or_trailing_data_is_malformed() -> None:
    packed = bytearray(gzip_bytes(image(2000)))
    packed[20] ^= 0xFF
    with pytest.raises(MalformedResponse):
        inflate("gzip", [bytes(packed)])
    with pytest.raises(MalformedResponse):
        inflate("deflate", [gzip_bytes(b"abc", 15) + b"junk"])
    with pytest.raises(MalformedResponse):
        inflate("gzip", [gzip_bytes(b"abc") + b"junk"])


def test_gzip_body_through_inflater_and_decoder() -> None:
    doc, expected = case([image(200_000), image(3000, 1)], reasoning=TRICKY_TEXT)
    body = ENCODERS["slashes"](doc)
    packed = gzip_bytes(body)
    inflater = Inflater("gzip", max_output_bytes=10**7)
    pieces = [
        p for chunk in split(packed, range(0, len(packed), 8192)) for p in inflater.feed(chunk)
    ]
    pieces.extend(inflater.finish())
    images, skeleton = decode(pieces)
    assert [data for _, data in images] == [image(200_000), image(3000, 1)]
    assert skeleton == expected
