"""The outbox on Redis Streams, for several replicas that share no disk: the same states, leases and
at-least-once delivery as the SQLite :class:`service.fallback.outbox.Outbox`, in one Redis that every
replica reaches (``fallback_redis_url``).

Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync always``, so that a write is
in the append-only file, fsynced, before Redis answers it and so before :meth:`RedisOutbox.enqueue`
returns (with ``everysec`` a crash of Redis or of its machine can lose the last second of items).
Replication to a Redis replica is asynchronous: a failover may lose the last acknowledged writes.

The structures, all under one key prefix (``predgate:fallback:`` by default), and why each exists:

``item:<key>`` (hash)
    The item itself: ``state`` (pending / delivered / dead), ``attempts``, ``created_at``,
    ``next_attempt_at``, ``last_error``, ``meta`` (JSON), ``image``, ``image_type``, and ``entry``, the
    id of the stream entry that stands for it while it is on the work queue (empty otherwise). A
    delivered item keeps its record but loses its image (memory is the store here), so
    :meth:`RedisOutbox.item` answers ``b""`` for the image of a delivered item.
``stream`` (stream) and its consumer group ``delivery``
    The work queue. Every replica's delivery thread is a consumer of the one group: ``XREADGROUP``
    hands each new entry to exactly one of them and records it in the group's pending entries list
    with the time it was handed over. That list is the lease: an entry nobody acknowledged for
    ``lease_s`` (its worker was killed, ``kill -9`` included, or hangs) is taken over by another
    replica's ``XAUTOCLAIM`` with that minimum idle time, which is what makes the death of a replica
    lose nothing. Entries are acknowledged and deleted when their item is delivered, fails or dies,
    so the stream holds only the items waiting or in flight.
``delayed`` (sorted set, score = time of the next attempt)
    Items waiting out a retry's backoff. A claim first moves the due ones back onto the stream, in the
    same script, so none is lost or doubled between the two.
``pending`` (sorted set, score = created_at)
    Every pending item, on the stream or delayed: its size is the pending count and its lowest score
    the age of the oldest pending item, without walking the stream.
``delivered`` (sorted set, score = delivered_at) and ``dead`` (sorted set, score = created_at)
    The delivered count, and the dead items for :meth:`RedisOutbox.dead_items` (oldest first) and
    :meth:`RedisOutbox.requeue_dead`.

Every change of state is one Lua script, which Redis runs atomically: an enqueue stores all the
items of a request or none, and ``delivered`` / ``failed`` act only on an item that is still pending,
so a late duplicate worker (whose lease had expired and whose item was delivered by another replica
meanwhile) can neither bring a delivered or dead item back nor count it twice. The scripts name their
keys from the prefix, so this store needs one Redis (or a primary and its replicas), not Redis Cluster.

Leases: a lease is measured by Redis's clock (the idle time of a stream entry), and its length is the
one the worker that takes an entry over asks for (``XAUTOCLAIM``'s minimum idle time), so replicas that
share an outbox must share ``fallback_lease_s``. Retry times are measured by the clock of the replica
that schedules them, so replicas should keep their clocks in step (NTP).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from models.errors import ConfigError
from service.fallback.outbox import Claimed, NewItem, OutboxCounts

DEFAULT_PREFIX = "predgate:fallback:"
GROUP = "delivery"
STALE_CONSUMER_MS = 24 * 3600 * 1000
"""A consumer (a replica that has gone) idle this long and holding nothing is forgotten at start-up."""

# ARGV: prefix, now, then (key, meta, image, image_type) per item
_ENQUEUE = """
local p, now = ARGV[1], ARGV[2]
for i = 3, #ARGV, 4 do
  local key = ARGV[i]
  local id = redis.call('XADD', p .. 'stream', '*', 'key', key)
  redis.call('HSET', p .. 'item:' .. key, 'created_at', now, 'state', 'pending', 'attempts', 0,
    'next_attempt_at', now, 'meta', ARGV[i + 1], 'image', ARGV[i + 2], 'image_type', ARGV[i + 3], 'entry', id)
  redis.call('ZADD', p .. 'pending', now, key)
end
return (#ARGV - 2) / 4
"""

# ARGV: prefix, group, consumer, limit, lease in ms, now
_CLAIM = """
local p, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local limit, lease_ms, now = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local stream = p .. 'stream'
for _, key in ipairs(redis.call('ZRANGEBYSCORE', p .. 'delayed', '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', p .. 'delayed', key)
  if redis.call('HGET', p .. 'item:' .. key, 'state') == 'pending' then
    local id = redis.call('XADD', stream, '*', 'key', key)
    redis.call('HSET', p .. 'item:' .. key, 'entry', id, 'next_attempt_at', now)
  end
end
local entries = {}
local cursor = '0-0'
repeat
  local r = redis.call('XAUTOCLAIM', stream, group, consumer, lease_ms, cursor, 'COUNT', limit - #entries)
  cursor = r[1]
  for _, e in ipairs(r[2]) do table.insert(entries, e) end
until cursor == '0-0' or #entries >= limit
if #entries < limit then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', limit - #entries,
    'STREAMS', stream, '>')
  if r then
    for _, e in ipairs(r[1][2]) do table.insert(entries, e) end
  end
end
local out = {}
for _, e in ipairs(entries) do
  local id, fields = e[1], e[2]
  local h = false
  if fields and fields[2] then
    h = redis.call('HMGET', p .. 'item:' .. fields[2], 'state', 'entry', 'created_at', 'attempts', 'meta',
      'image', 'image_type')
  end
  if h and h[1] == 'pending' and h[2] == id then
    table.insert(out, {fields[2], h[3], h[4], h[5], h[6], h[7]})
  else  -- an entry that no longer stands for a pending item (defensive: transitions delete theirs)
    redis.call('XACK', stream, group, id)
    redis.call('XDEL', stream, id)
  end
end
return out
"""

# the first lines of delivered and failed: only a pending item changes; its stream entry goes
_LEAVE_STREAM = """
local p, group, key = ARGV[1], ARGV[2], ARGV[3]
local item = p .. 'item:' .. key
local h = redis.call('HMGET', item, 'state', 'entry', 'created_at')
if h[1] ~= 'pending' then return 0 end
if h[2] and h[2] ~= '' then
  redis.call('XACK', p .. 'stream', group, h[2])
  redis.call('XDEL', p .. 'stream', h[2])
end
redis.call('HINCRBY', item, 'attempts', 1)
redis.call('ZREM', p .. 'delayed', key)
"""

# ARGV: prefix, group, key, now
_DELIVERED = (
    _LEAVE_STREAM
    + """
redis.call('HSET', item, 'state', 'delivered', 'delivered_at', ARGV[4], 'entry', '')
redis.call('HDEL', item, 'image')
redis.call('ZREM', p .. 'pending', key)
redis.call('ZADD', p .. 'delivered', ARGV[4], key)
return 1
"""
)

# ARGV: prefix, group, key, error, retry_at ('' = dead)
_FAILED = (
    _LEAVE_STREAM
    + """
redis.call('HSET', item, 'last_error', ARGV[4], 'entry', '')
if ARGV[5] == '' then
  redis.call('HSET', item, 'state', 'dead')
  redis.call('ZREM', p .. 'pending', key)
  redis.call('ZADD', p .. 'dead', h[3], key)
else
  redis.call('HSET', item, 'next_attempt_at', ARGV[5])
  redis.call('ZADD', p .. 'delayed', ARGV[5], key)
end
return 1
"""
)

# ARGV: prefix, now
_REQUEUE = """
local p, now = ARGV[1], ARGV[2]
local dead = redis.call('ZRANGE', p .. 'dead', 0, -1, 'WITHSCORES')
for i = 1, #dead, 2 do
  local key, created = dead[i], dead[i + 1]
  local id = redis.call('XADD', p .. 'stream', '*', 'key', key)
  redis.call('HSET', p .. 'item:' .. key, 'state', 'pending', 'attempts', 0, 'next_attempt_at', now,
    'entry', id)
  redis.call('ZADD', p .. 'pending', created, key)
end
redis.call('DEL', p .. 'dead')
return #dead / 2
"""

# ARGV: prefix, group, idle ms, consumer name ('' = every consumer idle that long). Forgets consumers
# that hold no entry: one that holds entries keeps them until another replica's XAUTOCLAIM takes them.
_FORGET_CONSUMERS = """
local stream, group, idle, only = ARGV[1] .. 'stream', ARGV[2], tonumber(ARGV[3]), ARGV[4]
local forgotten = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] >= idle and (only == '' or only == info['name']) then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, info['name'])
    forgotten = forgotten + 1
  end
end
return forgotten
"""


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


class RedisOutbox:
    """The outbox in the Redis at ``url`` (``redis://host:port/db``), its keys under ``prefix``.

    Thread-safe (redis-py's connection pool); each instance is one consumer of the delivery group.

    Raises
    ------
    ConfigError
        Redis cannot be reached at ``url`` (or refuses the commands the outbox needs).
    """

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, *, socket_timeout_s: float = 10.0) -> None:
        self.prefix = prefix
        # a command that meets a dropped connection (Redis restarted) is sent again on a new one, twice at
        # most: every script is safe to repeat (an enqueue's keys are chosen here, so a repeat rewrites the
        # same items and its first stream entries are dropped as stale; a repeated delivered or dead finds
        # the item no longer pending; a repeated retry counts one attempt more); a timeout is not repeated
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2, supported_errors=(redis.ConnectionError,))
        self.client = redis.Redis.from_url(
            url,
            socket_connect_timeout=5.0,
            socket_timeout=socket_timeout_s,
            health_check_interval=30,
            retry=retry,
        )
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stream = prefix + "stream"
        self._enqueue = self.client.register_script(_ENQUEUE)
        self._claim = self.client.register_script(_CLAIM)
        self._delivered = self.client.register_script(_DELIVERED)
        self._failed = self.client.register_script(_FAILED)
        self._requeue = self.client.register_script(_REQUEUE)
        self._forget = self.client.register_script(_FORGET_CONSUMERS)
        try:
            self.client.ping()
            try:
                self.client.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._forget(args=[prefix, GROUP, STALE_CONSUMER_MS, ""])
        except redis.RedisError as exc:
            self.client.close()
            raise ConfigError(
                f"the fallback outbox's Redis at {self.location} cannot be used "
                f"({type(exc).__name__}: {exc}): "
                "start it, or correct PREDGATE_FALLBACK_REDIS_URL (unset it for the SQLite outbox)"
            ) from exc

    @property
    def location(self) -> str:
        """``redis://host:port/db`` (no password) and the key prefix."""
        kwargs = self.client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        return f"redis://{where}/{kwargs.get('db', 0)} (keys {self.prefix}*)"

    def enqueue(self, items: list[NewItem], now: float | None = None) -> list[str]:
        """Store ``items`` in one script (all or none) and return their keys; with ``appendfsync always``
        durable on return."""
        now = time.time() if now is None else now
        keys = [uuid.uuid4().hex for _ in items]
        if not items:
            return keys
        args: list[Any] = [self.prefix, repr(now)]
        for key, item in zip(keys, items, strict=True):
            if not isinstance(item.image, bytes | bytearray | memoryview):
                raise TypeError(f"an item's image must be bytes, not {type(item.image).__name__}")
            args += [key, json.dumps(item.meta), bytes(item.image), item.image_type]
        self._enqueue(args=args)
        return keys

    def claim(self, limit: int, lease_s: float, now: float | None = None) -> list[Claimed]:
        """Lease up to ``limit`` items: entries other workers left unacknowledged for ``lease_s`` first
        (their worker died), then new ones; due retries join the stream first."""
        now = time.time() if now is None else now
        rows = self._claim(
            args=[self.prefix, GROUP, self.consumer, limit, max(1, round(lease_s * 1000)), repr(now)]
        )
        return [
            Claimed(
                key.decode(),
                float(created),
                int(attempts),
                NewItem(json.loads(meta), bytes(image or b""), image_type.decode()),
            )
            for key, created, attempts, meta, image, image_type in rows
        ]

    def delivered(self, key: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._delivered(args=[self.prefix, GROUP, key, repr(now)])

    def failed(self, key: str, error: str, retry_at: float | None) -> None:
        """One failed attempt: back to pending until ``retry_at``, or dead when ``retry_at`` is None."""
        self._failed(args=[self.prefix, GROUP, key, error[:500], "" if retry_at is None else repr(retry_at)])

    def requeue_dead(self, now: float | None = None) -> int:
        """Give every dead item a fresh set of attempts (after the receiver is fixed); returns how many."""
        now = time.time() if now is None else now
        return int(self._requeue(args=[self.prefix, repr(now)]))

    def dead_items(self, limit: int = 100) -> list[dict[str, Any]]:
        keys = self.client.zrange(self.prefix + "dead", 0, limit - 1)
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(self.prefix + "item:" + key.decode(), "created_at", "attempts", "last_error", "meta")
        out = []
        for key, (created, attempts, error, meta) in zip(keys, pipe.execute(), strict=True):
            if meta is None:  # requeued between the two reads
                continue
            out.append(
                {
                    "key": key.decode(),
                    "created_at": float(created),
                    "attempts": int(attempts),
                    "last_error": _text(error),
                    "request_id": json.loads(meta).get("request_id"),
                }
            )
        return out

    def counts(self, now: float | None = None) -> OutboxCounts:
        now = time.time() if now is None else now
        pipe = self.client.pipeline(transaction=True)  # one consistent view
        pipe.zcard(self.prefix + "pending")
        pipe.zcard(self.prefix + "delivered")
        pipe.zcard(self.prefix + "dead")
        pipe.zrange(self.prefix + "pending", 0, 0, withscores=True)
        pending, delivered, dead, oldest = pipe.execute()
        return OutboxCounts(
            pending=int(pending),
            delivered=int(delivered),
            dead=int(dead),
            oldest_pending_age_s=max(0.0, now - float(oldest[0][1])) if oldest else None,
        )

    def item(self, key: str) -> dict[str, Any] | None:
        """One item: state, attempts, last error, record and image (``b""`` once delivered)."""
        h = self.client.hgetall(self.prefix + "item:" + key)
        if not h:
            return None
        return {
            "state": h[b"state"].decode(),
            "attempts": int(h[b"attempts"]),
            "last_error": _text(h.get(b"last_error")),
            "meta": json.loads(h[b"meta"]),
            "image": h.get(b"image", b""),
            "image_type": h[b"image_type"].decode(),
        }

    def close(self) -> None:
        """Leave the group if this consumer holds nothing (what it holds waits for another's XAUTOCLAIM)."""
        try:
            self._forget(args=[self.prefix, GROUP, 0, self.consumer])
        except redis.RedisError:
            pass
        self.client.close()
