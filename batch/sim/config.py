"""The simulator's settings: what faults, latency and limits one instance injects.

Apart from :mod:`batch.sim.server` so the CLI can offer ``imgbatch simulate``'s
options without importing the server (aiohttp.web) on every run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace

from batch.sim import batchclock
from batch.sim.batchclock import BatchSimConfig


@dataclass(frozen=True)
class Faults:
    """Probability (0..1, summing to at most 1) that a request gets each fault."""

    rate_limit: float = 0.0
    server_error_json: float = 0.0
    server_error_html: float = 0.0
    server_error_text: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    bad_base64: float = 0.0
    no_image: float = 0.0
    error_200: float = 0.0
    incomplete_image: float = 0.0
    bad_json: float = 0.0  # a 200 whose body is not JSON at all

    def __post_init__(self) -> None:
        for name in self.names():
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"fault {name}: probability must be within 0..1")
        if self.total() > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities sum to {self.total():g}, more than 1")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def mix(cls, total: float) -> Faults:
        """``total`` spread evenly over every fault but ``bad_json``."""
        # bad_json came later: left out, so that --fault-mix P means what it always did.
        names = [name for name in cls.names() if name != "bad_json"]
        return cls(**{name: total / len(names) for name in names})

    def total(self) -> float:
        return sum(float(getattr(self, name)) for name in self.names())

    def pick(self, draw: float) -> tuple[str, float] | None:
        """The fault a uniform draw in [0, 1) lands on, and where in its share (0..1)."""
        low = 0.0
        for name in self.names():
            p = float(getattr(self, name))
            if p > 0.0 and draw < low + p:
                return name, (draw - low) / p
            low += p
        return None


@dataclass(frozen=True)
class SimConfig:
    """Everything one simulator instance does; see ``add_arguments`` for the meanings."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None  # None: any non-empty bearer key is accepted
    scale: float = 1.0
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0  # plus uniform(0, jitter)
    faults: Faults = field(default_factory=Faults)
    fault_attempts: int = 1  # faults hit the first N requests of each prompt; 0 = all
    seed: int | None = None
    rpm_limit: int = 0
    rate_window_s: float = 60.0
    retry_after_s: float = 1.0
    quota_headers: bool = False  # a spent --rpm-limit window says so in x-ratelimit-* headers
    payload_bytes: int = 0
    images_per_response: int = 1
    escape_slashes: bool = False
    gzip: bool = False
    jpeg_lie: float = 0.0
    refuse_prompt: str = ""  # refuse (400, content policy) prompts containing this text
    daily_quota: int = 0  # answers before every request meets a per-day quota; 0 = none
    block_word: str = ""  # prompts holding it are refused by the safety system
    batch: BatchSimConfig = field(default_factory=BatchSimConfig)  # the batch APIs

    def __post_init__(self) -> None:
        if self.scale <= 0 or self.rate_window_s <= 0 or self.retry_after_s <= 0:
            raise ValueError("scale, rate_window_s and retry_after_s must be positive")
        if min(self.latency_s, self.latency_jitter_s, self.payload_bytes) < 0:
            raise ValueError("latency, jitter and payload_bytes must not be negative")
        if self.fault_attempts < 0 or self.rpm_limit < 0 or self.images_per_response < 1 \
                or self.daily_quota < 0:
            raise ValueError("fault_attempts, rpm_limit, daily_quota >= 0 and "
                             "images_per_response >= 1")
        if not 0.0 <= self.jpeg_lie <= 1.0:
            raise ValueError("jpeg_lie must be within 0..1")


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be within 0..1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    add("--port", type=int, default=8765, help="port; 0 picks a free one (default: 8765)")
    add("--api-key", help="require exactly this bearer key (default: any non-empty key)")
    add("--scale", type=float, default=1.0, help="multiply image sides, e.g. 0.0625")
    add("--latency", type=float, default=0.0, metavar="S", help="seconds before answering")
    add("--latency-jitter", type=float, default=0.0, metavar="S", help="plus up to S seconds")
    for name in Faults.names():
        add(f"--fault-{name.replace('_', '-')}", dest=f"fault_{name}", type=_probability,
            metavar="P", help=f"probability of the {name} fault")
    add("--fault-mix", type=_probability, default=0.0, metavar="P",
        help="total fault probability spread evenly; --fault-* flags override their share")
    add("--fault-attempts", type=int, default=1, metavar="N",
        help="faults hit only the first N requests of each prompt; 0 = every request")
    add("--seed", type=int, help="seed the fault and latency draws")
    add("--rpm-limit", type=int, default=0, metavar="N", help="requests per window, 0 = off")
    add("--rate-window", type=float, default=60.0, metavar="S", help="rate window (60 s)")
    add("--retry-after", type=float, default=1.0, metavar="S", help="Retry-After of 429 faults")
    add("--quota-headers", action="store_true",
        help="a 429 of the --rpm-limit window says x-ratelimit-remaining-requests: 0 (OpenAI's "
             "headers; Gemini always names its quota in the body)")
    add("--payload-bytes", type=int, default=0, metavar="N", help="pad each PNG to ~N bytes")
    add("--images-per-response", type=int, default=1, metavar="N")
    add("--escape-slashes", action="store_true", help='write "\\/" for every "/" in JSON')
    add("--gzip", action="store_true", help="gzip bodies when the client accepts it")
    add("--jpeg-lie", type=_probability, default=0.0, metavar="P",
        help="probability of sending JPEG bytes labelled image/png")
    add("--refuse-prompt", default="", metavar="TEXT",
        help="refuse prompts containing TEXT (any case) with a 400 content-policy error")
    add("--daily-quota", type=int, default=0, metavar="N",
        help="after N images every request meets a per-day quota (Gemini: QuotaFailure "
             "...PerDay...; OpenAI: insufficient_quota); 0 = none")
    add("--block-word", default="", metavar="WORD",
        help="refuse prompts holding WORD as the provider's safety system does")
    batchclock.add_arguments(parser)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Raises ValueError when the options contradict each other (faults summing over 1)."""
    given = {n: getattr(args, f"fault_{n}") for n in Faults.names()}
    given = {n: p for n, p in given.items() if p is not None}
    faults = replace(Faults.mix(args.fault_mix), **given)
    return SimConfig(
        host=args.host, port=args.port, api_key=args.api_key, scale=args.scale,
        latency_s=args.latency, latency_jitter_s=args.latency_jitter, faults=faults,
        fault_attempts=args.fault_attempts, seed=args.seed, rpm_limit=args.rpm_limit,
        rate_window_s=args.rate_window, retry_after_s=args.retry_after,
        quota_headers=args.quota_headers,
        payload_bytes=args.payload_bytes, images_per_response=args.images_per_response,
        escape_slashes=args.escape_slashes, gzip=args.gzip, jpeg_lie=args.jpeg_lie,
        refuse_prompt=args.refuse_prompt,
        daily_quota=args.daily_quota, block_word=args.block_word,
        batch=batchclock.config_from_args(args),
    )
