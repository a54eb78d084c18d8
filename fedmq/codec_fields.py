"""The untrusted-map reader every decoder shares (``Fields``: typed access, each miss a
``DecodeError`` naming the field) and the caps it applies (``DecodeLimits``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fedmq.errors import DecodeError
from fedmq.wire import Blob

__all__ = ["DEFAULT_LIMITS", "DecodeLimits", "Fields", "is_int", "is_number"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Caps applied to untrusted payloads before and while decoding them."""

    max_payload_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 1024
    max_ndim: int = 8
    max_elements: int = 1 << 31
    max_string: int = 256
    max_entries: int = 256  # entries of a metrics / train / rejected map, accepted list items


DEFAULT_LIMITS = DecodeLimits()


class Fields:
    """Typed access to one untrusted msgpack map; every miss is a DecodeError naming the field."""

    def __init__(self, m: Mapping[str, Any], where: str, limits: DecodeLimits) -> None:
        self.m = m
        self.where = where
        self.limits = limits

    def _get(self, key: str, check: Callable[[Any], bool], what: str) -> Any:
        if key not in self.m:
            raise DecodeError(f"{self.where}: required field {key!r} is missing")
        value = self.m[key]
        if not check(value):
            raise DecodeError(f"{self.where}: field {key!r} must be {what}, got "
                              f"{type(value).__name__}")
        return value

    def int_(self, key: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
        value: int = self._get(key, is_int, "an integer")
        if not lo <= value <= hi:
            raise DecodeError(f"{self.where}: field {key!r}={value} is outside [{lo}, {hi}]")
        return value

    def float_(self, key: str) -> float:
        value = float(self._get(key, is_number, "a number"))
        if not math.isfinite(value):
            raise DecodeError(f"{self.where}: field {key!r} is not finite")
        return value

    def str_(self, key: str) -> str:
        value: str = self._get(key, lambda v: isinstance(v, str), "a string")
        if len(value) > self.limits.max_string:
            raise DecodeError(f"{self.where}: field {key!r} is longer than "
                              f"{self.limits.max_string} characters")
        return value

    def bool_(self, key: str) -> bool:
        value: bool = self._get(key, lambda v: isinstance(v, bool), "a boolean")
        return value

    def bytes_(self, key: str) -> Blob:
        value: Blob = self._get(key, lambda v: isinstance(v, bytes | memoryview), "binary")
        return value

    def list_(self, key: str) -> list[Any]:
        value: list[Any] = self._get(key, lambda v: isinstance(v, list), "an array")
        return value

    def map_(self, key: str) -> Mapping[str, Any]:
        value: Mapping[str, Any] = self._get(key, lambda v: isinstance(v, dict), "a map")
        return value

    def optional(self, key: str, read: Callable[[str], T], default: T) -> T:
        return read(key) if key in self.m else default

    def scalars(self, key: str) -> dict[str, float]:
        """A map of metric name to finite number (NaN / inf are dropped, not trusted)."""
        raw: Mapping[str, Any] = self.optional(key, self.map_, {})
        if len(raw) > self.limits.max_entries:
            raise DecodeError(f"{self.where}: {key!r} has more than {self.limits.max_entries} "
                              "entries")
        out: dict[str, float] = {}
        for k, v in raw.items():
            if not isinstance(k, str) or not is_number(v):
                raise DecodeError(f"{self.where}: {key!r} must map strings to numbers")
            if math.isfinite(v):
                out[k] = float(v)
        return out


def is_int(v: Any) -> bool:
    # bool is an int subclass in Python, but msgpack has a separate boolean type.
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
