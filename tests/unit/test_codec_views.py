"""Large binaries are decoded as views into the payload, with the same result as msgpack."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq import codec, compression
from fedmq.codec import DEFAULT_LIMITS, _unpack
from fedmq.errors import DecodeError
from fedmq.msgpack_views import VIEW_MIN_BYTES
from fedmq.wire import ModelUpdate

BIG = VIEW_MIN_BYTES


def _plain(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=True, max_ext_len=0)


def _same(a: Any, b: Any) -> bool:
    """Structural equality where a view equals the bytes it shows."""
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, bytes | memoryview):
        return isinstance(b, bytes | memoryview) and bytes(a) == bytes(b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)  # NaN equals itself here
    return type(a) is type(b) and a == b


big_bins = st.integers(BIG - 2, BIG + 3000).map(lambda n: bytes(range(256)) * (n // 256)
                                                + bytes(n % 256))
leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
          | st.text(max_size=40) | st.integers(300, 70_000).map(lambda n: "s" * n)
          | st.binary(max_size=300) | big_bins)
documents = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=8), inner,
                                                                    max_size=12),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(documents)
def test_unpack_matches_msgpack(doc: Any) -> None:
    payload = msgpack.packb(doc, use_bin_type=True)
    assert _same(_plain(payload), _unpack(payload, DEFAULT_LIMITS))


@settings(max_examples=100, deadline=None)
@given(documents, st.data())
def test_damaged_payloads_fail_alike(doc: Any, data: st.DataObject) -> None:
    payload = bytearray(msgpack.packb([doc, b"x" * BIG], use_bin_type=True))
    how = data.draw(st.sampled_from(["truncate", "flip", "append"]))
    if how == "truncate":
        payload = payload[:data.draw(st.integers(0, len(payload) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    else:
        payload += bytes(data.draw(st.binary(min_size=1, max_size=8)))
    blob = bytes(payload)
    try:
        expected = _plain(blob)
    except Exception:  # msgpack raises several types; any failure counts
        with pytest.raises(Exception):  # noqa: B017, PT011
            _unpack(blob, DEFAULT_LIMITS)
        return
    assert _same(expected, _unpack(blob, DEFAULT_LIMITS))


def test_update_tensor_data_is_a_view_of_the_payload() -> None:
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    t = compression.encode("w", x, "int8", block=256)
    payload = codec.encode(ModelUpdate(federation="f", device_id="d", round=1, base_version=0,
                                       update_id="u", num_examples=3, tensors=(t,)))
    got = codec.decode(payload)
    assert isinstance(got, ModelUpdate)
    data = got.tensors[0].data
    assert isinstance(data, memoryview)
    assert data.readonly
    assert data.obj is payload
    assert bytes(data) == t.data
    assert bytes(got.tensors[0].scales) == t.scales
    assert got == ModelUpdate(federation="f", device_id="d", round=1, base_version=0,
                              update_id="u", num_examples=3, tensors=(t,))


def test_extensions_are_still_refused() -> None:
    payload = msgpack.packb([msgpack.ExtType(0x11, b"\0\0\0\0"), b"x" * BIG], use_bin_type=True)
    with pytest.raises(DecodeError, match="ext"):
        codec.decode(payload)
