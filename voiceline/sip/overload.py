"""Sans-I/O overload and abuse guard: per-source rate limits, call capacity, scanner drop.

Fed (method, User-Agent, source host, now); answers accept, drop or reject
with 503. Per-source state is a bounded LRU held in memory only; nothing here
logs or stores a source address. `report()` gives aggregate counts at most
once per `report_interval` for a log line.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

# User-Agent substrings of SIP scanners and war-diallers (lower case).
SCANNER_USER_AGENTS = (
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "vaxsipuseragent",
    "sip-scan",
    "sundayddr",
    "pplsip",
)


OTHER_METHODS = "*"  # the bucket key of methods without a rate of their own


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"  # silently: no response at all
    REJECT = "reject"  # a stateless 503 with Retry-After


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `rate` requests per second on average, bursts of up to `burst`."""

    rate: float
    burst: float


@dataclass(frozen=True)
class OverloadLimits:
    # Per source host and method.
    rates: dict[str, RateLimit] = field(
        default_factory=lambda: {
            "INVITE": RateLimit(50.0, 100.0),
            "REGISTER": RateLimit(10.0, 20.0),
            "OPTIONS": RateLimit(20.0, 40.0),
        }
    )
    # Per source host, one bucket shared by every method not in `rates` (ACK, BYE, CANCEL, INFO,
    # UPDATE, and any a stranger makes up): room for a carrier's in-dialog traffic at full call rate.
    other: RateLimit = RateLimit(200.0, 400.0)
    max_calls: int = 500
    retry_after: int = 30
    # At most one 503 per source this often; other over-limit INVITEs are dropped.
    reject_interval: float = 5.0
    scanner_user_agents: tuple[str, ...] = SCANNER_USER_AGENTS
    max_sources: int = 10000
    report_interval: float = 60.0


@dataclass
class OverloadCounters:
    rate_limited: int = 0
    rejected: int = 0  # 503s sent for rate limits
    scanners: int = 0
    over_capacity: int = 0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class OverloadGuard:
    def __init__(self, limits: OverloadLimits) -> None:
        self.limits = limits
        self.counters = OverloadCounters()
        # (source host, method) -> bucket; least recently used first.
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._last_reject: OrderedDict[str, float] = OrderedDict()
        self._reported = OverloadCounters()
        self._next_report = 0.0

    def check(self, method: str, user_agent: str | None, source_host: str, now: float) -> Verdict:
        """Verdict for a request at the transport entry, before any transaction state exists."""
        if user_agent is not None and self._is_scanner(user_agent):
            self.counters.scanners += 1
            return Verdict.DROP
        limit = self.limits.rates.get(method)
        # One key for all other methods, so made-up method names cannot multiply a source's state.
        key = (source_host, method) if limit is not None else (source_host, OTHER_METHODS)
        if self._take(limit or self.limits.other, key, now):
            return Verdict.ACCEPT
        self.counters.rate_limited += 1
        if method == "INVITE" and self._may_reject(source_host, now):
            self.counters.rejected += 1
            return Verdict.REJECT
        return Verdict.DROP

    def admit_call(self, active_calls: int) -> bool:
        """False when a new call would exceed the configured capacity (answer 503 Retry-After)."""
        if active_calls < self.limits.max_calls:
            return True
        self.counters.over_capacity += 1
        return False

    def report(self, now: float) -> dict[str, int] | None:
        """Counts since the last report when any changed and the report interval has passed."""
        if now < self._next_report:
            return None
        current = self.counters
        delta = {
            name: getattr(current, name) - getattr(self._reported, name)
            for name in ("rate_limited", "rejected", "scanners", "over_capacity")
        }
        if not any(delta.values()):
            return None
        self._reported = OverloadCounters(**vars(current))
        self._next_report = now + self.limits.report_interval
        return delta

    @property
    def tracked_sources(self) -> int:
        """Per-source entries held (buckets and 503 times): never more than twice `max_sources`."""
        return len(self._buckets) + len(self._last_reject)

    def _is_scanner(self, user_agent: str) -> bool:
        lowered = user_agent.lower()
        return any(name in lowered for name in self.limits.scanner_user_agents)

    def _take(self, limit: RateLimit, key: tuple[str, str], now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(limit.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.limits.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(limit.burst, bucket.tokens + (now - bucket.updated) * limit.rate)
            bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _may_reject(self, source_host: str, now: float) -> bool:
        last = self._last_reject.get(source_host)
        if last is not None and now - last < self.limits.reject_interval:
            return False
        self._last_reject[source_host] = now
        self._last_reject.move_to_end(source_host)
        while len(self._last_reject) > self.limits.max_sources:
            self._last_reject.popitem(last=False)
        return True
