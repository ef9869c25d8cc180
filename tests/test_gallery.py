"""The gallery: thumbnails, escaping, reuse, and the page itself in a real headless Chromium."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch.errors import OutputError
from batch.gallery import THUMBS, build_gallery
from tests.conftest import read_results, run_cli, simulator

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
XSS = 'a cat </script><script>alert(1)</script><!-- & "quotes" <img src=x onerror=alert(2)>'


def encode(size: tuple[int, int], fmt: str, color: str = "teal", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: enough for Pillow to refuse it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def image_record(out: Path, name: str, data: bytes, size: tuple[int, int]) -> dict[str, Any]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "images" / name).write_bytes(data)
    mime = {"png": "image/png", "jpg": "image/jpeg", "gif": "image/gif"}[name.rsplit(".")[-1]]
    return {"path": f"images/{name}", "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "mime": mime, "width": size[0], "height": size[1]}


def row(job_id: str, status: str, prompt: str, images: list[dict[str, Any]] | None = None,
        error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": job_id, "status": status, "attempts": 1, "images": images or [],
            "error": error, "prompt": prompt, "model": "gemini-3.0-pro-image-preview",
            "aspect_ratio": "1:1", "image_size": "1K", "usage": None, "latency_s": 1.0}


def write_rows(out: Path, rows: list[dict[str, Any]], extra: str = "") -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (out / "results.jsonl").write_text(text + extra, encoding="utf-8")


@pytest.fixture
def gallery_dir(tmp_path: Path) -> Path:
    """A hand-made output folder: images of every kind, a corrupt one, failures, bad lines."""
    out = tmp_path / "out"
    def one(name: str, data: bytes, size: tuple[int, int]) -> list[dict[str, Any]]:
        return [image_record(out, name, data, size)]

    rows = [
        row("cat-1", "succeeded", "a small cat, watercolour",
            one("cat-1.png", encode((64, 48), "PNG"), (64, 48))),
        row("wide.jpg-2", "succeeded", "a very wide harbour at dusk",
            one("wide.jpg-2.jpg", encode((1600, 900), "JPEG", "navy"), (1600, 900))),
        row("tall_3", "succeeded", "a tall palette image",
            one("tall_3.gif", encode((300, 700), "GIF", "red", "P"), (300, 700))),
        row("xss", "succeeded", XSS,
            one("xss.png", encode((500, 500), "PNG", "orange", "RGBA"), (500, 500))),
        row("broken", "succeeded", "bytes that are not an image",
            one("broken.png", b"\x89PNG\r\n\x1a\nnot really", (100, 100))),
        row("bomb", "succeeded", "a decompression bomb",
            one("bomb.png", bomb_png(10_000, 10_000), (10_000, 10_000))),
        row("nomodel", "failed", "a dog, in a model that does not exist",
            error={"type": "rejected", "message": "model not found <b>bold</b>",
                   "http_status": 404}),
        row("later", "pending", "a horse, not run yet"),
    ]
    write_rows(out, rows, extra='{"id": "half a line\n[1, 2]\n\n{"id": "x", "status": "odd"}\n')
    summary = {"runs": [{"start": "2025-01-01T10:00:00+0000", "end": "2025-01-01T10:01:00+0000",
                         "wall_s": 60.25, "jobs": {"succeeded": 6, "failed": 1, "pending": 1},
                         "requests": 9, "retries": {"server_error": 2}, "rate_limited": 1,
                         "images_written": 6, "bytes_written": 123456,
                         "estimated_cost_usd": 0.804, "stopped": None, "exit_code": 1}]}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def thumb_files(out: Path) -> set[str]:
    return {p.name for p in (out / THUMBS).iterdir()}


def test_thumbs_escaping_reuse_and_cleanup(
    gallery_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = gallery_dir
    caplog.set_level(logging.WARNING, logger="batch.gallery")
    limit = Image.MAX_IMAGE_PIXELS
    stats = build_gallery(out)
    assert limit == Image.MAX_IMAGE_PIXELS  # Pillow's global is left as it was
    assert (stats.images, stats.failed_jobs, stats.pending_jobs) == (6, 1, 1)
    assert (stats.thumbs_made, stats.thumbs_reused, stats.placeholders) == (4, 0, 2)
    assert stats.malformed_lines == 3 and stats.path == out / "index.html"
    assert "decompression bomb" in caplog.text and "results.jsonl:10" in caplog.text
    sizes = {}
    for name in thumb_files(out):
        with Image.open(out / THUMBS / name) as thumb:
            assert max(thumb.size) <= 320
            sizes[name] = thumb.size
    assert sorted(sizes.values()) == [(64, 48), (137, 320), (320, 180), (320, 320)]

    page = stats.path.read_text(encoding="utf-8")
    assert page.count("<script") == 1 and page.count("</script>") == 1  # only our own
    assert "<script>alert" not in page and "<img src=x" not in page and "<!-- &" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;!--" in page
    assert "model not found &lt;b&gt;bold&lt;/b&gt;" in page
    assert 'href="images/wide.jpg-2.jpg"' in page and "no preview" in page
    assert "$0.80" in page and "2 (2 server_error)" in page and "60.2 s" in page
    assert "3 malformed line(s)" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere

    before = {n: (out / THUMBS / n).stat().st_mtime_ns for n in thumb_files(out)}
    again = build_gallery(out)
    assert (again.thumbs_made, again.thumbs_reused) == (0, 4)
    assert {n: (out / THUMBS / n).stat().st_mtime_ns for n in thumb_files(out)} == before

    # The cat is regenerated: a new hash, so a new thumb, and the old one goes.
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[:8]]
    old = rows[0]["images"][0]["sha256"][:16] + ".webp"
    rows[0]["images"] = [image_record(out, "cat-1.png", encode((64, 48), "PNG", "gold"), (64, 48))]
    write_rows(out, rows)
    third = build_gallery(out)
    assert (third.thumbs_made, third.thumbs_reused, third.malformed_lines) == (1, 3, 0)
    assert old not in thumb_files(out)
    assert rows[0]["images"][0]["sha256"][:16] + ".webp" in thumb_files(out)
    assert len(thumb_files(out)) == 4


def test_missing_results_and_bad_folder(tmp_path: Path) -> None:
    stats = build_gallery(tmp_path)
    assert (stats.images, stats.failed_jobs, stats.pending_jobs) == (0, 0, 0)
    page = stats.path.read_text(encoding="utf-8")
    assert "No results yet" in page and "No run summary" in page
    with pytest.raises(OutputError):
        build_gallery(tmp_path / "nowhere")


def test_many_images_rebuild_decodes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 images: the second build reuses every thumb and opens no image at all."""
    data = [encode((64, 64), "PNG", (i % 256, i // 256 % 256, 90)) for i in range(1000)]
    rows = [row(f"job-{i:04d}", "succeeded", f"prompt {i}",
                [image_record(tmp_path, f"job-{i:04d}.png", d, (64, 64))])
            for i, d in enumerate(data)]
    write_rows(tmp_path, rows)
    first = build_gallery(tmp_path)
    thumbs = {p.name: p.read_bytes() for p in (tmp_path / "thumbs").iterdir()}
    opened: list[object] = []
    real_open = Image.open
    # What makes a rebuild slow is decoding images; count it at Pillow, not in our code.
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    second = build_gallery(tmp_path)
    assert (first.thumbs_made, second.thumbs_made, second.thumbs_reused) == (1000, 0, 1000)
    assert opened == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "thumbs").iterdir()} == thumbs


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium under Playwright; CI must have it, a laptop may skip."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        problem = f"playwright is not installed ({exc}): pip install -e '.[dev]'"
    else:
        problem = "" if CHROMIUM.exists() else f"{CHROMIUM} is missing: apt-get install chromium"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need a browser in CI: {problem}")
        pytest.skip(problem)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class Opened:
    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def visible(self) -> list[str]:
        return self.page.eval_on_selector_all(  # type: ignore[no-any-return]
            "#grid .tile:not([hidden])", "els => els.map(e => e.dataset.status)")

    def show(self, status: str) -> list[str]:
        self.page.click(f"button[data-filter={status}]")
        return self.visible()

    def search(self, text: str, expect: int) -> list[str]:
        self.page.fill("#q", text)
        self.page.wait_for_function(  # a function, not a string: the page's CSP forbids eval
            """([q, n]) => {
                const shown = [...document.querySelectorAll('#grid .tile:not([hidden])')];
                return shown.length === n
                    && shown.every((t) => t.textContent.toLowerCase().includes(q));
            }""", arg=[text.lower(), expect])
        return self.visible()


def open_gallery(browser: Any, index: Path) -> Opened:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    opened = Opened(page)
    page.on("console", lambda m: opened.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: opened.errors.append(str(e)))
    page.on("request", lambda r: opened.requests.append(r.url))
    page.goto(index.as_uri())
    # Lazy images only load near the viewport: load them all, then check each decoded.
    page.evaluate("() => { for (const i of document.images) i.loading = 'eager'; }")
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    return opened


def check_page(opened: Opened, images: int) -> None:
    widths = opened.page.eval_on_selector_all("#grid img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == images and all(w > 0 for w in widths), widths
    assert opened.errors == []
    assert opened.requests and all(u.startswith("file://") for u in opened.requests)


def test_gallery_in_browser(browser: Any, gallery_dir: Path) -> None:
    build_gallery(gallery_dir)
    opened = open_gallery(browser, gallery_dir / "index.html")
    check_page(opened, images=4)
    page = opened.page
    assert page.title().startswith("imgbatch")
    problems = page.inner_text("#problems")
    assert "nomodel" in problems and "rejected" in problems and "404" in problems
    assert "model not found <b>bold</b>" in problems and "later" in problems
    assert page.inner_text("#grid .tile:has-text('wide.jpg-2') figcaption p") == (
        "a very wide harbour at dusk")
    assert XSS in page.inner_text("#grid")  # shown as text, never run
    assert opened.show("failed") == ["failed"]
    assert opened.show("pending") == ["pending"]
    assert page.is_hidden("#problems tr[data-status=failed]")
    assert opened.show("succeeded") == ["succeeded"] * 6 and page.is_hidden("#problems")
    assert len(opened.show("all")) == 8 and page.is_visible("#problems")
    assert opened.search("HARBOUR", 1) == ["succeeded"]
    assert opened.search("horse", 1) == ["pending"]
    assert page.inner_text("#count") == "1 of 8 tiles"
    assert opened.search("no such words", 0) == [] and page.is_visible("#none")
    assert len(opened.search("", 8)) == 8
    if shot := os.environ.get("GALLERY_SCREENSHOT"):  # e.g. /tmp/gallery.png, to look at
        page.screenshot(path=shot, full_page=True)
    page.close()


def test_gallery_of_a_real_run(browser: Any, tmp_path: Path) -> None:
    """The real CLI against the simulator, with failures, then the gallery of its folder."""
    jobs = [{"id": f"pic-{i}", "prompt": f"picture {i} of a lighthouse",
             "aspect_ratio": ["1:1", "16:9", "9:16"][i % 3]} for i in range(8)]
    jobs.append({"id": "ghost", "prompt": "a model nobody serves", "model": "no-such-model"})
    manifest = tmp_path / "cat.jsonl"
    manifest.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = tmp_path / "out"
    with simulator("--scale", "0.0625", "--fault-no-image", "0.5", "--fault-attempts", "0",
                   "--seed", "5") as sim:
        done = run_cli("run", str(manifest), "--output", str(out), "--base-url", sim.url,
                       "--concurrency", "4", "--max-attempts", "3")
    assert done.returncode == 1, done.stderr  # "some jobs failed": ghost's model is unknown
    rows = read_results(out)
    failed = [r for r in rows if r["status"] == "failed"]
    assert "ghost" in [r["id"] for r in failed]
    stats = build_gallery(out)
    succeeded = sum(r["status"] == "succeeded" for r in rows)
    # The run built the gallery on its way out; this rebuild reuses its thumbnails.
    assert stats.images == stats.thumbs_made + stats.thumbs_reused == succeeded
    assert stats.thumbs_reused == succeeded and stats.failed_jobs == len(failed)
    assert (out / "index.html").exists()
    opened = open_gallery(browser, stats.path)
    check_page(opened, images=succeeded)
    problems = opened.page.inner_text("#problems")
    for r in failed:
        assert r["id"] in problems and r["error"]["type"] in problems
    assert "404" in problems
    assert len(opened.show("failed")) == len(failed)
    requests = json.loads((out / "summary.json").read_text())["runs"][-1]["requests"]
    facts = dict(opened.page.eval_on_selector_all(
        "dl.facts div", "els => els.map(e => [e.firstChild.textContent, e.lastChild.textContent])"))
    assert facts["Requests"] == str(requests) and facts["Jobs"].startswith(f"{succeeded} succ")
    opened.page.close()
