"""The naive peer: what a user writes from the provider's notebook, with no extra care.

AsyncOpenAI with its default retries (max_retries=2), an asyncio.Semaphore for
concurrency, one task per job gathered at once, the whole answer parsed by the
SDK, the data URL split at the comma and ``base64.b64decode``d, the bytes
written. No resume, no verification, no rate limiting.

    QINIU_API_KEY=... python bench/peer_naive.py jobs.jsonl --base-url URL \
        --concurrency 16 --out DIR

Reads the same JSONL manifest as imgbatch (``id``, ``prompt``, optional
``aspect_ratio``, ``image_size``, ``model``, and ``images``: local paths beside the
manifest, read and base64-encoded into data URLs as the notebook's editing example
does). Prints one JSON line at the end:
``{"jobs": n, "ok": n, "failed": n, "errors": {"ExceptionName": n}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import sys
from pathlib import Path

from openai import AsyncOpenAI

DEFAULT_MODEL = "gemini-3.0-pro-image-preview"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()

    jobs = [json.loads(line) for line in args.manifest.read_text().splitlines() if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    client = AsyncOpenAI(base_url=args.base_url, api_key=os.environ["QINIU_API_KEY"])
    semaphore = asyncio.Semaphore(args.concurrency)
    errors: collections.Counter[str] = collections.Counter()

    async def generate(job: dict) -> bool:
        async with semaphore:
            try:
                content: str | list[dict] = job["prompt"]
                if job.get("images"):
                    content = [{"type": "text", "text": job["prompt"]}] + [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                         + base64.b64encode((args.manifest.parent / path).read_bytes()).decode()}}
                        for path in job["images"]
                    ]
                response = await client.chat.completions.create(
                    model=job.get("model", args.model),
                    stream=False,
                    messages=[{"role": "user", "content": content}],
                    extra_body={
                        "image_config": {
                            "aspect_ratio": job.get("aspect_ratio", "1:1"),
                            "image_size": job.get("image_size", "1K"),
                        }
                    },
                )
                images = response.choices[0].message.images
                for i, image in enumerate(images):
                    url = image["image_url"]["url"]
                    data = base64.b64decode(url.split(",", 1)[1])
                    name = job["id"] if i == 0 else f"{job['id']}~{i + 1}"
                    (args.out / f"{name}.png").write_bytes(data)
                return True
            except Exception as exc:  # the notebook's "print and move on"
                errors[type(exc).__name__] += 1
                return False

    results = await asyncio.gather(*(generate(job) for job in jobs))
    await client.close()
    ok = sum(results)
    print(json.dumps({"jobs": len(jobs), "ok": ok, "failed": len(jobs) - ok,
                      "errors": dict(errors)}), flush=True)
    return 0 if ok == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
