"""Secure aggregation's messages to bytes and back (msgpack, like ``fedmq.codec``).

Decoding trusts nothing: the payload size is capped first, every field's type, every key's and
share's exact length, every device name (one topic level), every count (roster size, shares per
message) and the masked range against ``size`` are checked before anything is kept. Any failure is
a ``DecodeError`` whose ``reason`` is ``"oversize"`` or ``"malformed"``; nothing else escapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from fedmq.codec import _unpack
from fedmq.codec_fields import DecodeLimits
from fedmq.codec_fields import Fields as _Fields
from fedmq.errors import DecodeError
from fedmq.secagg.crypto import KEY_BYTES, valid_public
from fedmq.secagg.messages import (
    COMMIT_BYTES,
    SEALED_BYTES,
    SecAggDelivery,
    SecAggKeys,
    SecAggMasked,
    SecAggMessage,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)
from fedmq.secagg.shamir import SHARE_BYTES
from fedmq.topics import check_name
from fedmq.wire import SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class SecAggLimits:
    """Caps on untrusted secure-aggregation payloads."""

    max_payload_bytes: int = 256 * 1024 * 1024
    #: devices in a roster, shares in one message, names in an unmask request
    max_devices: int = 10_000
    #: the masked vector's length (parameters + 1)
    max_size: int = 1 << 31


DEFAULT = SecAggLimits()


# ---------------------------------------------------------------- encoding


def _to_map(msg: SecAggMessage) -> dict[str, Any]:
    head = {"v": SCHEMA_VERSION, "fed": msg.federation, "run": msg.run, "round": msg.round}
    match msg:
        case SecAggKeys():
            return {**head, "kind": "sa_keys", "device": msg.device, "c": msg.c_key,
                    "s": msg.s_key}
        case SecAggRoster():
            return {**head, "kind": "sa_roster",
                    "devices": [[d, c, s] for d, c, s in msg.devices], "k": msg.degree,
                    "t": msg.threshold, "seed": msg.graph_seed, "frac_bits": msg.frac_bits,
                    "clip": msg.clip, "weight_cap": msg.weight_cap, "size": msg.size}
        case SecAggShares():
            return {**head, "kind": "sa_shares", "device": msg.device,
                    "commit": msg.commitment, "shares": dict(msg.shares)}
        case SecAggDelivery():
            return {**head, "kind": "sa_deliver", "device": msg.device,
                    "shares": dict(msg.shares)}
        case SecAggMasked():
            return {**head, "kind": "sa_masked", "device": msg.device, "offset": msg.offset,
                    "size": msg.size, "data": msg.data}
        case SecAggUnmask():
            return {**head, "kind": "sa_unmask", "survivors": list(msg.survivors),
                    "dropped": list(msg.dropped)}
        case SecAggReveal():
            return {**head, "kind": "sa_reveal", "device": msg.device,
                    "b": dict(msg.b_shares), "s": dict(msg.s_shares)}


def encode(msg: SecAggMessage) -> bytes:
    out: bytes = msgpack.packb(_to_map(msg), use_bin_type=True)
    return out


# ---------------------------------------------------------------- decoding


class _Reader:
    def __init__(self, f: _Fields, limits: SecAggLimits) -> None:
        self.f = f
        self.limits = limits

    def name(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise DecodeError(f"{self.f.where}: {what} must be a string")
        try:
            return check_name(value, what)
        except ValueError as exc:
            raise DecodeError(f"{self.f.where}: {exc}") from None

    def exact(self, value: Any, n: int, what: str) -> bytes:
        if not isinstance(value, bytes | memoryview) or len(value) != n:
            raise DecodeError(f"{self.f.where}: {what} must be {n} bytes")
        return bytes(value)

    def key(self, value: Any, what: str) -> bytes:
        raw = self.exact(value, KEY_BYTES, what)
        if not valid_public(raw):
            raise DecodeError(f"{self.f.where}: {what} is not an X25519 public key")
        return raw

    def names(self, key: str) -> tuple[str, ...]:
        raw = self.f.list_(key)
        if len(raw) > self.limits.max_devices:
            raise DecodeError(f"{self.f.where}: {key!r} lists more than "
                              f"{self.limits.max_devices} devices")
        out = tuple(self.name(v, f"{key} entry") for v in raw)
        if len(set(out)) != len(out):
            raise DecodeError(f"{self.f.where}: {key!r} repeats a device")
        return out

    def blobs(self, key: str, n: int) -> dict[str, bytes]:
        raw = self.f.map_(key)
        if len(raw) > self.limits.max_devices:
            raise DecodeError(f"{self.f.where}: {key!r} has more than "
                              f"{self.limits.max_devices} entries")
        return {self.name(k, f"{key} key"): self.exact(v, n, f"{key} value")
                for k, v in raw.items()}


def _keys(r: _Reader, head: dict[str, Any]) -> SecAggKeys:
    f = r.f
    return SecAggKeys(**head, device=r.name(f.str_("device"), "device"),
                      c_key=r.key(f.bytes_("c"), "c"), s_key=r.key(f.bytes_("s"), "s"))


def _roster(r: _Reader, head: dict[str, Any]) -> SecAggRoster:
    f = r.f
    raw = f.list_("devices")
    if len(raw) > r.limits.max_devices:
        raise DecodeError(f"sa_roster: more than {r.limits.max_devices} devices")
    devices = []
    for e in raw:
        if not isinstance(e, list) or len(e) != 3:
            raise DecodeError("sa_roster: a device entry is [name, c key, s key]")
        devices.append((r.name(e[0], "device"), r.key(e[1], "c"), r.key(e[2], "s")))
    names = [d for d, _, _ in devices]
    if names != sorted(set(names)):
        raise DecodeError("sa_roster: devices must be sorted and distinct")
    k = f.int_("k", 0, max(len(devices) - 1, 0))
    t = f.int_("t", 1, max(k, 1))
    seed = f.bytes_("seed")
    if len(seed) > 64:
        raise DecodeError("sa_roster: seed longer than 64 bytes")
    clip, cap = f.float_("clip"), f.float_("weight_cap")
    if clip <= 0 or cap <= 0:
        raise DecodeError("sa_roster: clip and weight_cap must be > 0")
    return SecAggRoster(**head, devices=tuple(devices), degree=k, threshold=t,
                        graph_seed=bytes(seed), frac_bits=f.int_("frac_bits", 0, 30),
                        clip=clip, weight_cap=cap, size=f.int_("size", 2, r.limits.max_size))


def _shares(r: _Reader, head: dict[str, Any]) -> SecAggShares:
    f = r.f
    device = r.name(f.str_("device"), "device")
    shares = r.blobs("shares", SEALED_BYTES)
    if device in shares:
        raise DecodeError("sa_shares: a device does not share with itself")
    return SecAggShares(**head, device=device,
                        commitment=r.exact(f.bytes_("commit"), COMMIT_BYTES, "commit"),
                        shares=shares)


def _deliver(r: _Reader, head: dict[str, Any]) -> SecAggDelivery:
    return SecAggDelivery(**head, device=r.name(r.f.str_("device"), "device"),
                          shares=r.blobs("shares", SEALED_BYTES))


def _masked(r: _Reader, head: dict[str, Any]) -> SecAggMasked:
    f = r.f
    size = f.int_("size", 2, r.limits.max_size)
    offset = f.int_("offset", 0, size - 1)
    data = f.bytes_("data")
    if len(data) == 0 or len(data) % 4 or offset + len(data) // 4 > size:
        raise DecodeError(f"sa_masked: {len(data)} data bytes at offset {offset} do not fit "
                          f"a vector of {size} uint32")
    return SecAggMasked(**head, device=r.name(f.str_("device"), "device"), offset=offset,
                        size=size, data=data)


def _unmask(r: _Reader, head: dict[str, Any]) -> SecAggUnmask:
    survivors, dropped = r.names("survivors"), r.names("dropped")
    if set(survivors) & set(dropped):
        raise DecodeError("sa_unmask: a device both survived and dropped")
    return SecAggUnmask(**head, survivors=survivors, dropped=dropped)


def _reveal(r: _Reader, head: dict[str, Any]) -> SecAggReveal:
    b, s = r.blobs("b", SHARE_BYTES), r.blobs("s", SHARE_BYTES)
    if set(b) & set(s):
        raise DecodeError("sa_reveal: both shares for one device")
    return SecAggReveal(**head, device=r.name(r.f.str_("device"), "device"),
                        b_shares=b, s_shares=s)


_READERS: Mapping[str, Callable[[_Reader, dict[str, Any]], SecAggMessage]] = {
    "sa_keys": _keys, "sa_roster": _roster, "sa_shares": _shares, "sa_deliver": _deliver,
    "sa_masked": _masked, "sa_unmask": _unmask, "sa_reveal": _reveal,
}


def decode(payload: bytes | bytearray | memoryview,
           limits: SecAggLimits = DEFAULT) -> SecAggMessage:
    """Decode and check one secure-aggregation message; raises ``DecodeError`` only."""
    if len(payload) > limits.max_payload_bytes:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds the limit of "
                          f"{limits.max_payload_bytes}", reason="oversize")
    caps = DecodeLimits(max_payload_bytes=limits.max_payload_bytes,
                        max_entries=limits.max_devices)
    try:
        raw = _unpack(payload, caps)
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"not a valid msgpack document: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise DecodeError("a fedmq message is a map")
    head = _Fields(raw, "message", caps)
    if head.int_("v") != SCHEMA_VERSION:
        raise DecodeError("unsupported schema version")
    reader = _READERS.get(head.str_("kind"))
    if reader is None:
        raise DecodeError("not a secure-aggregation message")
    fields = _Fields(raw, head.str_("kind"), caps)
    common = {"federation": head.str_("fed"), "run": head.int_("run"),
              "round": head.int_("round")}
    return reader(_Reader(fields, limits), common)
