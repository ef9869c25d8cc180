"""What images cost, and the budget that keeps a run from spending past ``--max-cost``.

Prices are per generated image, by model and size. The defaults are the
published list prices for Gemini 3 Pro Image ($0.134 per 1K/2K image, $0.24
per 4K); a manifest's ``pricing:`` overrides or extends them. A model with no
price costs "unknown", which the report says rather than guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from batch.jobs import Job
from batch.pricing import NATIVE_PRICES, price_key

DEFAULT_PRICES: Mapping[str, Mapping[str, float]] = {
    "gemini-3.0-pro-image-preview": {"1K": 0.134, "2K": 0.134, "4K": 0.24},
    "google/gemini-3-pro-image-preview": {"1K": 0.134, "2K": 0.134, "4K": 0.24},
    "gemini-2.5-flash-image": {"1K": 0.039},
    **NATIVE_PRICES,
}


@dataclass(frozen=True)
class PriceTable:
    """USD per image by model, then image size."""

    prices: Mapping[str, Mapping[str, float]]

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, Mapping[str, float]]) -> PriceTable:
        merged = {model: dict(sizes) for model, sizes in DEFAULT_PRICES.items()}
        for model, sizes in overrides.items():
            merged.setdefault(model, {}).update(sizes)
        return cls(merged)

    def price(self, model: str, image_size: str) -> float | None:
        """USD for one image, or None if the table does not know it."""
        return self.prices.get(model, {}).get(image_size)

    def job_price(self, job: Job) -> float | None:
        return self.price(job.model, price_key(job))


def estimate(jobs: list[Job] | tuple[Job, ...], table: PriceTable) -> tuple[float, int]:
    """Cost of one image per job, and how many jobs have no known price."""
    total = 0.0
    unknown = 0
    for job in jobs:
        price = table.job_price(job)
        if price is None:
            unknown += 1
        else:
            total += price
    return total, unknown


class Budget:
    """Spend so far plus what requests in flight may still cost, against a cap.

    A request reserves its price before it starts and settles when it ends:
    spent if it produced images, released otherwise. So no request starts
    that could push the spend past the cap, even with many in flight.
    """

    def __init__(self, cap_usd: float | None) -> None:
        self.cap_usd = cap_usd
        self.spent_usd = 0.0
        self.reserved_usd = 0.0

    def try_reserve(self, price_usd: float) -> bool:
        if self.cap_usd is not None and (
            self.spent_usd + self.reserved_usd + price_usd > self.cap_usd + 1e-9
        ):
            return False
        self.reserved_usd += price_usd
        return True

    def settle(self, reserved_usd: float, spent_usd: float) -> None:
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
        self.spent_usd += spent_usd
