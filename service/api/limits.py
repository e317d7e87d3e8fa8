"""Per-tenant limits kept in the API process: a request-rate token bucket and a cap on open event streams.

Both live in this process's memory, so each API replica enforces them on its own (N replicas let a tenant
have N times the rate and N times the streams); a restart resets them. Route handlers run on worker
threads, hence the locks.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import anyio
from starlette.datastructures import State

from service.settings import Settings


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """One bucket per tenant: `rate_per_s` tokens a second up to `burst`; a request takes one token."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self._buckets: dict[str, _Bucket] = {}  # one per tenant that has a valid token: bounded by tenants
        self._lock = threading.Lock()

    def take(self, tenant: str) -> float:
        """0 if the request may go ahead, else the seconds until a token is free (for Retry-After)."""
        now = time.monotonic()
        with self._lock:
            b = self._buckets.setdefault(tenant, _Bucket(float(self.burst), now))
            b.tokens = min(float(self.burst), b.tokens + (now - b.stamp) * self.rate_per_s)
            b.stamp = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / self.rate_per_s


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


@dataclass
class StreamSlot:
    """One open event stream of one tenant; release() is idempotent (the stream's end and its GC both call it)."""

    slots: StreamSlots
    tenant: str
    _released: bool = field(default=False, init=False)

    def release(self) -> None:
        with self.slots._lock:
            if not self._released:
                self._released = True
                self.slots._open[self.tenant] -= 1
                if not self.slots._open[self.tenant]:
                    del self.slots._open[self.tenant]


class StreamSlots:
    """At most `per_tenant` open event streams per tenant."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> StreamSlot | None:
        with self._lock:
            if self._open.get(tenant, 0) >= self.per_tenant:
                return None
            self._open[tenant] = self._open.get(tenant, 0) + 1
        return StreamSlot(self, tenant)

    def total(self) -> int:
        with self._lock:
            return sum(self._open.values())


def install_limits(state: State, settings: Settings) -> None:
    """Fresh per-process limit state for one app lifespan (called from the lifespan, inside the event loop)."""
    state.rate_limits = TokenBuckets(settings.RATE_LIMIT_PER_S, settings.RATE_LIMIT_BURST)
    state.event_streams = StreamSlots(settings.EVENT_STREAMS_PER_TENANT)
    # The event streams' DB polls run here, not on the default thread pool that serves every sync route.
    state.event_stream_threads = anyio.CapacityLimiter(settings.EVENT_STREAM_DB_THREADS)
