"""What images cost, and the budget that keeps a run from spending past ``--max-cost``.

Prices are per generated image, by model and size. The defaults are the
published list prices for Gemini 3 Pro Image ($0.134 per 1K/2K image, $0.24
per 4K); a manifest's ``pricing:`` overrides or extends them. A model with no
price costs "unknown", which the report says rather than guessing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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

    def job_micros(self, job: Job) -> int | None:
        """One image of ``job`` in micro-dollars, or None if unknown."""
        price = self.job_price(job)
        return None if price is None else to_micros(price)


def estimate(jobs: Iterable[Job], table: PriceTable) -> tuple[float, int]:
    """Cost of one image per job, and how many jobs have no known price."""
    return estimate_weighted(((job, 1) for job in jobs), table)


def estimate_weighted(jobs: Iterable[tuple[Job, int]], table: PriceTable) -> tuple[float, int]:
    """Like :func:`estimate` over (job, how many jobs like it): a manifest's shapes."""
    total = 0.0
    unknown = 0
    for job, count in jobs:
        price = table.job_price(job)
        if price is None:
            unknown += count
        else:
            total += price * count
    return total, unknown


MICROS_PER_USD = 1_000_000


def to_micros(usd: float) -> int:
    """USD as whole micro-dollars: sums of them are exact, unlike sums of floats."""
    return round(usd * MICROS_PER_USD)


def to_usd(micros: int) -> float:
    return micros / MICROS_PER_USD


class Budget:
    """Spend so far plus what requests in flight may still cost, against a cap.

    Money is counted in integer micro-dollars, so spent + reserved is exact
    and "nothing can start" needs no epsilon. A request reserves its price
    (one image) before it starts and settles when it ends: spent if it
    produced images (price x images), released otherwise. So no request
    starts that could push the spend past the cap, even with many in flight.
    An answer with several images spends more than it reserved: the cap can
    then be passed by the extra images of the requests in flight, and the
    engine stops once it is reached.
    """

    def __init__(self, cap_usd: float | None) -> None:
        self.cap = None if cap_usd is None else to_micros(cap_usd)
        self.spent = 0
        self.reserved = 0

    @property
    def cap_usd(self) -> float | None:
        return None if self.cap is None else to_usd(self.cap)

    @property
    def spent_usd(self) -> float:
        return to_usd(self.spent)

    @property
    def reserved_usd(self) -> float:
        return to_usd(self.reserved)

    def could_ever_fit(self, price: int) -> bool:
        """Could a request of ``price`` start once every request in flight has ended?"""
        return self.cap is None or self.spent + price <= self.cap

    def try_reserve(self, price: int) -> bool:
        """Reserve ``price`` if it fits beside the spend and the other reservations."""
        if self.cap is not None and self.spent + self.reserved + price > self.cap:
            return False
        self.reserved += price
        return True

    def settle(self, reserved: int, spent: int) -> None:
        """A request that reserved ``reserved`` ended, having cost ``spent``."""
        assert 0 <= reserved <= self.reserved, (reserved, self.reserved)
        self.reserved -= reserved
        self.spent += spent
