"""Bytes to ``fedmq.wire`` messages and back (msgpack; ``msgpack_views`` unpacks without copies).

``encode(message) -> bytes`` and ``decode(payload, limits) -> message``. Decoding never trusts the
payload: sizes are capped before unpacking, every field's type is checked, every tensor's byte
length is checked against its declared shape and codec before anything is allocated, unknown
fields are ignored and a missing required one is an error. Any failure is a ``DecodeError`` whose
``reason`` is ``"oversize"`` or ``"malformed"``; nothing else escapes. The field reader and the
limits are ``codec_fields``; the statistics task's fields ``codec_stats``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgpack

from fedmq import codec_stats
from fedmq.codec_fields import DEFAULT_LIMITS, DecodeLimits
from fedmq.codec_fields import Fields as _Fields
from fedmq.codec_fields import is_int as _is_int
from fedmq.codec_fields import is_number as _is_number
from fedmq.codec_stats import MAX_BINS, MAX_COLUMNS, TASKS
from fedmq.errors import DecodeError
from fedmq.msgpack_views import unpack
from fedmq.wire import (
    CODECS,
    DEVICE_STATES,
    FP64,
    ROUND_MODES,
    SCHEMA_VERSION,
    TOPK_VALUES,
    Blob,
    DeviceStatus,
    Evaluation,
    GlobalModel,
    Message,
    ModelEvaluation,
    ModelManifest,
    ModelUpdate,
    RoundAnnouncement,
    RoundProgress,
    RoundSummary,
    Signature,
    StatisticsResult,
    Tensor,
    blocks,
)

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_BINS",
    "MAX_CHUNKS",
    "MAX_COLUMNS",
    "MAX_DRAWS",
    "MAX_SIGNED",
    "TASKS",
    "DecodeLimits",
    "decode",
    "decode_as",
    "decode_manifest",
    "encode",
    "encode_manifest",
]

M = TypeVar("M", RoundAnnouncement, GlobalModel, ModelUpdate, DeviceStatus, RoundSummary,
            Evaluation, ModelEvaluation, RoundProgress, StatisticsResult)


# ---------------------------------------------------------------- encoding


def _tensor_map(t: Tensor) -> dict[str, Any]:
    m: dict[str, Any] = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                         "codec": t.codec, "data": t.data}
    # Optional fields only when they carry something: an fp32 whole tensor stays minimal.
    if t.offset or t.count is not None:
        m["offset"] = t.offset
        m["count"] = t.span
    if t.block:
        m["block"] = t.block
    if t.scales:
        m["scales"] = t.scales
    if t.codec == "topk":
        m["indices"] = t.indices
        m["values"] = t.values
    return m


def _to_map(msg: Message) -> dict[str, Any]:
    head: dict[str, Any] = {"v": SCHEMA_VERSION, "fed": msg.federation}
    match msg:
        case RoundAnnouncement():
            return head | {
                "kind": "round", "round": msg.round, "base_version": msg.base_version,
                "model_sha256": msg.model_sha256, "deadline": float(msg.deadline),
                "min_updates": msg.min_updates, "max_updates": msg.max_updates,
                "train": dict(msg.train), "sample_seed": msg.sample_seed,
                "sample_rate": float(msg.sample_rate), "codec": msg.codec, "open": msg.open,
            } | ({"codec_params": dict(msg.codec_params)} if msg.codec_params else {}) | (
                {"max_chunk_bytes": msg.max_chunk_bytes} if msg.max_chunk_bytes else {}) | (
                {"run": msg.run} if msg.run else {}) | (
                {"sample_draw": msg.sample_draw} if msg.sample_draw else {}) | (
                {"mode": msg.mode} if msg.mode != "sync" else {}) | (
                {"max_staleness": msg.max_staleness} if msg.max_staleness else {}) | (
                codec_stats.task_map(msg) if msg.task != "train" or msg.columns else {}) | (
                _sig_map(msg.sig))
        case GlobalModel():
            m = head | {
                "kind": "model", "version": msg.version, "round": msg.round,
                "tensors": [_tensor_map(t) for t in msg.tensors], "sha256": msg.sha256,
                "metrics": dict(msg.metrics), "created": float(msg.created),
            }
            if msg.chunks != 1:  # only chunked models carry these (the manifest: no "chunk")
                m["chunks"] = msg.chunks
                if msg.chunk is not None:
                    m["chunk"] = msg.chunk
            if msg.run:
                m["run"] = msg.run
            return m | _sig_map(msg.sig)
        case ModelUpdate():
            m = head | {
                "kind": "update", "device": msg.device_id, "round": msg.round,
                "base_version": msg.base_version, "update_id": msg.update_id,
                "num_examples": msg.num_examples,
                "tensors": [_tensor_map(t) for t in msg.tensors], "metrics": dict(msg.metrics),
            }
            if msg.chunks != 1:
                m["chunk"] = msg.chunk
                m["chunks"] = msg.chunks
            if msg.run:
                m["run"] = msg.run
            return m
        case DeviceStatus():
            return head | {
                "kind": "status", "device": msg.device_id, "state": msg.state,
                "agent_version": msg.agent_version, "capabilities": list(msg.capabilities),
                "ts": float(msg.ts),
            } | ({"ignored": dict(msg.ignored)} if msg.ignored else {})
        case RoundSummary():
            return head | {
                "kind": "summary", "round": msg.round, "version": msg.version,
                "participants": msg.participants, "closed_by": msg.closed_by,
                "accepted": [list(a) for a in msg.accepted], "rejected": dict(msg.rejected),
                "bytes_in": msg.bytes_in, "duration_s": float(msg.duration_s),
                "metrics": dict(msg.metrics),
            }
        case Evaluation():
            return head | {
                "kind": "eval", "device": msg.device_id, "version": msg.version,
                "num_examples": msg.num_examples, "metrics": dict(msg.metrics),
                "ts": float(msg.ts)} | ({"run": msg.run} if msg.run else {})
        case ModelEvaluation():
            return head | {
                "kind": "model_eval", "version": msg.version, "devices": msg.devices,
                "num_examples": msg.num_examples, "metrics": dict(msg.metrics),
                "ts": float(msg.ts)} | ({"run": msg.run} if msg.run else {})
        case RoundProgress():
            return head | {
                "kind": "progress", "round": msg.round, "base_version": msg.base_version,
                "accepted": msg.accepted, "min_updates": msg.min_updates,
                "max_updates": msg.max_updates, "deadline": float(msg.deadline),
                "rejected": dict(msg.rejected), "ts": float(msg.ts),
            } | ({"run": msg.run} if msg.run else {})
        case StatisticsResult():
            return head | {
                "kind": "result", "round": msg.round, "version": msg.version,
                "devices": list(msg.devices),
                "columns": [codec_stats.column_map(c) for c in msg.columns],
                "closed_by": msg.closed_by, "ts": float(msg.ts),
            } | ({"run": msg.run} if msg.run else {})
    raise TypeError(f"not a fedmq message: {type(msg).__name__}")


def _sig_map(sig: Signature | None) -> dict[str, Any]:
    """The optional ``sig`` entry, written last (docs/protocol.md, 5b)."""
    if sig is None:
        return {}
    return {"sig": {"key": sig.key, "signed": sig.signed, "ed25519": sig.ed25519}}


def encode_manifest(m: ModelManifest) -> bytes:
    """The bytes a model's signature covers (``Signature.signed``)."""
    out: bytes = msgpack.packb({
        "v": SCHEMA_VERSION, "kind": "model", "fed": m.federation, "run": m.run,
        "version": m.version, "round": m.round, "sha256": m.sha256, "chunks": m.chunks,
        "codec": m.codec, "shapes": [[name, list(shape)] for name, shape in m.shapes],
        "parts": list(m.parts), "metrics": dict(m.metrics), "created": float(m.created)},
        use_bin_type=True)
    return out


def encode(msg: Message) -> bytes:
    """Serialise a message to msgpack bytes."""
    out: bytes = msgpack.packb(_to_map(msg), use_bin_type=True)
    return out


# ---------------------------------------------------------------- decoding


_NO_BYTES: Blob = b""


def _tensor(raw: Any, i: int, limits: DecodeLimits) -> Tensor:
    where = f"tensor {i}"
    if not isinstance(raw, dict):
        raise DecodeError(f"{where}: must be a map")
    f = _Fields(raw, where, limits)
    name = f.str_("name")
    dtype = f.str_("dtype")
    codec = f.str_("codec")
    shape_raw = f.list_("shape")
    if len(shape_raw) > limits.max_ndim:
        raise DecodeError(f"{where} {name!r}: {len(shape_raw)} dimensions, at most "
                          f"{limits.max_ndim} allowed")
    if not all(_is_int(d) and d >= 0 for d in shape_raw):
        raise DecodeError(f"{where} {name!r}: shape must be non-negative integers")
    shape = tuple(int(d) for d in shape_raw)
    size = math.prod(shape)
    # Zeros are left out of the product: (0, 2**31, 2**31) holds no data but numpy rejects it.
    if math.prod(d for d in shape if d) > limits.max_elements:
        raise DecodeError(f"{where} {name!r}: shape {list(shape)} exceeds the limit of "
                          f"{limits.max_elements} elements", reason="oversize")
    # float64 travels only as fp64, and fp64 only as float64 (statistics contributions).
    wide = dtype == "float64" and codec == FP64
    if dtype != "float32" and not wide:
        raise DecodeError(f"{where} {name!r}: dtype {dtype!r} is not supported (float32; "
                          f"float64 with codec {FP64})")
    if codec not in CODECS and not wide:
        raise DecodeError(f"{where} {name!r}: codec {codec!r} is not supported "
                          f"({', '.join(CODECS)})")
    offset = f.optional("offset", f.int_, 0)
    count = f.optional("count", f.int_, size - offset)
    if offset + count > size:
        raise DecodeError(f"{where} {name!r}: range [{offset}, {offset + count}) is outside "
                          f"the tensor's {size} elements")
    block = f.optional("block", lambda k: f.int_(k, 1, 1 << 24), 0)
    scales = f.optional("scales", f.bytes_, _NO_BYTES)
    indices = f.optional("indices", f.bytes_, _NO_BYTES)
    values = f.optional("values", f.str_, "")
    data = f.bytes_("data")
    nnz = count
    if codec == "topk":
        if values not in TOPK_VALUES:
            raise DecodeError(f"{where} {name!r}: topk values {values!r} must be one of "
                              f"{', '.join(TOPK_VALUES)}")
        if len(indices) % 4 or len(indices) // 4 > count:
            raise DecodeError(f"{where} {name!r}: {len(indices)} index bytes is not a whole "
                              f"number of uint32 at most {count}")
        nnz = len(indices) // 4
    elif indices:
        raise DecodeError(f"{where} {name!r}: indices are only allowed with codec topk")
    value_codec = values if codec == "topk" else codec
    itemsize = {"fp32": 4, "fp16": 2, "int8": 1, FP64: 8}[value_codec]
    if len(data) != nnz * itemsize:
        raise DecodeError(f"{where} {name!r}: {len(data)} data bytes, {nnz} values with codec "
                          f"{value_codec} need {nnz * itemsize}")
    if value_codec == "int8":
        if not block:
            raise DecodeError(f"{where} {name!r}: int8 values need a positive block size")
        if len(scales) != 4 * blocks(nnz, block):
            raise DecodeError(f"{where} {name!r}: {len(scales)} scale bytes, {nnz} values in "
                              f"blocks of {block} need {4 * blocks(nnz, block)}")
    elif scales or block:
        raise DecodeError(f"{where} {name!r}: scales and block are only for int8 values")
    return Tensor(name=name, dtype=dtype, shape=shape, codec=codec, data=data, offset=offset,
                  count=None if (offset == 0 and count == size) else count, block=block,
                  scales=scales, indices=indices, values=values)


def _tensors(f: _Fields) -> tuple[Tensor, ...]:
    raw = f.list_("tensors")
    if len(raw) > f.limits.max_tensors:
        raise DecodeError(f"{f.where}: {len(raw)} tensors, at most {f.limits.max_tensors}",
                          reason="oversize")
    tensors = tuple(_tensor(t, i, f.limits) for i, t in enumerate(raw))
    if len({t.name for t in tensors}) != len(tensors):
        raise DecodeError(f"{f.where}: tensor names are not unique")
    return tensors


def _settings(f: _Fields, key: str) -> dict[str, float | int | str]:
    """A small map of option name to number or string (``train``, ``codec_params``)."""
    raw: Mapping[str, Any] = f.optional(key, f.map_, {})
    if len(raw) > f.limits.max_entries:
        raise DecodeError(f"{f.where}: {key!r} has too many entries")
    out: dict[str, float | int | str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not (_is_number(v) or isinstance(v, str)):
            raise DecodeError(f"{f.where}: {key!r} must map strings to numbers or strings")
        if isinstance(v, float) and not math.isfinite(v):
            raise DecodeError(f"{f.where}: {key!r}[{k!r}] is not finite")
        out[k] = v
    return out


#: Largest ``sig.signed``: a manifest of the most tensors with the longest names and shapes,
#: and a SHA-256 for each of the most parts.
MAX_SIGNED = 8 << 20
#: Length of an Ed25519 signature.
ED25519_BYTES = 64


def _sig(f: _Fields) -> Signature | None:
    """The optional ``sig`` map of a round announcement or a model (docs/protocol.md, 5b)."""
    if "sig" not in f.m:
        return None
    s = _Fields(f.map_("sig"), f"{f.where}: sig", f.limits)
    signed, signature = s.bytes_("signed"), s.bytes_("ed25519")
    if len(signed) > MAX_SIGNED or len(signature) != ED25519_BYTES:
        raise DecodeError(f"{s.where}: signed must be at most {MAX_SIGNED} bytes and ed25519 "
                          f"exactly {ED25519_BYTES}")
    return Signature(key=s.str_("key"), signed=signed, ed25519=signature)


def decode_manifest(payload: bytes | bytearray | memoryview,
                    limits: DecodeLimits = DEFAULT_LIMITS) -> ModelManifest:
    """Decode a model's signed manifest (``Signature.signed``); raises ``DecodeError`` only."""
    try:
        raw = _unpack(payload, limits)
    except Exception as exc:
        raise DecodeError(f"manifest: not a valid msgpack document: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeError("manifest: must be a map")
    f = _Fields(raw, "manifest", limits)
    if f.int_("v") != SCHEMA_VERSION or f.str_("kind") != "model":
        raise DecodeError("manifest: not a version 1 model manifest")
    chunks = f.int_("chunks", 1, MAX_CHUNKS)
    shapes_raw, parts_raw = f.list_("shapes"), f.list_("parts")
    if len(shapes_raw) > limits.max_tensors:
        raise DecodeError("manifest: too many shapes", reason="oversize")
    shapes = []
    for item in shapes_raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and len(item[0]) <= limits.max_string and isinstance(item[1], list)
                and len(item[1]) <= limits.max_ndim
                and all(_is_int(d) and d >= 0 for d in item[1])):
            raise DecodeError("manifest: shapes must be [name, [dimensions]] pairs")
        shapes.append((item[0], tuple(item[1])))
    if not all(isinstance(p, bytes | memoryview) and len(p) == 32 for p in parts_raw) or (
            parts_raw and len(parts_raw) != chunks) or (chunks > 1 and not parts_raw):
        raise DecodeError("manifest: parts must be one 32-byte SHA-256 per part of a chunked "
                          "model, none for a whole one")
    f.map_("metrics")  # required: a manifest without it would let anyone restate the metrics
    return ModelManifest(
        federation=f.str_("fed"), run=f.int_("run"), version=f.int_("version"),
        round=f.int_("round"), sha256=f.str_("sha256"), chunks=chunks, codec=f.str_("codec"),
        shapes=tuple(shapes), parts=tuple(bytes(p) for p in parts_raw),
        metrics=f.scalars("metrics"),
        created=f.float_("created"))


def _round(f: _Fields, fed: str) -> RoundAnnouncement:
    rate = f.optional("sample_rate", f.float_, 1.0)
    if not 0.0 <= rate <= 1.0:
        raise DecodeError(f"round: sample_rate {rate} is outside [0, 1]")
    mode = f.optional("mode", f.str_, "sync")
    if mode not in ROUND_MODES:  # a device must not train by rules it does not know
        raise DecodeError(f"round: mode {mode!r} is not one of {', '.join(ROUND_MODES)}")
    return RoundAnnouncement(
        federation=fed, round=f.int_("round"), base_version=f.int_("base_version"),
        model_sha256=f.str_("model_sha256"), deadline=f.float_("deadline"),
        min_updates=f.int_("min_updates"), max_updates=f.int_("max_updates"),
        train=_settings(f, "train"), sample_seed=f.optional("sample_seed", f.int_, 0),
        sample_rate=rate, codec=f.optional("codec", f.str_, "fp32"),
        open=f.optional("open", f.bool_, True), codec_params=_settings(f, "codec_params"),
        max_chunk_bytes=f.optional("max_chunk_bytes", f.int_, 0), run=_run(f),
        sample_draw=f.optional("sample_draw", lambda k: f.int_(k, 0, MAX_DRAWS), 0),
        mode=mode, max_staleness=f.optional("max_staleness", f.int_, 0),
        task=codec_stats.task(f), columns=codec_stats.query(f), sig=_sig(f),
    )


#: Most redraws of one round's sample a device evaluates (a round extended more often than this
#: keeps the last draw's sample).
MAX_DRAWS = 1 << 16


def _run(f: _Fields) -> int:
    """The optional ``run`` (``wire.newer``): a non-negative integer, 0 when absent."""
    return f.optional("run", f.int_, 0)


#: Most chunks one update or model may be split into.
MAX_CHUNKS = 1 << 16


def _model(f: _Fields, fed: str) -> GlobalModel:
    chunks = f.optional("chunks", lambda k: f.int_(k, 1, MAX_CHUNKS), 1)
    chunk = f.optional("chunk", lambda k: f.int_(k, 0, chunks - 1), None)
    return GlobalModel(
        federation=fed, version=f.int_("version"), round=f.int_("round"), tensors=_tensors(f),
        sha256=f.str_("sha256"), metrics=f.scalars("metrics"),
        created=f.optional("created", f.float_, 0.0), chunk=chunk, chunks=chunks, run=_run(f),
        sig=_sig(f),
    )


def _update(f: _Fields, fed: str) -> ModelUpdate:
    chunks = f.optional("chunks", lambda k: f.int_(k, 1, MAX_CHUNKS), 1)
    # The update's identity within the round (duplicates are told apart by it): never empty.
    update_id = f.str_("update_id")
    if not update_id:
        raise DecodeError("update: field 'update_id' is empty")
    return ModelUpdate(
        federation=fed, device_id=f.str_("device"), round=f.int_("round"),
        base_version=f.int_("base_version"), update_id=update_id,
        num_examples=f.int_("num_examples"), tensors=_tensors(f), metrics=f.scalars("metrics"),
        chunk=f.optional("chunk", lambda k: f.int_(k, 0, chunks - 1), 0), chunks=chunks,
        run=_run(f),
    )


def _status(f: _Fields, fed: str) -> DeviceStatus:
    state = f.str_("state")
    if state not in DEVICE_STATES:
        raise DecodeError(f"status: state {state!r} is not one of {', '.join(DEVICE_STATES)}")
    caps: list[Any] = f.optional("capabilities", f.list_, [])
    if len(caps) > f.limits.max_entries or not all(isinstance(c, str) for c in caps):
        raise DecodeError("status: capabilities must be a short list of strings")
    return DeviceStatus(
        federation=fed, device_id=f.str_("device"), state=state,
        agent_version=f.optional("agent_version", f.str_, ""), capabilities=tuple(caps),
        ts=f.optional("ts", f.float_, 0.0), ignored=_counts(f, "ignored"),
    )


def _summary(f: _Fields, fed: str) -> RoundSummary:
    accepted_raw: list[Any] = f.optional("accepted", f.list_, [])
    accepted: list[tuple[str, str]] = []
    for a in accepted_raw:
        if not (isinstance(a, list) and len(a) == 2 and all(isinstance(s, str) for s in a)):
            raise DecodeError("summary: accepted must be a list of [device, update_id] pairs")
        accepted.append((a[0], a[1]))
    return RoundSummary(
        federation=fed, round=f.int_("round"), version=f.int_("version"),
        participants=f.int_("participants"), closed_by=f.str_("closed_by"),
        accepted=tuple(accepted), rejected=_counts(f, "rejected"),
        bytes_in=f.optional("bytes_in", f.int_, 0),
        duration_s=f.optional("duration_s", f.float_, 0.0), metrics=f.scalars("metrics"),
    )


def _counts(f: _Fields, key: str) -> dict[str, int]:
    """A map of reason to non-negative count (``rejected``)."""
    raw: Mapping[str, Any] = f.optional(key, f.map_, {})
    if len(raw) > f.limits.max_entries or not all(
            isinstance(k, str) and _is_int(v) and v >= 0 for k, v in raw.items()):
        raise DecodeError(f"{f.where}: {key} must map reasons to non-negative counts")
    return dict(raw)


def _eval(f: _Fields, fed: str) -> Evaluation:
    return Evaluation(
        federation=fed, device_id=f.str_("device"), version=f.int_("version"),
        num_examples=f.int_("num_examples"), metrics=f.scalars("metrics"), run=_run(f),
        ts=f.optional("ts", f.float_, 0.0))


def _model_eval(f: _Fields, fed: str) -> ModelEvaluation:
    return ModelEvaluation(
        federation=fed, version=f.int_("version"), devices=f.int_("devices"),
        num_examples=f.int_("num_examples"), metrics=f.scalars("metrics"), run=_run(f),
        ts=f.optional("ts", f.float_, 0.0))


def _progress(f: _Fields, fed: str) -> RoundProgress:
    return RoundProgress(
        federation=fed, round=f.int_("round"), base_version=f.int_("base_version"),
        accepted=f.int_("accepted"), min_updates=f.int_("min_updates"),
        max_updates=f.int_("max_updates"), deadline=f.float_("deadline"),
        rejected=_counts(f, "rejected"), run=_run(f), ts=f.optional("ts", f.float_, 0.0))


_READERS: Mapping[str, Callable[[_Fields, str], Message]] = {
    "round": _round, "model": _model, "update": _update, "status": _status, "summary": _summary,
    "eval": _eval, "model_eval": _model_eval, "progress": _progress,
    "result": lambda f, fed: codec_stats.result(f, fed, _run(f)),
}


def _unpack(payload: bytes | bytearray | memoryview, limits: DecodeLimits) -> Any:
    """``msgpack_views.unpack`` with the caps ``limits`` sets."""
    return unpack(payload, max_bin_len=limits.max_payload_bytes,
                  max_array_len=max(limits.max_tensors, limits.max_entries, limits.max_ndim,
                                    1 << 16))


def decode(payload: bytes | bytearray | memoryview,
           limits: DecodeLimits = DEFAULT_LIMITS) -> Message:
    """Decode and check one message; raises ``DecodeError`` and nothing else.

    Binary fields of ``VIEW_MIN_BYTES`` or more (tensor data) are read-only views into
    ``payload``, which must therefore not be modified afterwards.
    """
    if len(payload) > limits.max_payload_bytes:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds the limit of "
                          f"{limits.max_payload_bytes}", reason="oversize")
    try:
        raw = _unpack(payload, limits)
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"not a valid msgpack document: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeError(f"a fedmq message is a map, got {type(raw).__name__}")
    head = _Fields(raw, "message", limits)
    version = head.int_("v")
    if version != SCHEMA_VERSION:
        raise DecodeError(f"schema version {version} is not supported (this build reads "
                          f"{SCHEMA_VERSION})")
    kind = head.str_("kind")
    reader = _READERS.get(kind)
    if reader is None:
        raise DecodeError(f"unknown message kind {kind!r}")
    return reader(_Fields(raw, kind, limits), head.str_("fed"))


def decode_as(payload: bytes | bytearray | memoryview, cls: type[M],
              limits: DecodeLimits = DEFAULT_LIMITS) -> M:
    """Decode a payload that must be of one kind (e.g. ``ModelUpdate`` on an update topic)."""
    msg = decode(payload, limits)
    if not isinstance(msg, cls):
        raise DecodeError(f"expected a {cls.__name__}, got a {type(msg).__name__}")
    return msg
