"""Talking to an S3 bucket: where an ``s3://`` output is, the obstore client, what it lacks.

obstore (Rust's object_store) does the object work: create-only puts
(``If-None-Match: *``), conditional updates (``If-Match``), multipart uploads
streamed from a file, copy-if-not-exists (a one-part multipart copy
completed with ``If-None-Match``), listings, ranged gets, and retries with
backoff on 5xx, 429 and resets. It has no call to list or abort the
multipart uploads a killed run leaves behind, so those two requests are
signed here (AWS Signature V4) and sent with urllib.

Credentials and region come from the usual AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``); the endpoint from
``--s3-endpoint`` or ``AWS_ENDPOINT_URL`` (Qiniu Kodo:
``https://s3.<region>.qiniucs.com``; plain ``http://`` is allowed).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from batch.errors import OutputError, UsageError

SCHEME = "s3://"
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def is_s3_url(text: str) -> bool:
    return text.startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` and how to reach it."""

    bucket: str
    prefix: str  # without leading or trailing "/"; may be empty
    endpoint: str | None = None
    region: str = "us-east-1"

    @staticmethod
    def parse(url: str, endpoint: str | None = None,
              env: Mapping[str, str] | None = None) -> S3Location:
        """Parse ``s3://bucket/prefix``; UsageError naming what is wrong."""
        env = os.environ if env is None else env
        if not is_s3_url(url):
            raise UsageError(f"{url}: not an s3:// URL")
        bucket, _, prefix = url[len(SCHEME):].partition("/")
        if not bucket:
            raise UsageError(f"{url}: no bucket name after s3://")
        prefix = prefix.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise UsageError(f"{url}: the prefix has an empty, '.' or '..' segment")
        endpoint = endpoint or env.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
            raise UsageError(f"--s3-endpoint {endpoint}: must start with http:// or https://")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        return S3Location(bucket, prefix, endpoint.rstrip("/") if endpoint else None, region)

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, rel: str) -> str:
        """The object key of ``rel`` (a path relative to the output)."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str:
        """The inverse of :meth:`key`."""
        return key[len(self.prefix) + 1:] if self.prefix else key


def require_obstore() -> None:
    """UsageError unless the ``s3`` extra is installed (checked before any s3:// work)."""
    try:
        import obstore  # noqa: F401
    except ImportError:
        raise UsageError("s3:// outputs need obstore: pip install 'imgbatch[s3]'") from None


def open_store(location: S3Location, *, max_retries: int = 8, retry_timeout_s: float = 120.0,
               timeout_s: float = 120.0) -> Any:
    """The obstore S3Store of ``location`` (credentials from the environment).

    The lease uses one of its own whose calls end well within its TTL.
    """
    try:
        from obstore.store import S3Store
    except ImportError:
        raise UsageError("s3:// outputs need obstore: pip install 'imgbatch[s3]'") from None
    client: Any = {"connect_timeout": f"{int(min(10.0, timeout_s) * 1000)}ms",
                   "timeout": f"{int(timeout_s * 1000)}ms"}
    config: Any = {"region": location.region, "copy_if_not_exists": "multipart",
                              "conditional_put": "etag"}
    if location.endpoint is not None:
        config["endpoint"] = location.endpoint
        if location.endpoint.startswith("http://"):
            client["allow_http"] = True
    retry: Any = {"max_retries": max_retries,
             "retry_timeout": datetime.timedelta(seconds=retry_timeout_s),
             "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                         "max_backoff": datetime.timedelta(seconds=8), "base": 2}}
    try:
        return S3Store(location.bucket, config=config, client_options=client,
                       retry_config=retry)
    except Exception as exc:  # obstore's configuration errors
        raise OutputError(f"{location.url}: {exc}") from None


# -- the two requests obstore does not make ---------------------------------------


def _sign(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signed_request(location: S3Location, method: str, key: str | None,
                   query: Mapping[str, str], env: Mapping[str, str] | None = None,
                   now: datetime.datetime | None = None) -> urllib.request.Request:
    """A path-style request to the bucket (or ``key`` in it), signed with SigV4."""
    env = os.environ if env is None else env
    endpoint = location.endpoint or f"https://s3.{location.region}.amazonaws.com"
    parts = urlsplit(endpoint)
    path = f"{parts.path.rstrip('/')}/{quote(location.bucket)}"
    if key is not None:
        path += "/" + quote(key, safe="/~")
    canonical_query = "&".join(
        f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in sorted(query.items())
    )
    when = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    payload = hashlib.sha256(b"").hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload, "x-amz-date": when}
    token = env.get("AWS_SESSION_TOKEN")
    if token:
        headers["x-amz-security-token"] = token
    names = ";".join(sorted(headers))
    canonical = "\n".join([
        method, path, canonical_query,
        "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), names, payload,
    ])
    scope = f"{when[:8]}/{location.region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", when, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    secret = env.get("AWS_SECRET_ACCESS_KEY", "")
    signing = _sign(_sign(_sign(_sign(f"AWS4{secret}".encode(), when[:8]), location.region),
                          "s3"), "aws4_request")
    signature = hmac.new(signing, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={env.get('AWS_ACCESS_KEY_ID', '')}/{scope}, "
        f"SignedHeaders={names}, Signature={signature}"
    )
    url = f"{parts.scheme}://{parts.netloc}{path}" + (f"?{canonical_query}" if query else "")
    return urllib.request.Request(url, method=method, headers=headers)


def incomplete_uploads(location: S3Location, prefix: str) -> list[tuple[str, str]]:
    """(key, upload id) of every multipart upload in progress under ``prefix``."""
    found: list[tuple[str, str]] = []
    query = {"uploads": "", "prefix": prefix}
    while True:
        body = _send(location, "GET", None, query)
        root = ET.fromstring(body)
        for upload in root.iter(f"{_NS}Upload"):
            key = upload.findtext(f"{_NS}Key")
            upload_id = upload.findtext(f"{_NS}UploadId")
            if key and upload_id:
                found.append((key, upload_id))
        if root.findtext(f"{_NS}IsTruncated") != "true":
            return found
        query = {**query, "key-marker": root.findtext(f"{_NS}NextKeyMarker") or "",
                 "upload-id-marker": root.findtext(f"{_NS}NextUploadIdMarker") or ""}


def abort_upload(location: S3Location, key: str, upload_id: str) -> None:
    _send(location, "DELETE", key, {"uploadId": upload_id})


def _send(location: S3Location, method: str, key: str | None,
          query: Mapping[str, str]) -> bytes:
    request = signed_request(location, method, key, query)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as exc:
        if method == "DELETE" and exc.code == 404:  # already gone
            return b""
        detail = exc.read(2000).decode("utf-8", "replace")
        raise OSError(f"{method} {location.url}: HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, TimeoutError, ET.ParseError) as exc:
        raise OSError(f"{method} {location.url}: {exc}") from None


def describe(exc: BaseException) -> str:
    """obstore's error in one line: what was asked, the status, the server's code and message.

    Its own text runs to dozens of lines (a Rust debug dump, the XML body).
    """
    text = str(exc).split("\n", 1)[0]
    head = text.partition(": <?xml")[0]
    rest = str(exc)
    code = _between(rest, "<Code>", "</Code>")
    message = _between(rest, "<Message>", "</Message>")
    if code or message:
        head += f" ({code}: {message})" if code and message else f" ({code or message})"
    return head or type(exc).__name__


def _between(text: str, start: str, end: str) -> str:
    left = text.find(start)
    if left < 0:
        return ""
    right = text.find(end, left)
    return text[left + len(start):right] if right > 0 else ""
