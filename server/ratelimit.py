"""API rate limits per tenant: a token bucket for each authenticated principal, enforced by a gRPC server
interceptor that runs after authentication (server/auth.py) on the API port.

- A tenant's calls share one bucket of `api_rate_limit` tokens refilled evenly over
  `api_rate_period_seconds` (default 200 a minute, Trove's http_*_rate); `api_rate_burst` may make the
  bucket larger than one period's worth. Every call of the public API takes a token; a call into an empty
  bucket is refused with RESOURCE_EXHAUSTED carrying a google.rpc.RetryInfo (how long until a token is
  back), which the gateway answers as HTTP 429 with Retry-After.
- GetCaller takes no token but is refused with an empty bucket: the REST gateway asks it once per request
  to check the path's tenant, and charging it would halve every tenant's REST rate.
- Admin principals (an admin certificate or an admin token) have their own bucket per tenant with
  `admin_rate_limit` (0: admins are not limited), so an operator can always act on a flooded system.
- The health and reflection services have no principal and are not limited.
- Buckets live in memory, one per tenant that called recently (a full bucket is forgotten): a restart
  hands every tenant a full bucket, which errs on the side of serving.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reddwarf.common.errors import RedDwarfError, ResourceExhausted, Unauthenticated, abort

from .app import Context
from .auth import CallDetails, CheckingInterceptor, Principal, current_principal

if TYPE_CHECKING:
    from .settings import Settings

FREE_METHODS = ("/reddwarf.v1.Catalog/GetCaller",)
UNITS = ((1.0, "SECOND"), (60.0, "MINUTE"), (3600.0, "HOUR"), (86400.0, "DAY"))


def per_unit(limit: int, period: float) -> tuple[int, str]:
    """The rate as Trove shows it, a whole number of calls per unit: 200/60 s → (200, "MINUTE"),
    5/2 s → (150, "MINUTE")."""
    for seconds, unit in UNITS:
        value = limit * seconds / period
        if seconds >= period and value == int(value):
            return int(value), unit
    return math.ceil(limit * 60 / period), "MINUTE"


@dataclass(frozen=True)
class Rate:
    """`limit` calls per `period` seconds, with a bucket of `burst` tokens (limit when 0); limit 0: none."""
    limit: int
    period: float = 60.0
    burst: int = 0

    @property
    def capacity(self) -> float:
        return float(self.burst or self.limit)

    @property
    def per_second(self) -> float:
        return self.limit / self.period


@dataclass(frozen=True)
class RateState:
    """What GetLimits shows: the rate, the whole tokens left and the seconds until the next one."""
    rate: Rate
    remaining: int
    next_in: float


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens, self.stamp = tokens, stamp


class RateLimiter:
    """Token buckets by key; thread-safe (the interceptor runs on the event loop, GetLimits may not)."""

    def __init__(self, tenant: Rate, admin: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenant_rate, self.admin_rate, self.clock = tenant, admin, clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._calls = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        return cls(Rate(settings.api_rate_limit, settings.api_rate_period_seconds, settings.api_rate_burst),
                   Rate(settings.admin_rate_limit, settings.api_rate_period_seconds, settings.admin_rate_limit))

    def key_rate(self, principal: Principal) -> tuple[str, Rate]:
        tenant = principal.tenant_id or principal.identity.uri
        return (f"admin|{tenant}", self.admin_rate) if principal.admin else (f"tenant|{tenant}", self.tenant_rate)

    def _refill(self, key: str, rate: Rate, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(rate.capacity, now)
        else:
            b.tokens = min(rate.capacity, b.tokens + (now - b.stamp) * rate.per_second)
            b.stamp = now
        return b

    def take(self, principal: Principal, cost: float = 1.0) -> float | None:
        """None when the call may go ahead (cost taken), else the seconds until a token is back."""
        key, rate = self.key_rate(principal)
        if rate.limit <= 0:
            return None
        with self._lock:
            now = self.clock()
            self._prune(now)
            b = self._refill(key, rate, now)
            if b.tokens < 1.0:
                return (1.0 - b.tokens) / rate.per_second
            b.tokens -= cost
            return None

    def state(self, principal: Principal) -> RateState | None:
        """The principal's bucket now (None when it is not limited); takes nothing."""
        key, rate = self.key_rate(principal)
        if rate.limit <= 0:
            return None
        with self._lock:
            b = self._refill(key, rate, self.clock())
            tokens = b.tokens
        return RateState(rate, int(tokens), 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate.per_second)

    def _prune(self, now: float) -> None:
        """Every 1024 calls, forget buckets that have refilled: a full bucket is the same as none."""
        self._calls += 1
        if self._calls % 1024:
            return
        for key in [k for k, b in self._buckets.items()
                    if b.tokens + (now - b.stamp) * self._rate_of(k).per_second >= self._rate_of(k).capacity]:
            del self._buckets[key]

    def _rate_of(self, key: str) -> Rate:
        return self.admin_rate if key.startswith("admin|") else self.tenant_rate


class RateLimitInterceptor(CheckingInterceptor):
    """Install after the AuthInterceptor (interceptors=[auth, ratelimit]): it reads the principal auth set."""

    def __init__(self, limiter: RateLimiter) -> None:
        super().__init__()
        self.limiter = limiter

    async def check(self, details: CallDetails, context: Context) -> bool:
        try:
            principal = current_principal(context)
        except Unauthenticated:
            return True  # the open services (health, reflection): no principal, no bucket
        limiter = self.limiter
        wait = limiter.take(principal, 0.0 if details.method in FREE_METHODS else 1.0)
        if wait is None:
            return True
        who = principal.tenant_id or principal.identity.uri
        err: RedDwarfError = ResourceExhausted(
            f"API rate limit of {who}: {limiter.key_rate(principal)[1].limit} calls per "
            f"{limiter.key_rate(principal)[1].period:g} s; retry in {wait:.1f} s", retry_after=wait)
        await abort(context, err)
        return False
