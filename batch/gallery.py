"""``DIR/index.html``: a contact sheet of a run's images, its failures and its last run's figures.

One self-contained file (inline CSS and JS, no network) that works from file://. Thumbnails
live in ``DIR/thumbs/<sha256[:16]>.webp``: made once, reused while the image is unchanged,
deleted once no result references them.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, features

from batch.errors import OutputError, StorageError
from batch.images import write_atomic
from batch.report import read_runs
from batch.results import RESULTS

log = logging.getLogger(__name__)

INDEX = "index.html"
THUMBS = "thumbs"
# 4K tops out at ~17 MP; anything claiming far more is a decompression bomb.
MAX_PIXELS = 80_000_000
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # the only decoders an output image needs
_THUMB_NAME = re.compile(r"[0-9a-f]{16}\.(?:webp|jpg)")
_SHA = re.compile(r"[0-9a-f]{64}")
_STATUSES = ("succeeded", "failed", "pending")
_ERROR_KEYS = ("type", "http_status", "message")
_MAX_WARNINGS = 20


@dataclass(frozen=True)
class GalleryStats:
    """What one build did."""

    images: int
    thumbs_made: int
    thumbs_reused: int
    failed_jobs: int
    pending_jobs: int
    path: Path  # of index.html
    placeholders: int = 0  # image tiles shown without a thumbnail (unreadable image)
    malformed_lines: int = 0  # results.jsonl lines skipped


@dataclass(frozen=True)
class _Image:
    rel: str | None  # relative to DIR, with "/"; None when absent or unsafe
    thumb: str | None  # file name in thumbs/; None when the hash is unusable
    width: int
    height: int
    size_bytes: int


@dataclass(frozen=True)
class _Job:
    id: str
    status: str
    prompt: str
    model: str
    meta: tuple[str, str]  # aspect ratio, image size
    attempts: int
    error: Mapping[str, Any]
    images: tuple[_Image, ...]


def build_gallery(root: Path, *, thumb_px: int = 320) -> GalleryStats:
    """Write ``root/index.html`` (and thumbnails) from results.jsonl and summary.json."""
    root = Path(root)
    if not root.is_dir():
        raise OutputError(f"{root} is not a folder")
    if thumb_px < 16:
        raise ValueError("thumb_px must be at least 16")
    ext = "webp" if features.check("webp") else "jpg"
    jobs, malformed = _read_jobs(root, ext)
    thumbs = root / THUMBS
    try:
        thumbs.mkdir(exist_ok=True)
        present = set(os.listdir(thumbs))  # one listing instead of a stat per image
    except OSError as exc:
        raise StorageError(f"cannot use {thumbs}: {exc.strerror}") from None
    images = [image for job in jobs for image in job.images]
    wanted = {i.thumb: root / i.rel for i in images if i.thumb and i.rel}  # one per distinct image
    todo = {name: src for name, src in wanted.items() if name not in present}
    made = _make_thumbs(todo, thumbs, thumb_px)
    have = (present & wanted.keys()) | made
    path = root / INDEX
    write_atomic(path, [_page(root, jobs, malformed, have, thumb_px).encode("utf-8")])
    _remove_stale(thumbs, wanted.keys())
    return GalleryStats(
        images=len(images), thumbs_made=len(made), thumbs_reused=len(wanted) - len(todo),
        failed_jobs=sum(job.status == "failed" for job in jobs),
        pending_jobs=sum(job.status == "pending" for job in jobs), path=path,
        placeholders=sum(i.thumb not in have for i in images), malformed_lines=malformed,
    )


def _read_jobs(root: Path, ext: str) -> tuple[list[_Job], int]:
    """The jobs results.jsonl lists (none if it is missing), and how many lines were skipped."""
    path = root / RESULTS
    try:
        handle = path.open(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    jobs: list[_Job] = []
    bad = 0  # lines skipped: the page says how many; the first _MAX_WARNINGS are logged
    with handle:
        for number, line in enumerate(handle, 1):
            try:
                if line.strip():
                    jobs.append(_job(json.loads(line), ext))
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                bad += 1
                if bad <= _MAX_WARNINGS:
                    log.warning("%s:%d: skipped, not a result line (%s)", path, number, exc)
    return jobs, bad


def _job(data: Any, ext: str) -> _Job:
    if not isinstance(data, dict) or not isinstance(data["id"], str):
        raise ValueError("no string id")
    if data["status"] not in _STATUSES:
        raise ValueError(f"unknown status {data['status']!r}")
    error, images = data.get("error"), data.get("images") or []
    return _Job(
        id=data["id"], status=data["status"], prompt=str(data.get("prompt") or ""),
        model=str(data.get("model") or ""),
        meta=(str(data.get("aspect_ratio") or ""), str(data.get("image_size") or "")),
        attempts=_int(data.get("attempts")), error=error if isinstance(error, dict) else {},
        images=tuple(_image(item, ext) for item in images if isinstance(item, dict)),
    )


def _image(item: Mapping[str, Any], ext: str) -> _Image:
    rel, sha = item.get("path"), item.get("sha256")
    # Only plain relative paths inside DIR: never read or link anything outside it.
    safe = isinstance(rel, str) and rel != "" and "\\" not in rel and not rel.startswith("/")
    return _Image(
        rel=rel if safe and isinstance(rel, str) and ".." not in rel.split("/") else None,
        thumb=f"{sha[:16]}.{ext}" if isinstance(sha, str) and _SHA.fullmatch(sha) else None,
        width=_int(item.get("width")), height=_int(item.get("height")),
        size_bytes=_int(item.get("bytes")),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _make_thumbs(todo: Mapping[str, Path], folder: Path, px: int) -> set[str]:
    """Make the thumbnails ``todo`` names, refusing images over MAX_PIXELS; return those made."""
    previous = Image.MAX_IMAGE_PIXELS  # Pillow's global: set for this call only
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    # One at a time: a decoded 4K original is ~50 MB, and threads measured no
    # faster on this 2-core machine, so a pool would only multiply the memory.
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit; make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return {name for name, path in todo.items() if _thumb(path, folder / name, px)}
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _thumb(source: Path, dest: Path, px: int) -> bool:
    """Write ``source`` shrunk to ``px`` (long side) to ``dest``; False if it cannot be read."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with Image.open(source, formats=_FORMATS) as original:
            if original.format == "JPEG":
                original.draft("RGB", (px, px))  # decode at 1/2..1/8 scale: far less work
            # Palette images would be shrunk nearest-neighbour: convert them first.
            image = original.convert("RGBA") if original.mode in ("1", "P") else original
            image.thumbnail((px, px))
            webp = dest.suffix == ".webp"
            image = image.convert("RGBA" if webp and "A" in image.getbands() else "RGB")
            image.save(tmp, "WEBP" if webp else "JPEG", quality=80)
        os.replace(tmp, dest)
        return True
    except Exception as exc:  # any undecodable image becomes a placeholder, never a crash
        log.warning("no thumbnail for %s: %s", source, exc)
        tmp.unlink(missing_ok=True)
        return False


def _remove_stale(folder: Path, keep: AbstractSet[str]) -> None:
    """Delete thumbnails no result references, and temporaries an interrupted build left."""
    old = time.time() - 3600  # younger ones may belong to a build running right now
    try:
        for entry in os.scandir(folder):
            stale = _THUMB_NAME.fullmatch(entry.name) is not None and entry.name not in keep
            if stale or (entry.name.endswith(".tmp") and entry.stat().st_mtime < old):
                Path(entry.path).unlink(missing_ok=True)
    except OSError as exc:  # tidying up is optional; the gallery is already written
        log.warning("could not tidy %s: %s", folder, exc)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB" if n >= 1000 else f"{n} B"


def _summary(root: Path) -> str:
    runs = read_runs(root)
    if not runs:
        return '<p class="muted">No run summary (summary.json) yet.</p>'
    run = runs[-1]
    jobs: dict[str, Any] = run["jobs"] if isinstance(run.get("jobs"), dict) else {}
    retries: dict[str, Any] = run["retries"] if isinstance(run.get("retries"), dict) else {}
    causes = ", ".join(f"{n} {cause}" for cause, n in retries.items())
    total = sum(_int(n) for n in retries.values())
    cost, wall = run.get("estimated_cost_usd"), run.get("wall_s")
    written = f"{run.get('images_written', '?')} ({_mb(_int(run.get('bytes_written')))})"
    facts = [
        ("Last run", f"{run.get('start', '?')} → {run.get('end', '?')}".replace("T", " ")),
        ("Wall time", f"{wall:.1f} s" if isinstance(wall, int | float) else "?"),
        ("Jobs", " · ".join(f"{jobs.get(s, 0)} {s}" for s in _STATUSES)),
        ("Requests", run.get("requests", "?")),
        ("Retries", f"{total} ({causes})" if causes else "0"),
        ("Rate-limited (429)", run.get("rate_limited", "?")),
        ("Images written", written),
        ("Est. cost", f"${cost:.2f}" if isinstance(cost, int | float) else "?"),
    ]
    if run.get("stopped"):
        facts.append(("Stopped", f"{run['stopped']}: {run.get('stop_message') or ''}"))
    cells = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in facts)
    return f'<dl class="facts">{cells}</dl>'


def _tile(job: _Job, image: _Image | None, label: str, thumbs: AbstractSet[str], px: int,
          show_model: bool) -> str:
    meta = [*job.meta]
    if image is not None:
        meta += [f"{image.width}×{image.height}" if image.width and image.height else "",
                 _mb(image.size_bytes) if image.size_bytes else ""]
    meta.append(job.model if show_model else "")
    if image is not None and image.thumb in thumbs:
        w, h = image.width or px, image.height or px
        scale = min(1.0, px / max(w, h))  # what thumbnail() makes: the box never shifts
        frame = (f'<img loading="lazy" decoding="async" src="{THUMBS}/{quote(image.thumb or "")}"'
                 f' width="{max(1, round(w * scale))}" height="{max(1, round(h * scale))}"'
                 f' alt="{_e(job.id)}">')
    elif image is not None:
        frame = '<span class="ph">no preview</span>'
    else:
        kind = job.error.get("type") or ("not run yet" if job.status == "pending" else "error")
        frame = f'<span class="ph {job.status}">{_e(job.status)}<small>{_e(kind)}</small></span>'
    if image is not None and image.rel is not None:
        href = _e(quote(image.rel, safe="/"))
        frame = f'<a href="{href}" target="_blank" rel="noopener">{frame}</a>'
    title = f' title="{_e(job.prompt)}"' if len(job.prompt) > 90 else ""  # clamped to 3 lines
    return (f'<figure class="tile" data-status="{job.status}"><div class="frame">{frame}</div>'
            f'<figcaption><b>{_e(job.id)}{_e(label)}</b><p{title}>{_e(job.prompt)}</p>'
            f'<span class="meta">{_e(" · ".join(m for m in meta if m))}</span></figcaption>'
            "</figure>")


def _problem_row(job: _Job) -> str:
    cells = [job.id, job.status, job.attempts, *(job.error.get(k) or "—" for k in _ERROR_KEYS)]
    return f'<tr data-status="{job.status}">{"".join(f"<td>{_e(c)}</td>" for c in cells)}</tr>'


def _page(root: Path, jobs: list[_Job], malformed: int, thumbs: AbstractSet[str],
          px: int) -> str:
    show_model = len({job.model for job in jobs}) > 1
    tiles: list[str] = []
    for job in jobs:
        for n, image in enumerate(job.images or (None,), 1):  # failed/pending: a tile too
            label = f" ({n}/{len(job.images)})" if len(job.images) > 1 else ""
            tiles.append(_tile(job, image, label, thumbs, px, show_model))
    problems = "".join(_problem_row(job) for job in jobs if job.status != "succeeded")
    counts = [("all", len(jobs)), *((s, sum(j.status == s for j in jobs)) for s in _STATUSES)]
    buttons = "".join(
        f'<button type="button" data-filter="{s}" aria-pressed="{str(s == "all").lower()}">'
        f"{s.title()} <span>{n}</span></button>" for s, n in counts
    )
    notes = [f"No results yet: there is no {RESULTS} in this folder."] if not jobs else []
    if malformed:
        notes.append(f"{malformed} malformed line(s) of {RESULTS} were skipped.")
    table = (f'<details id="problems" open><summary>Failed and pending jobs</summary><table>'
             "<thead><tr><th>id</th><th>status</th><th>attempts</th><th>error</th><th>HTTP</th>"
             f"<th>message</th></tr></thead><tbody>{problems}</tbody></table></details>"
             ) if problems else ""
    csp = (f"default-src 'none'; img-src 'self' file:; style-src {_hash(_CSS)}; "
           f"script-src {_hash(_JS)}; base-uri 'none'; form-action 'none'")
    name = _e(root.resolve().name)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>imgbatch · {name}</title><style>{_CSS}</style></head><body><header>"
        f"<h1>imgbatch gallery <small>{name}</small></h1>{_summary(root)}"
        f'{"".join(f"<p class=note>{_e(n)}</p>" for n in notes)}</header><main>{table}'
        f'<div class="bar" role="search">{buttons}<input id="q" type="search" '
        'placeholder="Search prompt or id" aria-label="Search prompt or id">'
        f'<span id="count">{len(tiles)} of {len(tiles)} tiles</span></div>'
        f'<section id="grid">{"".join(tiles)}</section>'
        '<p id="none" class="muted" hidden>Nothing matches.</p>'
        f"</main><script>{_JS}</script></body></html>\n"
    )


def _hash(source: str) -> str:
    """A CSP source for this inline text: nothing injected could run or style the page."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


_CSS = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--mut:#667085;--line:#e3e6eb;--acc:#2f6fed;
--bad:#c8322b;--wait:#b7791f}*{box-sizing:border-box}[hidden]{display:none!important}
body{margin:0;font:14px/1.45 system-ui,sans-serif;background:var(--bg);color:var(--ink)}
header,main{max-width:1600px;margin:0 auto;padding:12px 24px}.muted,#count{color:var(--mut)}
h1{font-size:20px;margin:8px 0 12px}h1 small{color:var(--mut);font-weight:400;margin-left:8px}
.facts{display:flex;flex-wrap:wrap;gap:8px;margin:0}dd{margin:0}a{text-decoration:none}
.facts div,details,.tile{background:var(--card);border:1px solid var(--line);border-radius:8px}
.facts div{padding:8px 12px}dt{font-size:11px;text-transform:uppercase;color:var(--mut)}
.note{background:#fff7e6;border:1px solid #f3d9a4;padding:8px 12px;border-radius:8px}
summary{cursor:pointer;padding:10px 14px;font-weight:600;color:var(--bad)}
table{border-collapse:collapse;width:100%;font-size:13px}td:last-child{word-break:break-word}
th,td{text-align:left;padding:6px 14px;border-top:1px solid var(--line);vertical-align:top}
tr[data-status=failed] td:nth-child(2),.ph.failed{color:var(--bad)}
tr[data-status=pending] td:nth-child(2),.ph.pending{color:var(--wait)}
.bar{position:sticky;top:0;z-index:1;display:flex;flex-wrap:wrap;gap:8px;align-items:center;
padding:10px 0;background:var(--bg)}button span{color:var(--mut)}
button{font:inherit;border:1px solid var(--line);background:var(--card);border-radius:999px;
padding:5px 12px;cursor:pointer}button[aria-pressed=true] span{color:#dbe6ff}
button[aria-pressed=true]{background:var(--acc);border-color:var(--acc);color:#fff}
#q{font:inherit;flex:1;min-width:200px;max-width:420px;padding:6px 12px;
border:1px solid var(--line);border-radius:8px}details{margin-bottom:16px}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:14px}
.tile{margin:0;overflow:hidden;content-visibility:auto;contain-intrinsic-size:auto 320px}
.frame{aspect-ratio:1;background:#eef0f3;display:flex}.frame a{display:flex;flex:1}
.frame img{width:100%;height:100%;object-fit:contain}.meta{font-size:12px;color:var(--mut)}
.ph{margin:auto;text-align:center;color:var(--mut);text-transform:uppercase;font-weight:600}
.ph small{display:block;text-transform:none;font-weight:400}figcaption{padding:8px 10px 10px}
figcaption b{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
figcaption p{margin:4px 0;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;
overflow:hidden}
"""

# Filtering touches only elements whose state changes; texts are read once, on first search.
_JS = """(() => {
  const $ = (s) => document.querySelector(s), all = (s) => [...document.querySelectorAll(s)];
  const box = $("#q"), problems = $("#problems"), tiles = all("#grid .tile");
  const items = tiles.concat(all("#problems tbody tr")), buttons = all("button[data-filter]");
  let want = "all", texts = null, timer = 0;
  function apply() {
    const q = box.value.trim().toLowerCase();
    if (q && !texts) texts = items.map((el) => el.textContent.toLowerCase());
    const shown = [0, 0];
    items.forEach((el, i) => {
      const show = (want === "all" || el.dataset.status === want) && (!q || texts[i].includes(q));
      if (el.hidden === show) el.hidden = !show;
      if (show) shown[i < tiles.length ? 0 : 1]++;
    });
    $("#count").textContent = shown[0] + " of " + tiles.length + " tiles";
    $("#none").hidden = shown[0] > 0;  if (problems) problems.hidden = shown[1] === 0;
  }
  buttons.forEach((b) => b.addEventListener("click", () => {
    want = b.dataset.filter;
    for (const x of buttons) x.setAttribute("aria-pressed", String(x === b));
    apply();
  }));
  box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(apply, 120); });
})();"""
