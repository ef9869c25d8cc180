"""Default prices of the native providers' models, and how a job finds its row.

Gemini models are priced by image size (1K, 2K, 4K); gpt-image by quality and
pixel size, keyed ``quality/WIDTHxHEIGHT`` ("low/1024x1024"). Published list
prices (late 2026): Google's $0.134 per 1K/2K and $0.24 per 4K image for Gemini 3
Pro Image, $0.039 for Gemini 2.5 Flash Image; OpenAI's per-image table for
gpt-image-1, gpt-image-1-mini and gpt-image-1.5. A manifest's ``pricing:``
overrides any of them.
"""

from __future__ import annotations

from collections.abc import Mapping

from batch.endpoints import OPENAI_SIZES
from batch.jobs import Job

SQUARE, WIDE, TALL = "1024x1024", "1536x1024", "1024x1536"


def _gpt_image(square: tuple[float, float, float],
               oblong: tuple[float, float, float]) -> dict[str, float]:
    rows = {}
    for quality, flat, other in zip(("low", "medium", "high"), square, oblong, strict=True):
        rows[f"{quality}/{SQUARE}"] = flat
        rows[f"{quality}/{WIDE}"] = rows[f"{quality}/{TALL}"] = other
    return rows


NATIVE_PRICES: Mapping[str, Mapping[str, float]] = {
    "gemini-3-pro-image-preview": {"1K": 0.134, "2K": 0.134, "4K": 0.24},
    "gemini-3-pro-image": {"1K": 0.134, "2K": 0.134, "4K": 0.24},
    "gemini-2.5-flash-image": {"1K": 0.039},
    "gpt-image-1": _gpt_image((0.011, 0.042, 0.167), (0.016, 0.063, 0.25)),
    "gpt-image-1-mini": _gpt_image((0.005, 0.011, 0.036), (0.006, 0.015, 0.052)),
    "gpt-image-1.5": _gpt_image((0.009, 0.034, 0.133), (0.013, 0.05, 0.2)),
}


def price_key(job: Job) -> str:
    """The column of ``job``'s price row: its image size, or gpt-image's quality/size.

    Quality "auto" (the API's default) is priced as "high", so a --max-cost cap
    holds whatever the model picks.
    """
    if not job.model.startswith("gpt-image"):
        return job.image_size
    quality = job.options.get("quality", "auto")
    size = OPENAI_SIZES.get(job.aspect_ratio, SQUARE)
    return f"{'high' if quality == 'auto' else quality}/{size}"
