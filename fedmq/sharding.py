"""Which shard a device's updates go to on a sharded NATS cluster (``fedmq.nats_cluster``).

The broker, not fedmq, does the routing: a subject mapping with ``{{partition(n, 1)}}`` sends
``fedmq/v1/{fed}/update/{device}`` to ``fedmq/v1/{fed}/shard/{k}/update/{device}``.
``shard_of`` computes the same ``k`` here, so a worker, a test or an operator can tell where a
device lands without asking the broker. Pure Python, no I/O.

How NATS computes it (nats-server ``subject_transform.go``, checked against a running 2.15.1
for every id in ``tests/cluster/test_nats_engine.py``): FNV-1a, 32 bit, over the bytes of the
mapped subject token, modulo ``n``. The token is the device id *as a NATS subject token*: the
MQTT gateway turns each ``.`` of an MQTT topic into ``//`` (``/`` is its level separator and
``.`` the NATS one), so ``dev.7`` is hashed as ``dev//7``.
"""

from __future__ import annotations

__all__ = ["mqtt_level_to_nats_token", "shard_filter", "shard_of", "shard_topic"]

_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193


def mqtt_level_to_nats_token(level: str) -> str:
    """One MQTT topic level as NATS sees it: ``.`` becomes ``//`` (fedmq names allow no other
    character that NATS rewrites or refuses)."""
    return level.replace(".", "//")


def _fnv1a_32(data: bytes) -> int:
    h = _FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return h


def shard_of(device_id: str, n: int) -> int:
    """The shard (0 .. n-1) NATS's ``{{partition(n, 1)}}`` gives the device id ``device_id``."""
    if n < 1:
        raise ValueError(f"number of shards must be >= 1, got {n}")
    return _fnv1a_32(mqtt_level_to_nats_token(device_id).encode("utf-8")) % n


def shard_topic(federation: str, shard: int, device_id: str) -> str:
    """The MQTT topic a device's update is delivered on once the cluster maps it to ``shard``."""
    return f"fedmq/v1/{federation}/shard/{shard}/update/{device_id}"


def shard_filter(federation: str, shard: int) -> str:
    """The MQTT subscription filter of one shard's updates (a worker's)."""
    return f"fedmq/v1/{federation}/shard/{shard}/update/+"
