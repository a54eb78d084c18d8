"""fedmq.codec: round trips, truncations, malformed payloads, fuzzing, golden bytes, docs example.

msgpack is imported here on purpose: malformed payloads are built by hand, bypassing the encoder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq import sampling
from fedmq.codec import DecodeLimits, decode, decode_as, encode
from fedmq.compression import decode_all
from fedmq.errors import DecodeError
from fedmq.wire import (
    DeviceStatus,
    GlobalModel,
    Message,
    ModelUpdate,
    RoundAnnouncement,
    RoundSummary,
    Tensor,
    model_digest,
)

HERE = Path(__file__).resolve().parent
GOLDEN_DIR = HERE / "golden"
PROTOCOL_MD = HERE.parents[1] / "docs" / "protocol.md"
MESSAGE_TYPES = (RoundAnnouncement, GlobalModel, ModelUpdate, DeviceStatus, RoundSummary)
CLASS_OF: dict[str, type[Message]] = {
    "round": RoundAnnouncement, "model": GlobalModel, "update": ModelUpdate,
    "status": DeviceStatus, "summary": RoundSummary,
}


def _golden_messages() -> dict[str, Message]:
    # make_golden.py is a script, not a package module: load it by path.
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    messages: dict[str, Message] = module.golden_messages()
    return messages


GOLDEN = _golden_messages()
GOLDEN_BYTES = {stem: encode(msg) for stem, msg in GOLDEN.items()}
WITH_TENSORS = ("model", "update")


def _t(name: str, values: npt.ArrayLike) -> Tensor:
    # Built by hand: fedmq.compression.encode turns a 0-d array into shape (1,).
    a = np.asarray(values, dtype="<f4")
    return Tensor(name=name, dtype="float32", shape=a.shape, codec="fp32", data=a.tobytes())


def _model(*tensors: Tensor, fed: str = "demo") -> GlobalModel:
    return GlobalModel(federation=fed, version=1, round=1, tensors=tensors,
                       sha256=model_digest(tensors))


def _update(*tensors: Tensor, **changes: Any) -> ModelUpdate:
    base = ModelUpdate(federation="demo", device_id="d1", round=1, base_version=0,
                       update_id="u1", num_examples=1, tensors=tensors)
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------- round trips

MAX_INT = (1 << 63) - 1
SCALAR = _t("scalar", 3.5)
UNICODE = (_t("слой/вес", [1.0, 2.0]), _t("层/偏置", [-1.0]), _t("🙂", [[0.5]]), _t("", [7.0]))
ZERO_SIZE = (
    _t("empty", np.zeros((0,))), _t("rows", np.zeros((0, 4))), _t("mid", np.zeros((3, 0, 2))))

ROUND_TRIPS = [
    *(pytest.param(msg, id=f"golden-{stem}") for stem, msg in GOLDEN.items()),
    pytest.param(_model(), id="model-no-tensors"),
    pytest.param(_model(SCALAR), id="model-scalar-tensor"),
    pytest.param(_model(*ZERO_SIZE), id="model-zero-size-dims"),
    pytest.param(_model(*UNICODE), id="model-unicode-names"),
    pytest.param(_model(_t("deep", np.ones((1, 2, 1, 2, 1, 1, 1, 2)))), id="model-eight-dims"),
    pytest.param(_model(_t("big", np.arange(10_000).reshape(100, 100))), id="model-10k-elements"),
    pytest.param(_model(*(_t(f"t{i}", [float(i)]) for i in range(1024))), id="model-max-tensors"),
    pytest.param(
        GlobalModel(federation="demo", version=0, round=0, tensors=(), sha256=model_digest(()),
                    metrics={"loss": 1e-300, "neg": -2.5, "big": 1e300}, created=-1.0),
        id="model-extreme-metrics"),
    pytest.param(_update(), id="update-no-tensors"),
    pytest.param(_update(SCALAR, *ZERO_SIZE), id="update-scalar-and-zero-size"),
    pytest.param(
        _update(_t("名" * 256, [1.0]), federation="f" * 256, device_id="é" * 256,
                update_id="u" * 256),
        id="update-max-length-strings"),
    pytest.param(_update(round=MAX_INT, base_version=MAX_INT, num_examples=MAX_INT),
                 id="update-max-integers"),
    pytest.param(_update(_t("nan-bits", [math.nan, math.inf])),
                 id="update-non-finite-data-is-the-aggregators-business"),
    pytest.param(_update(metrics={f"m{i}": float(i) for i in range(256)}),
                 id="update-max-metrics"),
    pytest.param(
        RoundAnnouncement(federation="demo", round=0, base_version=0, model_sha256="",
                          deadline=0.0, min_updates=0, max_updates=0),
        id="round-defaults"),
    pytest.param(
        RoundAnnouncement(federation="demo", round=MAX_INT, base_version=MAX_INT,
                          model_sha256="a" * 256, deadline=-1.5, min_updates=MAX_INT,
                          max_updates=MAX_INT, train={"s": "x" * 1000, "i": -3, "f": 0.1},
                          sample_seed=MAX_INT, sample_rate=0.0, codec="fp32", open=False),
        id="round-closed-extremes"),
    pytest.param(
        RoundAnnouncement(federation="demo", round=5, base_version=4, model_sha256="00",
                          deadline=10, min_updates=1, max_updates=1, sample_rate=1),
        id="round-int-for-float"),
    pytest.param(
        RoundAnnouncement(federation="demo", round=1, base_version=0, model_sha256="00",
                          deadline=10.0, min_updates=1, max_updates=1, run=1_795_000_000_123),
        id="round-with-run"),
    pytest.param(
        GlobalModel(federation="demo", version=0, round=0, tensors=(), sha256=model_digest(()),
                    run=MAX_INT),
        id="model-with-run"),
    pytest.param(_update(run=1), id="update-with-run"),
    *(pytest.param(DeviceStatus(federation="demo", device_id="d", state=state),
                   id=f"status-{state}")
      for state in ("online", "training", "offline")),
    pytest.param(
        DeviceStatus(federation="demo", device_id="d", state="online", agent_version="v" * 256,
                     capabilities=tuple(f"c{i}" for i in range(256)), ts=1e9),
        id="status-max-capabilities"),
    pytest.param(
        DeviceStatus(federation="demo", device_id="d", state="online",
                     ignored={"unsigned": 3, "old_model": 1, "bad_signature": MAX_INT}),
        id="status-with-refusals"),
    pytest.param(
        RoundSummary(federation="demo", round=0, version=0, participants=0, closed_by=""),
        id="summary-defaults"),
    pytest.param(
        RoundSummary(federation="demo", round=9, version=9, participants=1000,
                     closed_by="max_updates",
                     accepted=tuple((f"d{i}", f"u{i}") for i in range(1000)),
                     rejected={"stale": 0, "duplicate": MAX_INT}, bytes_in=MAX_INT),
        id="summary-many-accepted"),
]


@pytest.mark.parametrize("msg", ROUND_TRIPS)
def test_round_trip(msg: Message) -> None:
    payload = encode(msg)
    decoded = decode(payload)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert encode(decoded) == payload
    assert decode(bytearray(payload)) == msg
    assert decode(memoryview(payload)) == msg


@pytest.mark.parametrize(("stem", "cls"), CLASS_OF.items())
def test_decode_as_checks_the_kind(stem: str, cls: type[Message]) -> None:
    # decode_as's type variable is constrained to the five classes; the union type is not one.
    for other, payload in GOLDEN_BYTES.items():
        if other == stem:
            assert isinstance(decode_as(payload, cls), cls)  # type: ignore[type-var]
        else:
            with pytest.raises(DecodeError) as info:
                decode_as(payload, cls)  # type: ignore[type-var]
            assert info.value.reason == "malformed"


def test_non_finite_metrics_are_dropped_not_trusted() -> None:
    raw = msgpack.unpackb(GOLDEN_BYTES["model"])
    raw["metrics"] = {"loss": math.nan, "acc": 0.5, "up": math.inf, "down": -math.inf}
    msg = decode(msgpack.packb(raw))
    assert isinstance(msg, GlobalModel)
    assert msg.metrics == {"acc": 0.5}


def test_float32_and_integer_numbers_are_read_as_floats() -> None:
    raw = msgpack.unpackb(GOLDEN_BYTES["round"])
    raw["deadline"] = 7
    msg = decode(msgpack.packb(raw, use_single_float=True))
    assert isinstance(msg, RoundAnnouncement)
    assert msg.deadline == 7.0
    assert isinstance(msg.deadline, float)
    assert msg.sample_rate == 0.5  # packed as float32 here


# ---------------------------------------------------------------- truncation

TRUNCATED = [
    *(pytest.param(payload, id=stem) for stem, payload in GOLDEN_BYTES.items()),
    pytest.param(encode(_model(SCALAR, *UNICODE)), id="model-unicode-scalar"),
    pytest.param(encode(_model()), id="model-no-tensors"),
]


@pytest.mark.parametrize("payload", TRUNCATED)
def test_every_truncated_prefix_raises_decode_error(payload: bytes) -> None:
    for n in range(len(payload)):
        with pytest.raises(DecodeError) as info:
            decode(payload[:n])
        assert info.value.reason == "malformed", n


# ---------------------------------------------------------------- malformed payloads

DROP = object()


def _raw(stem: str) -> dict[str, Any]:
    raw: dict[str, Any] = msgpack.unpackb(GOLDEN_BYTES[stem])
    return raw


def _with(stem: str, **changes: Any) -> bytes:
    """The golden payload of ``stem`` with fields replaced (or removed, with DROP)."""
    raw = _raw(stem)
    for key, value in changes.items():
        if value is DROP:
            del raw[key]
        else:
            raw[key] = value
    out: bytes = msgpack.packb(raw, use_bin_type=True)
    return out


def _with_tensor(stem: str, **changes: Any) -> bytes:
    """The golden payload of ``stem`` with fields of its first tensor replaced or removed."""
    raw = _raw(stem)
    tensor = raw["tensors"][0]
    for key, value in changes.items():
        if value is DROP:
            del tensor[key]
        else:
            tensor[key] = value
    out: bytes = msgpack.packb(raw, use_bin_type=True)
    return out


def _packed(value: Any) -> bytes:
    out: bytes = msgpack.packb(value, use_bin_type=True)
    return out


REQUIRED: dict[str, tuple[str, ...]] = {
    "round": ("round", "base_version", "model_sha256", "deadline", "min_updates", "max_updates"),
    "model": ("version", "round", "tensors", "sha256"),
    "update": ("device", "round", "base_version", "update_id", "num_examples", "tensors"),
    "status": ("device", "state"),
    "summary": ("round", "version", "participants", "closed_by"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    "round": ("train", "sample_seed", "sample_rate", "codec", "open"),
    "model": ("metrics", "created"),
    "update": ("metrics",),
    "status": ("agent_version", "capabilities", "ts"),
    "summary": ("accepted", "rejected", "bytes_in", "duration_s", "metrics"),
}
# Optional fields written only when they differ from their default (chunked messages).
SPARSE: dict[str, tuple[str, ...]] = {"model": ("chunk", "chunks", "run", "sig"),
                                      "update": ("chunk", "chunks", "run"),
                                      "round": ("codec_params", "max_chunk_bytes", "run",
                                                "sample_draw", "mode", "max_staleness", "task",
                                                "columns", "sig"),
                                      "status": ("ignored",)}
ENVELOPE = ("v", "kind", "fed")
TENSOR_KEYS = ("name", "dtype", "shape", "codec", "data")
WIRE_TO_ATTR = {"fed": "federation", "device": "device_id"}

_kernel = _raw("model")["tensors"][0]["data"]


def _with_deep_nesting(depth: int) -> bytes:
    """The golden status plus an unknown field nested ``depth`` arrays deep (msgpack's packer
    refuses to write that, so the bytes are put together by hand)."""
    payload = GOLDEN_BYTES["status"]
    assert payload[0] == 0x88  # a fixmap of 8 pairs
    return b"\x89" + payload[1:] + _packed("future") + b"\x91" * depth + b"\xc0"


def _bad_utf8(stem: str, text: str) -> bytes:
    """Replace one string in a golden payload with invalid UTF-8 of the same length."""
    payload = GOLDEN_BYTES[stem]
    assert text.encode() in payload
    return payload.replace(text.encode(), b"\xff" + text.encode()[1:], 1)


MALFORMED: list[Any] = [
    # structure
    pytest.param(b"", "malformed", id="empty-payload"),
    pytest.param(_packed([1, 2]), "malformed", id="not-a-map-array"),
    pytest.param(_packed(1), "malformed", id="not-a-map-int"),
    pytest.param(_packed("model"), "malformed", id="not-a-map-str"),
    pytest.param(_packed(None), "malformed", id="not-a-map-nil"),
    pytest.param(_packed({}), "malformed", id="empty-map"),
    pytest.param(GOLDEN_BYTES["status"] + b"\xc0", "malformed", id="trailing-bytes"),
    pytest.param(GOLDEN_BYTES["status"] * 2, "malformed", id="two-messages"),
    pytest.param(b"\xc1", "malformed", id="reserved-byte"),
    pytest.param(_packed({1: 2, "v": 1}), "malformed", id="integer-map-key"),
    pytest.param(_packed({b"v": 1, b"kind": "status", b"fed": "demo"}), "malformed",
                 id="bin-envelope-keys"),
    pytest.param(_with_deep_nesting(5000), "malformed", id="too-deep-in-unknown-field"),
    pytest.param(_bad_utf8("status", "sensor-07"), "malformed", id="invalid-utf8-device"),
    pytest.param(_bad_utf8("model", "dense/kernel"), "malformed", id="invalid-utf8-tensor-name"),
    # envelope
    *(pytest.param(_with("status", v=v), "malformed", id=f"v-{name}") for name, v in [
        ("2", 2), ("0", 0), ("negative", -1), ("str", "1"), ("true", True), ("float", 1.0),
        ("nil", None), ("huge", (1 << 64) - 1)]),
    pytest.param(_with("status", kind="chunk"), "malformed", id="unknown-kind"),
    pytest.param(_with("status", kind="STATUS"), "malformed", id="kind-wrong-case"),
    pytest.param(_with("status", kind=""), "malformed", id="kind-empty"),
    pytest.param(_with("status", kind=5), "malformed", id="kind-int"),
    pytest.param(_with("status", kind=b"status"), "malformed", id="kind-bin"),
    pytest.param(_with("status", fed=7), "malformed", id="fed-int"),
    pytest.param(_with("status", fed=None), "malformed", id="fed-nil"),
    # missing required fields, every kind and the tensor map
    *(pytest.param(_with(stem, **{key: DROP}), "malformed", id=f"{stem}-missing-{key}")
      for stem in GOLDEN for key in ENVELOPE + REQUIRED[stem]),
    *(pytest.param(_with_tensor(stem, **{key: DROP}), "malformed",
                   id=f"{stem}-tensor-missing-{key}")
      for stem in WITH_TENSORS for key in TENSOR_KEYS),
    # wrong types
    *(pytest.param(_with(stem, **{key: value}), "malformed", id=f"{stem}-{key}-{name}")
      for stem, key, name, value in [
          ("round", "round", "str", "3"),
          ("round", "round", "bool", True),
          ("round", "round", "float", 3.0),
          ("round", "round", "nil", None),
          ("round", "base_version", "bool", False),
          ("round", "min_updates", "float", 2.0),
          ("round", "deadline", "str", "soon"),
          ("round", "deadline", "bool", True),
          ("round", "deadline", "nil", None),
          ("round", "model_sha256", "bin", b"\x00" * 32),
          ("round", "open", "int", 1),
          ("round", "open", "str", "yes"),
          ("round", "train", "array", [1]),
          ("round", "train", "list-value", {"lr": [0.1]}),
          ("round", "train", "nil-value", {"lr": None}),
          ("round", "train", "bool-value", {"shuffle": True}),
          ("round", "train", "bin-key", {b"lr": 0.1}),
          ("round", "sample_seed", "float", 1.5),
          ("round", "sample_rate", "str", "0.5"),
          ("round", "sample_rate", "bool", True),
          ("round", "codec", "int", 1),
          ("model", "version", "bool", False),
          ("model", "sha256", "nil", None),
          ("model", "tensors", "map", {}),
          ("model", "tensors", "array-of-arrays", [[1, 2]]),
          ("model", "tensors", "array-of-nil", [None]),
          ("model", "metrics", "array", [1]),
          ("model", "metrics", "str-value", {"loss": "low"}),
          ("model", "metrics", "bool-value", {"loss": True}),
          ("model", "metrics", "bin-key", {b"loss": 0.5}),
          ("model", "created", "str", "now"),
          ("update", "device", "bin", b"sensor-07"),
          ("update", "device", "int", 7),
          ("update", "update_id", "nil", None),
          ("update", "num_examples", "bool", True),
          ("update", "num_examples", "float", 12.0),
          ("update", "num_examples", "str", "12"),
          ("status", "state", "int", 1),
          ("status", "agent_version", "int", 1),
          ("status", "capabilities", "str", "fp32"),
          ("status", "capabilities", "int-item", [1]),
          ("status", "capabilities", "map", {"fp32": True}),
          ("status", "ts", "str", "now"),
          ("status", "ignored", "list", [["unsigned", 1]]),
          ("status", "ignored", "negative", {"unsigned": -1}),
          ("status", "ignored", "float", {"unsigned": 1.0}),
          ("status", "ignored", "bin-key", {b"unsigned": 1}),
          ("summary", "closed_by", "nil", None),
          ("summary", "participants", "float", 2.0),
          ("summary", "accepted", "one-string", [["sensor-07"]]),
          ("summary", "accepted", "three-strings", [["a", "b", "c"]]),
          ("summary", "accepted", "int-in-pair", [["a", 1]]),
          ("summary", "accepted", "flat", ["a", "b"]),
          ("summary", "accepted", "map", {"a": "b"}),
          ("summary", "rejected", "str-count", {"stale": "1"}),
          ("summary", "rejected", "bool-count", {"stale": True}),
          ("summary", "rejected", "float-count", {"stale": 1.0}),
          ("summary", "rejected", "array", []),
          ("summary", "bytes_in", "float", 1.0),
          ("summary", "duration_s", "bool", False),
      ]),
    *(pytest.param(_with_tensor(stem, **{key: value}), "malformed",
                   id=f"{stem}-tensor-{key}-{name}")
      for stem in WITH_TENSORS for key, name, value in [
          ("name", "int", 1),
          ("name", "bin", b"dense/kernel"),
          ("dtype", "bin", b"float32"),
          ("codec", "nil", None),
          ("shape", "str", "2,3"),
          ("shape", "map", {"0": 2}),
          ("shape", "float-dim", [2.0, 3]),
          ("shape", "bool-dim", [True, 6]),
          ("shape", "str-dim", ["2", 3]),
          ("data", "str", "abc"),
          ("data", "array", [0.5, 1.0]),
      ]),
    # negative or too large integers
    *(pytest.param(_with(stem, **{key: value}), "malformed", id=f"{stem}-{key}-{value}")
      for stem, key, value in [
          ("round", "round", -1), ("round", "base_version", -1), ("round", "min_updates", -1),
          ("round", "max_updates", -1), ("round", "sample_seed", -1), ("model", "version", -1),
          ("model", "round", -1), ("update", "num_examples", -1), ("update", "round", -1),
          ("update", "base_version", -1), ("summary", "participants", -1),
          ("summary", "bytes_in", -1), ("round", "round", 1 << 63),
          ("update", "num_examples", (1 << 64) - 1), ("round", "sample_seed", -(1 << 63)),
      ]),
    pytest.param(_with("summary", rejected={"stale": -1}), "malformed",
                 id="summary-rejected-negative"),
    pytest.param(_with_tensor("model", shape=[-1, 3], data=b""), "malformed",
                 id="shape-negative-dim"),
    # data length against shape and codec
    pytest.param(_with_tensor("model", data=_kernel[:-1]), "malformed", id="data-one-byte-short"),
    pytest.param(_with_tensor("model", data=_kernel + b"\0"), "malformed",
                 id="data-one-byte-long"),
    pytest.param(_with_tensor("model", data=b""), "malformed", id="data-empty"),
    pytest.param(_with_tensor("model", shape=[6, 2]), "malformed", id="data-half-of-shape"),
    pytest.param(_with_tensor("model", shape=[], data=b""), "malformed", id="scalar-without-data"),
    pytest.param(_with_tensor("model", shape=[0], data=b"\0\0\0\0"), "malformed",
                 id="zero-size-with-data"),
    pytest.param(_with_tensor("model", shape=[1] * 9, data=b"\0" * 4), "malformed",
                 id="too-many-dims"),
    # huge declared shapes: refused before anything is allocated
    *(pytest.param(_with_tensor("model", shape=shape, data=b""), "oversize", id=f"shape-{name}")
      for name, shape in [
          ("2**32", [1 << 32]),
          ("2**31+1", [(1 << 31) + 1]),
          ("2**16x2**16", [1 << 16, 1 << 16]),
          ("u64-max", [(1 << 64) - 1]),
          ("8-dims-of-256", [256] * 8),
          ("zero-times-2**40", [0, 1 << 40]),
          ("zero-times-2**31-twice", [0, 1 << 31, 1 << 31]),
      ]),
    # non-finite numbers
    *(pytest.param(_with(stem, **{key: value}), "malformed", id=f"{stem}-{key}-{value}")
      for stem, key, value in [
          ("round", "deadline", math.nan), ("round", "deadline", math.inf),
          ("round", "deadline", -math.inf), ("round", "sample_rate", math.nan),
          ("model", "created", math.inf), ("status", "ts", math.nan),
          ("summary", "duration_s", -math.inf),
      ]),
    pytest.param(_with("round", train={"lr": math.nan}), "malformed", id="round-train-nan"),
    pytest.param(_with("round", train={"lr": math.inf}), "malformed", id="round-train-inf"),
    # extension types, wherever they are
    pytest.param(_with("status", ts=msgpack.Timestamp(1_700_000_000)), "malformed",
                 id="timestamp-ext-as-ts"),
    pytest.param(_with("round", deadline=msgpack.ExtType(5, b"\0" * 8)), "malformed",
                 id="ext-as-deadline"),
    pytest.param(_with("status", future=msgpack.ExtType(1, b"x")), "malformed",
                 id="ext-in-unknown-field"),
    pytest.param(_with_tensor("model", data=msgpack.ExtType(2, _kernel)), "malformed",
                 id="ext-as-tensor-data"),
    pytest.param(_with("status", future=msgpack.ExtType(3, b"")), "malformed",
                 id="empty-ext-in-unknown-field"),
    # dtype and codec
    *(pytest.param(_with_tensor("update", **{key: value}), "malformed", id=f"{key}-{value!r}")
      for key, value in [
          ("codec", "int8"), ("codec", "fp16"), ("codec", "FP32"), ("codec", ""),
          ("dtype", "float64"), ("dtype", "float16"), ("dtype", "int8"), ("dtype", "<f4"),
      ]),
    # duplicate tensor names
    pytest.param(_with("model", tensors=[_raw("model")["tensors"][0]] * 2), "malformed",
                 id="duplicate-tensor-names"),
    pytest.param(
        _with("update", tensors=[{**t, "name": "w"} for t in _raw("update")["tensors"]]),
        "malformed", id="duplicate-names-different-shapes"),
    # sample_rate range
    *(pytest.param(_with("round", sample_rate=rate), "malformed", id=f"sample-rate-{rate}")
      for rate in (1.5, -0.1, 1.0000001, -1, 2)),
    # run: a non-negative integer where it is given
    *(pytest.param(_with(stem, run=run), "malformed", id=f"{stem}-run-{run!r}")
      for stem in ("round", "model", "update") for run in (-1, 1.5, "7", True, 1 << 63)),
    # status state
    *(pytest.param(_with("status", state=state), "malformed", id=f"state-{state!r}")
      for state in ("sleeping", "Online", "", "offline ")),
    # string and entry limits
    pytest.param(_with("status", fed="f" * 257), "malformed", id="fed-too-long"),
    pytest.param(_with("status", device="é" * 257), "malformed", id="device-too-long-unicode"),
    pytest.param(_with("status", kind="k" * 257), "malformed", id="kind-too-long"),
    pytest.param(_with("update", update_id="u" * 257), "malformed", id="update-id-too-long"),
    pytest.param(_with("update", update_id=""), "malformed", id="update-id-empty"),
    pytest.param(_with_tensor("model", name="n" * 257), "malformed", id="tensor-name-too-long"),
    pytest.param(_with("status", future="x" * ((1 << 20) + 1)), "malformed",
                 id="huge-string-in-unknown-field"),
    pytest.param(_with("model", metrics={f"m{i}": 1.0 for i in range(257)}), "malformed",
                 id="too-many-metrics"),
    pytest.param(_with("round", train={f"k{i}": 1 for i in range(257)}), "malformed",
                 id="too-many-train-entries"),
    pytest.param(_with("status", capabilities=["fp32"] * 257), "malformed",
                 id="too-many-capabilities"),
    pytest.param(_with("status", ignored={f"r{i}": 1 for i in range(257)}), "malformed",
                 id="too-many-ignored-reasons"),
    pytest.param(_with("summary", rejected={f"r{i}": 1 for i in range(257)}), "malformed",
                 id="too-many-rejection-reasons"),
    pytest.param(_with("status", future=list(range((1 << 16) + 1))), "malformed",
                 id="huge-array-in-unknown-field"),
    pytest.param(_with("status", future={str(i): i for i in range((1 << 12) + 1)}), "malformed",
                 id="huge-map-in-unknown-field"),
    # too many tensors (each is tiny, so only the count is over)
    pytest.param(_with("model", tensors=[
        {"name": f"t{i}", "dtype": "float32", "shape": [0], "codec": "fp32", "data": b""}
        for i in range(1025)]), "oversize", id="too-many-tensors"),
]


@pytest.mark.parametrize(("payload", "reason"), MALFORMED)
def test_malformed_payload_is_rejected(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(payload)
    assert info.value.reason == reason
    assert str(info.value)  # says what was wrong


@pytest.mark.parametrize(("payload", "limits", "reason"), [
    pytest.param(GOLDEN_BYTES["model"], DecodeLimits(max_payload_bytes=100), "oversize",
                 id="payload-over-limit"),
    pytest.param(GOLDEN_BYTES["model"], DecodeLimits(max_tensors=1), "oversize",
                 id="tensors-over-limit"),
    pytest.param(GOLDEN_BYTES["model"], DecodeLimits(max_elements=5), "oversize",
                 id="elements-over-limit"),
    pytest.param(_with_tensor("model", shape=[0, 7], data=b""), DecodeLimits(max_elements=6),
                 "oversize", id="zero-size-with-large-dim-over-limit"),
    pytest.param(GOLDEN_BYTES["model"], DecodeLimits(max_ndim=1), "malformed",
                 id="ndim-over-limit"),
    pytest.param(GOLDEN_BYTES["status"], DecodeLimits(max_string=8), "malformed",
                 id="string-over-limit"),
    pytest.param(GOLDEN_BYTES["round"], DecodeLimits(max_entries=2), "malformed",
                 id="train-entries-over-limit"),
])
def test_limits_are_configurable(payload: bytes, limits: DecodeLimits, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(payload, limits)
    assert info.value.reason == reason


def test_limits_at_the_boundary_are_accepted() -> None:
    model = GOLDEN["model"]
    limits = DecodeLimits(max_payload_bytes=len(GOLDEN_BYTES["model"]), max_tensors=2,
                          max_elements=6, max_ndim=2, max_string=64, max_entries=2)
    assert decode(GOLDEN_BYTES["model"], limits) == model


@pytest.mark.parametrize("stem", sorted(GOLDEN))
def test_required_and_optional_fields_match_the_message_classes(stem: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(CLASS_OF[stem])}
    without_default = {name for name, f in fields.items()
                       if f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING}
    wire_required = {WIRE_TO_ATTR.get(k, k) for k in ("fed", *REQUIRED[stem])}
    assert wire_required == without_default
    assert {*OPTIONAL[stem], *SPARSE.get(stem, ())} == set(fields) - without_default
    assert set(_raw(stem)) == {*ENVELOPE, *REQUIRED[stem], *OPTIONAL[stem]}


@pytest.mark.parametrize("stem", sorted(GOLDEN))
def test_missing_optional_fields_take_their_defaults(stem: str) -> None:
    msg = decode(_with(stem, **dict.fromkeys(OPTIONAL[stem], DROP)))
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(CLASS_OF[stem]):
        if f.name in OPTIONAL[stem]:
            factory: Callable[[], Any] | None = (
                None if f.default_factory is dataclasses.MISSING else f.default_factory)
            defaults[f.name] = f.default if factory is None else factory()
    assert msg == dataclasses.replace(GOLDEN[stem], **defaults)


@pytest.mark.parametrize("stem", sorted(GOLDEN))
def test_unknown_fields_are_ignored(stem: str) -> None:
    raw = _raw(stem)
    raw["zz_future"] = {"nested": [1, -2, 3.5, None, b"\x00", {"deeper": True}]}
    raw["a_nan_nobody_reads"] = math.nan
    raw["x"] = None
    for tensor in raw.get("tensors", []):
        tensor["scale"] = 0.5
        tensor["zero_point"] = -3
    assert decode(msgpack.packb(raw, use_bin_type=True)) == GOLDEN[stem]


# ---------------------------------------------------------------- fuzzing


def _decodes_or_rejects(payload: bytes, limits: DecodeLimits | None = None) -> None:
    """Only DecodeError may escape, and whatever decodes must survive a round trip."""
    try:
        msg = decode(payload) if limits is None else decode(payload, limits)
    except DecodeError as exc:
        reason = exc.reason
    else:
        assert isinstance(msg, MESSAGE_TYPES)
        assert decode(encode(msg)) == msg
        return
    assert reason in ("malformed", "oversize")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_decode_error(payload: bytes) -> None:
    _decodes_or_rejects(payload)


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "set"]),
              st.integers(0, 1 << 16), st.integers(0, 255)),
    min_size=1, max_size=8)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(GOLDEN)), MUTATIONS)
def test_mutated_payloads_only_raise_decode_error(
        stem: str, mutations: list[tuple[str, int, int]]) -> None:
    buf = bytearray(GOLDEN_BYTES[stem])
    for op, pos, value in mutations:
        if op == "insert":
            buf.insert(pos % (len(buf) + 1), value)
        elif buf and op == "delete":
            del buf[pos % len(buf)]
        elif buf and op == "flip":
            buf[pos % len(buf)] ^= 1 << (value % 8)
        elif buf:
            buf[pos % len(buf)] = value
    _decodes_or_rejects(bytes(buf))


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)
SHAPES = st.lists(st.integers(-2, (1 << 64) - 1) | st.integers(0, 4), max_size=10)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(GOLDEN)), st.data())
def test_random_field_values_only_raise_decode_error(stem: str, data: st.DataObject) -> None:
    raw = _raw(stem)
    keys = st.sampled_from(sorted({*raw, "unknown"}))
    raw.update(data.draw(st.dictionaries(keys, MSGPACK_VALUES, max_size=3), label="fields"))
    if isinstance(raw.get("tensors"), list) and raw["tensors"]:
        tensor = raw["tensors"][0]
        if isinstance(tensor, dict):
            tensor.update(data.draw(st.dictionaries(
                st.sampled_from(TENSOR_KEYS), MSGPACK_VALUES, max_size=2), label="tensor"))
            tensor["shape"] = data.draw(st.just(tensor.get("shape")) | SHAPES, label="shape")
    limits = data.draw(st.none() | st.builds(
        DecodeLimits, max_payload_bytes=st.integers(0, 1000), max_tensors=st.integers(0, 3),
        max_ndim=st.integers(0, 3), max_elements=st.integers(0, 8),
        max_string=st.integers(0, 20), max_entries=st.integers(0, 3)), label="limits")
    _decodes_or_rejects(msgpack.packb(raw, use_bin_type=True), limits)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_valid_updates_round_trip(data: st.DataObject) -> None:
    names = data.draw(st.lists(st.text(max_size=256), max_size=5, unique=True), label="names")
    tensors = []
    for name in names:
        shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=4), label="shape"))
        size = math.prod(shape)
        raw = data.draw(st.binary(min_size=4 * size, max_size=4 * size), label="data")
        tensors.append(Tensor(name=name, dtype="float32", shape=shape, codec="fp32", data=raw))
    msg = ModelUpdate(
        federation=data.draw(st.text(max_size=256)), device_id=data.draw(st.text(max_size=256)),
        round=data.draw(st.integers(0, MAX_INT)), base_version=data.draw(st.integers(0, MAX_INT)),
        update_id=data.draw(st.text(min_size=1, max_size=256)),
        num_examples=data.draw(st.integers(0, MAX_INT)), tensors=tuple(tensors),
        metrics=data.draw(st.dictionaries(
            st.text(max_size=20), st.floats(allow_nan=False, allow_infinity=False),
            max_size=256)))
    assert decode(encode(msg)) == msg


# ---------------------------------------------------------------- golden bytes


def test_one_golden_file_per_message_kind() -> None:
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.msgpack")) == sorted(CLASS_OF)
    assert sorted(GOLDEN) == sorted(CLASS_OF)


@pytest.mark.parametrize("stem", sorted(GOLDEN))
def test_golden_bytes(stem: str) -> None:
    golden = (GOLDEN_DIR / f"{stem}.msgpack").read_bytes()
    assert encode(GOLDEN[stem]) == golden, (
        f"the wire bytes of {stem!r} changed: if that is intended, rerun "
        "tests/unit/golden/make_golden.py, review the diff and update docs/protocol.md")
    assert decode(golden) == GOLDEN[stem]
    assert isinstance(GOLDEN[stem], CLASS_OF[stem])
    assert msgpack.unpackb(golden)["kind"] == stem


def test_golden_messages_tell_one_consistent_story() -> None:
    announcement, model, update, summary = (
        GOLDEN["round"], GOLDEN["model"], GOLDEN["update"], GOLDEN["summary"])
    assert isinstance(announcement, RoundAnnouncement)
    assert isinstance(model, GlobalModel)
    assert isinstance(update, ModelUpdate)
    assert isinstance(summary, RoundSummary)
    assert model.sha256 == model_digest(model.tensors) == announcement.model_sha256
    assert announcement.base_version == model.version == update.base_version
    assert [(t.name, t.shape) for t in update.tensors] == [(t.name, t.shape) for t in model.tensors]
    assert (update.device_id, update.update_id) in summary.accepted
    assert summary.version == announcement.base_version + 1


# ---------------------------------------------------------------- model_digest


def test_model_digest_follows_the_documented_recipe() -> None:
    tensors = (_t("w", [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), SCALAR, _t("é", np.zeros((0, 2))))
    expected = hashlib.sha256(
        b"w\x002,3\x00" + np.array([1, 2, 3, 4, 5, 6], "<f4").tobytes()
        + b"scalar\x00\x00" + np.array(3.5, "<f4").tobytes()
        + "é".encode() + b"\x000,2\x00").hexdigest()
    assert model_digest(tensors) == expected
    assert model_digest(()) == hashlib.sha256(b"").hexdigest()


def test_model_digest_covers_shape_name_and_order() -> None:
    w = _t("w", np.arange(6.0).reshape(2, 3))
    b = _t("b", [1.0])
    digest = model_digest((w, b))
    assert digest != model_digest((b, w))
    assert digest != model_digest((dataclasses.replace(w, shape=(3, 2)), b))
    assert digest != model_digest((dataclasses.replace(w, name="v"), b))
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


# ---------------------------------------------------------------- docs/protocol.md example


@functools.cache
def _protocol_example() -> dict[str, Any]:
    """Run the worked example of docs/protocol.md and return what it defines."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    heading = re.search(r"^## .*Worked example.*$", text, re.MULTILINE)
    assert heading is not None, "docs/protocol.md lost its worked example"
    block = re.search(r"```python\n(.*?)```", text[heading.end():], re.DOTALL)
    assert block is not None, "docs/protocol.md lost its worked example"
    source = block.group(1)
    imported = set(re.findall(r"^(?:import|from)\s+(\w+)", source, re.MULTILINE))
    assert imported == {"hashlib", "math", "msgpack", "numpy"}, imported
    namespace: dict[str, Any] = {"__name__": "protocol_example"}
    exec(compile(source, str(PROTOCOL_MD), "exec"), namespace)
    return namespace


def test_protocol_example_reads_the_golden_model_without_fedmq() -> None:
    read_model = _protocol_example()["read_model"]
    model = GOLDEN["model"]
    assert isinstance(model, GlobalModel)
    version, weights = read_model((GOLDEN_DIR / "model.msgpack").read_bytes())
    assert version == model.version
    expected = decode_all(model.tensors)
    assert list(weights) == list(expected)
    for name, array in weights.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, expected[name])
    np.testing.assert_array_equal(weights["dense/bias"], [1.5, -2.5, 0.75])


def test_protocol_example_detects_a_corrupt_model() -> None:
    read_model = _protocol_example()["read_model"]
    raw = _raw("model")
    data = bytearray(raw["tensors"][1]["data"])
    data[0] ^= 1
    raw["tensors"][1]["data"] = bytes(data)
    with pytest.raises(ValueError, match="sha256"):
        read_model(msgpack.packb(raw, use_bin_type=True))


def test_protocol_example_builds_the_golden_update() -> None:
    make_update = _protocol_example()["make_update"]
    update = GOLDEN["update"]
    assert isinstance(update, ModelUpdate)
    payload = make_update(update.federation, update.device_id, update.round,
                          update.base_version, update.update_id, update.num_examples,
                          dict(decode_all(update.tensors)), dict(update.metrics))
    assert payload == GOLDEN_BYTES["update"]
    assert decode_as(payload, ModelUpdate) == update


def test_protocol_example_update_from_float64_arrays_is_valid() -> None:
    make_update = _protocol_example()["make_update"]
    kernel = np.arange(6.0).reshape(3, 2).T  # float64 and not C-contiguous
    deltas = {"w": kernel, "b": np.float64(0.5)}
    msg = decode_as(make_update("demo", "d1", 4, 3, "u", 10, deltas), ModelUpdate)
    assert msg.tensors == (_t("w", [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]), _t("b", 0.5))
    assert msg.tensors[1].shape == ()
    assert msg.metrics == {}


@settings(max_examples=300, deadline=None)
@given(st.integers(0, MAX_INT), st.integers(0, MAX_INT), st.text(max_size=64),
       st.floats(0.0, 1.0))
def test_protocol_example_sampling_matches_fedmq_sampling(
        seed: int, round_: int, device: str, rate: float) -> None:
    doc_selected = _protocol_example()["selected"]
    assert doc_selected(seed, round_, device, rate) == sampling.selected(seed, round_, device, rate)
    assert doc_selected(seed, round_, device, 1.0)
    assert not doc_selected(seed, round_, device, 0.0)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunk"])
def test_empty_update_id_is_malformed(chunked: bool) -> None:
    """An update's id tells its duplicates apart within the round: an empty one is refused."""
    changes: dict[str, Any] = {"chunk": 1, "chunks": 2} if chunked else {}
    payload = encode(_update(SCALAR, update_id="", **changes))
    with pytest.raises(DecodeError, match="'update_id' is empty") as info:
        decode(payload)
    assert info.value.reason == "malformed"
    ok = decode_as(encode(_update(SCALAR, update_id="u", **changes)), ModelUpdate)
    assert ok.update_id == "u"
