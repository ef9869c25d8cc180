"""What a crash left in an ``s3://`` output: recorded images still under staging keys.

A success is recorded before its image is copied from its staging key to its
final key, so an open finds records whose final key is missing while the
staging key is there, and copies it. Only the lease holder then deletes the
staging keys nobody needs and aborts multipart uploads left under the prefix
(:meth:`batch.storage.s3state.S3State._recover`); a shard writer, which holds
no lease, publishes and never deletes: other shards' staging keys are live.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from batch.checkpoint import JobState
from batch.errors import StorageError
from batch.jobs import Status
from batch.storage import s3client
from batch.storage.s3client import S3Location, describe
from batch.storage.s3images import S3Images

log = logging.getLogger(__name__)


def publish_recorded(states: Iterable[JobState], objects: dict[str, int], staged: set[str],
                     sink: S3Images, *, tolerant: bool) -> set[str]:
    """Copy each recorded success's image that is only under its staging key (in
    ``staged``) to its final key; the ids of successes now wholly published.

    ``objects`` (published rel -> size) is updated. ``tolerant``: a failed copy
    leaves the job not published instead of raising (a shard writer racing
    another shard's own publication, which deletes the staging key).
    """
    intact: set[str] = set()
    for state in states:
        if state.status is not Status.SUCCEEDED:
            continue
        whole = True
        for image, meta in zip(state.images, state.image_meta, strict=True):
            if objects.get(image.path) == image.bytes:
                continue
            if meta.tmp and meta.tmp in staged:
                try:
                    sink.copy_to_final(meta.tmp, image.path)
                except StorageError as exc:
                    if not tolerant:
                        raise
                    log.warning("%s (left for the driver's clean-up)", exc)
                    whole = False
                    continue
                objects[image.path] = image.bytes
                log.info("recovered %s from an interrupted run", image.path)
                continue
            whole = False
        if whole:
            intact.add(state.id)
    return intact


def abort_uploads(location: S3Location) -> None:
    """Abort every multipart upload in progress under the output (a killed run's)."""
    try:
        uploads = s3client.incomplete_uploads(location, location.key(""))
        for key, upload_id in uploads:
            s3client.abort_upload(location, key, upload_id)
            log.info("aborted an incomplete multipart upload of %s", key)
    except OSError as exc:
        log.warning("could not abort incomplete multipart uploads under %s (%s); a "
                    "lifecycle rule removes them", location.url, describe(exc))
