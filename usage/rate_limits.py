"""Fixed 60-second windows of requests per key (an organisation, or a client address).

One interface, two stores: Redis when REDIS_URL is set (INCR + EXPIRE in one script call), the
database otherwise (one upsert that returns the count). Windows follow the wall clock, since
RateLimit-Reset is a Unix time.
"""

import logging
import time
from dataclasses import dataclass
from functools import cache

import redis
from django.conf import settings
from django.db import connection
from redis.exceptions import NoScriptError

from usage.models import RateCounter

WINDOW_SECONDS = 60
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    limit: int
    count: int
    reset: int  # Unix time the window ends

    @property
    def allowed(self) -> bool:
        return self.count <= self.limit

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)

    def retry_after(self, now: float) -> int:
        return max(1, int(self.reset - now + 0.999))


# INCR, and EXPIRE on the window's first request, as one atomic command (EVALSHA): a redis-py
# pipeline of the two cost about twice the client-side time of one command.
_INCR_EXPIRING = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


class RedisCounter:
    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self._incr = self.client.register_script(_INCR_EXPIRING)

    def incr(self, key: str, window: int) -> int:
        name, ttl = f"ratelimit:{key}:{window}", WINDOW_SECONDS * 2
        try:  # EVALSHA itself: redis-py's Script call around it cost a quarter more client CPU
            return int(self.client.evalsha(self._incr.sha, 1, name, ttl))
        except NoScriptError:  # a Redis that has not seen the script yet, or restarted: load it
            return int(self._incr(keys=[name], args=[ttl]))


class DatabaseCounter:
    def incr(self, key: str, window: int) -> int:
        table = RateCounter._meta.db_table
        sql = (
            f"INSERT INTO {table} (name, slot, count) VALUES (%s, %s, 1) "  # noqa: S608 (our table)
            f"ON CONFLICT (name, slot) DO UPDATE SET count = {table}.count + 1 RETURNING count"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [key, window])
            return cursor.fetchone()[0]


@cache
def _counter():
    return RedisCounter(settings.REDIS_URL) if settings.REDIS_URL else DatabaseCounter()


def hit(key: str, limit: int, now: float | None = None) -> Window:
    """Counts one request for `key` (refused ones too) and returns its window."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_SECONDS)
    try:
        count = _counter().incr(key, window)
    except Exception:  # noqa: BLE001 - a counter store that is down must not stop metering
        # Fail open: credits, holds and concurrency are still enforced by the database; only the
        # per-minute count is lost while the store is down.
        log.exception("rate-limit counter unavailable; allowing %s", key)
        count = 0
    return Window(limit=limit, count=count, reset=(window + 1) * WINDOW_SECONDS)


def forget_old(now: float | None = None) -> int:
    """Deletes database counters of past windows (Redis expires its own)."""
    now = time.time() if now is None else now
    deleted, _ = RateCounter.objects.filter(slot__lt=int(now // WINDOW_SECONDS) - 1).delete()
    return deleted
