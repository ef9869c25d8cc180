"""From an ``--output`` argument to a state store: a local folder, or ``s3://bucket/prefix``.

The one place that tells the two apart; everything after it goes through
:mod:`batch.storage.base`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from batch.storage import s3client
from batch.storage.base import StateStore
from batch.storage.s3client import S3Location, is_s3_url

if TYPE_CHECKING:
    from batch.gallery import GalleryStats

__all__ = ["build_s3_gallery", "is_s3_url", "open_s3", "read_s3"]


def open_s3(url: str, endpoint: str | None) -> StateStore:
    """The state of ``url`` under its lease (LockHeld if another run holds it)."""
    from batch.storage.s3state import S3State

    return S3State.open(S3Location.parse(url, endpoint))


def read_s3(url: str, endpoint: str | None) -> StateStore:
    """The state of ``url``, read without the lease (``status``)."""
    from batch.storage.s3state import S3State

    return S3State.read(S3Location.parse(url, endpoint))


def build_s3_gallery(url: str, endpoint: str | None) -> GalleryStats:
    """Rebuild ``url``/index.html and its thumbnails in a local folder, then upload them.

    Only images whose thumbnail is not in the bucket yet are downloaded (to
    disk, streamed). The page links ``images/...`` and ``thumbs/...``
    relatively, so it works wherever the prefix is served over HTTP.
    """
    s3client.require_obstore()
    import obstore
    from PIL import features

    from batch import gallery
    from batch.results import RESULTS
    from batch.storage.s3state import S3State

    location = S3Location.parse(url, endpoint)
    state = S3State.read(location)
    try:
        store = state._store
        root: Path = state.root
        state._download([RESULTS])
        thumbs = root / gallery.THUMBS
        thumbs.mkdir(exist_ok=True)
        present = {meta["path"].rsplit("/", 1)[-1]: meta["path"]
                   for batch in obstore.list(store, location.key(gallery.THUMBS) + "/")
                   for meta in batch}
        ext = "webp" if features.check("webp") else "jpg"
        jobs, _ = gallery._read_jobs(root, ext)
        for job in jobs:
            for image in job.images:
                if not image.thumb or not image.rel:
                    continue
                if image.thumb in present:
                    _download(store, present[image.thumb], thumbs / image.thumb)
                else:
                    _download(store, location.key(image.rel), root / image.rel)
        stats = gallery.build_gallery(root)
        obstore.put(store, location.key(gallery.INDEX), root / gallery.INDEX,
                    attributes={"Content-Type": "text/html; charset=utf-8"})
        made = {path.name for path in thumbs.iterdir()}
        for name in made - present.keys():
            obstore.put(store, location.key(f"{gallery.THUMBS}/{name}"), thumbs / name)
        for name in present.keys() - made:  # stale: the gallery dropped them
            obstore.delete(store, present[name])
        return stats
    finally:
        state.close()


def _download(store: object, key: str, path: Path) -> None:
    import obstore

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("wb") as handle:
            for chunk in obstore.get(store, key).stream():  # type: ignore[arg-type]
                handle.write(chunk)
    except FileNotFoundError:
        path.unlink(missing_ok=True)
