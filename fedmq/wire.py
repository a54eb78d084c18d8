"""The fedmq wire schema, version 1: one small frozen class per message kind.

Every message travels as a msgpack map with ``"v"`` (schema version), ``"kind"`` (the tag below)
and ``"fed"`` (federation name); ``fedmq.codec`` turns these classes into bytes and back, and
``docs/protocol.md`` spells the byte layout out for other languages.

=========================  ==========  =================================
class                      kind        topic
=========================  ==========  =================================
``RoundAnnouncement``      ``round``   ``fedmq/v1/{fed}/round``
``GlobalModel``            ``model``   ``fedmq/v1/{fed}/model``
``ModelUpdate``            ``update``  ``fedmq/v1/{fed}/update/{device}``
``DeviceStatus``           ``status``  ``fedmq/v1/{fed}/status/{device}``
``RoundSummary``           ``summary`` ``fedmq/v1/{fed}/metrics``
``Evaluation``             ``eval``    ``fedmq/v1/{fed}/eval/{device}``
``ModelEvaluation``        ``model_eval`` ``fedmq/v1/{fed}/metrics/eval``
``RoundProgress``          ``progress`` ``fedmq/v1/{fed}/metrics/progress``
``StatisticsResult``       ``result``  ``fedmq/v1/{fed}/result``
=========================  ==========  =================================

Evolving the schema: a new optional field may be added under the same ``"v"`` (decoders ignore
fields they do not know, so old readers keep working); removing a field, making one required or
changing the meaning or type of one needs ``"v": 2``, and a decoder rejects versions it does not
know. Field names are short on purpose: the update is sent by every device every round.

This module is pure data: no msgpack, no sockets, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

SCHEMA_VERSION = 1

#: Codecs a tensor's ``data`` may be encoded with (docs/protocol.md, "Codecs"):
#: ``fp32`` little-endian float32; ``fp16`` little-endian IEEE half; ``int8`` int8 values times a
#: float32 scale per block of ``block`` values; ``topk`` a sparse subset: uint32 ``indices`` and
#: their values as int8 (block-wise scales, like ``int8``) or fp16.
#: Encoded tensor bytes: ``bytes`` when a device encodes them, a read-only ``memoryview`` into
#: the received payload when ``codec.decode`` read them (large fields are not copied).
Blob: TypeAlias = bytes | memoryview

CODECS: tuple[str, ...] = ("fp32", "fp16", "int8", "topk")

#: The codec of statistics contributions (federated analytics, ``fedmq.statistics``): the values
#: as little-endian float64, with ``dtype`` "float64" (the only pairing of either). Not in
#: ``CODECS``: model updates never use it, and the aggregator's fold kernels do not know it.
FP64 = "fp64"

#: Value encodings of a ``topk`` tensor.
TOPK_VALUES: tuple[str, ...] = ("int8", "fp16")

#: Round modes an announcement may name (``RoundAnnouncement.mode``).
ROUND_MODES: tuple[str, ...] = ("sync", "async")

DeviceState = Literal["online", "training", "offline"]
DEVICE_STATES: tuple[str, ...] = ("online", "training", "offline")

#: A metric value: scalars only, so any msgpack reader can show them.
Metrics = Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Tensor:
    """One named tensor, or a range of it, encoded with ``codec``.

    ``shape`` is always the whole tensor's shape. ``offset`` and ``count`` select the elements
    ``[offset, offset + count)`` of the flattened (C order) tensor that ``data`` carries; a chunk
    of a large update carries a range, an unchunked one the whole tensor (``count`` None).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    data: Blob
    offset: int = 0
    count: int | None = None
    #: int8 (and topk with int8 values): values per float32 scale.
    block: int = 0
    #: int8 / topk-int8: little-endian float32 scales, one per block.
    scales: Blob = b""
    #: topk: little-endian uint32 positions, strictly increasing, relative to ``offset``.
    indices: Blob = b""
    #: topk: how the kept values are encoded, "int8" or "fp16".
    values: str = ""

    @property
    def size(self) -> int:
        """Number of elements of the whole tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def span(self) -> int:
        """Number of elements this entry covers (``count``, or the rest of the tensor)."""
        return self.size - self.offset if self.count is None else self.count

    @property
    def nnz(self) -> int:
        """Number of values carried: ``span``, or the number of indices for topk."""
        return len(self.indices) // 4 if self.codec == "topk" else self.span


@dataclass(frozen=True, slots=True)
class Signature:
    """An Ed25519 signature by the aggregator's key (``fedmq.signing``, docs/protocol.md 5b).

    ``signed`` holds the exact bytes signed: a round announcement's own payload without ``sig``,
    or a model's ``ModelManifest``; ``key`` names the public key (``signing.key_id``).
    """

    key: str
    signed: Blob
    ed25519: Blob


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """What a model's signature covers: its identity, its tensors' names, shapes and codec, its
    digest, its ``metrics`` and ``created`` and, for a chunked model, the SHA-256 of each part's
    payload (32 bytes each)."""

    federation: str
    run: int
    version: int
    round: int
    sha256: str
    chunks: int = 1
    codec: str = "fp32"
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    parts: tuple[bytes, ...] = ()
    #: The model's own, so that no one can restate how a signed version trained.
    metrics: Metrics = field(default_factory=dict)
    created: float = 0.0


@dataclass(frozen=True, slots=True)
class StatsColumn:
    """One column of a statistics query: its name and its histogram's bin edges (float64,
    strictly increasing, at least two: bin i holds ``edges[i] <= x < edges[i+1]``, the last bin
    also ``x == edges[-1]``, numpy.histogram's rule)."""

    name: str
    edges: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class RoundAnnouncement:
    """The aggregator opens (or extends, or ends) a round; retained on the round topic."""

    federation: str
    round: int
    base_version: int
    model_sha256: str
    deadline: float
    min_updates: int
    max_updates: int
    train: Mapping[str, float | int | str] = field(default_factory=dict)
    sample_seed: int = 0
    sample_rate: float = 1.0
    codec: str = "fp32"
    open: bool = True
    #: Codec options: ``block`` (int8), ``fraction`` and ``values`` (topk).
    codec_params: Mapping[str, float | int | str] = field(default_factory=dict)
    #: Devices split updates larger than this into chunks (0: no limit from the aggregator).
    max_chunk_bytes: int = 0
    #: The aggregator's run (see ``newer``); 0 when the sender does not give one.
    run: int = 0
    #: Redraws of this round's sample: each extension of a round below quorum adds one, and a
    #: device takes part if any of the draws 0..sample_draw selects it (``fedmq.sampling``).
    sample_draw: int = 0
    #: What devices compute: "train" (a model update) or "statistics" (federated analytics:
    #: a contribution for each of ``columns``, ``fedmq.statistics``).
    task: str = "train"
    #: The statistics query: each column and its histogram's bin edges.
    columns: tuple[StatsColumn, ...] = ()
    #: "sync", or "async" (buffered asynchronous rounds, FedBuff): devices train from the newest
    #: model they hold, at most once per version, and the aggregator folds updates up to
    #: ``max_staleness`` versions old with a smaller weight (docs/rounds.md).
    mode: str = "sync"
    #: async: updates built on a version more than this many versions behind ``base_version``
    #: are rejected as stale (0 in sync mode, where only ``base_version`` itself counts).
    max_staleness: int = 0
    #: The aggregator's signature (absent when it has no signing key).
    sig: Signature | None = None


@dataclass(frozen=True, slots=True)
class GlobalModel:
    """A version of the global model; retained on the model topic."""

    federation: str
    version: int
    round: int
    tensors: tuple[Tensor, ...]
    sha256: str
    metrics: Metrics = field(default_factory=dict)
    created: float = 0.0
    #: A model too large for one message is published as a manifest (``chunks`` > 1, ``chunk``
    #: None, no tensors) on the model topic and ``chunks`` parts (``chunk`` = 0..chunks-1, tensor
    #: ranges) on ``model/part/{i}``; ``sha256`` is the whole model's in all of them.
    chunk: int | None = None
    chunks: int = 1
    #: The aggregator's run that published this version; 0 when not given.
    run: int = 0
    #: The aggregator's signature, on a whole model or a chunked model's manifest (not parts).
    sig: Signature | None = None


@dataclass(frozen=True, slots=True)
class ModelUpdate:
    """One device's contribution to one round: the delta from the base model, per tensor."""

    federation: str
    device_id: str
    round: int
    base_version: int
    update_id: str
    num_examples: int
    tensors: tuple[Tensor, ...]
    metrics: Metrics = field(default_factory=dict)
    #: An update too large for one message travels as ``chunks`` messages (``chunk`` =
    #: 0..chunks-1), each with the full header and some tensor ranges.
    chunk: int = 0
    chunks: int = 1
    #: The run of the announcement this update answers; 0 when not given.
    run: int = 0


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A device's presence; retained, and set to ``offline`` by the broker via the last will."""

    federation: str
    device_id: str
    state: str
    agent_version: str = ""
    capabilities: tuple[str, ...] = ()
    ts: float = 0.0
    #: Messages the device ignored or refused since it started, by reason (``old_model``,
    #: ``unsigned``, ``bad_signature``, ...; docs/protocol.md); empty from older agents.
    ignored: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoundSummary:
    """What happened in a closed round; published on the metrics topic."""

    federation: str
    round: int
    version: int
    participants: int
    closed_by: str
    accepted: tuple[tuple[str, str], ...] = ()
    rejected: Mapping[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    duration_s: float = 0.0
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A device's evaluation of global model ``version`` on its held-out data (not retained).

    ``metrics`` holds at least ``loss`` and ``accuracy`` for the built-in trainers (any scalar a
    trainer's ``evaluate`` gives is carried); ``num_examples`` is the size of the held-out set,
    the report's weight in the federation's mean.
    """

    federation: str
    device_id: str
    version: int
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    #: The run of the model evaluated (``newer``); 0 when not given.
    run: int = 0
    ts: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelEvaluation:
    """The federated evaluation of model ``version``: example-weighted means of the devices'
    reports on that version (``eval_loss``, ``eval_accuracy``, ...). Retained; published again
    as more reports arrive, so the latest one for a version holds all reports so far."""

    federation: str
    version: int
    devices: int
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    run: int = 0
    ts: float = 0.0


@dataclass(frozen=True, slots=True)
class RoundProgress:
    """The open round as the aggregator sees it: updates in against the quorum, the deadline,
    rejections so far. Retained; published when it changes (at most about once a second)."""

    federation: str
    round: int
    base_version: int
    accepted: int
    min_updates: int
    max_updates: int
    deadline: float
    rejected: Mapping[str, int] = field(default_factory=dict)
    run: int = 0
    ts: float = 0.0


@dataclass(frozen=True, slots=True)
class ColumnStatistics:
    """The federated statistics of one column over the values of every contributing device.

    ``hist[i]`` counts the values in bin ``i`` of ``edges``; ``underflow`` / ``overflow`` those
    below ``edges[0]`` / above ``edges[-1]``, so ``count = underflow + sum(hist) + overflow``.
    ``variance`` is the population variance (numpy's ``var``, ddof 0), ``sample_variance`` the
    unbiased one (ddof 1). With no values, mean, variance, min and max are None (absent on the
    wire); ``sample_variance`` needs two values. ``devices``: contributions with values in it.
    """

    name: str
    count: int
    mean: float | None
    variance: float | None
    sample_variance: float | None
    min: float | None
    max: float | None
    edges: tuple[float, ...]
    hist: tuple[int, ...]
    underflow: int = 0
    overflow: int = 0
    devices: int = 0


@dataclass(frozen=True, slots=True)
class StatisticsResult:
    """A statistics round's result: retained on ``fedmq/v1/{fed}/result``. ``devices`` are the
    ids whose contributions it covers (the round's accepted ones), sorted."""

    federation: str
    round: int
    version: int
    devices: tuple[str, ...]
    columns: tuple[ColumnStatistics, ...]
    closed_by: str = ""
    run: int = 0
    ts: float = 0.0


Message = (RoundAnnouncement | GlobalModel | ModelUpdate | DeviceStatus | RoundSummary
           | Evaluation | ModelEvaluation | RoundProgress | StatisticsResult)


def newer(run: int, number: int, than_run: int, than_number: int) -> bool:
    """Whether ``(run, number)`` (a model version or a round) comes after ``(than_run,
    than_number)``: a later run always does, whatever its numbers.

    An aggregator that starts without state to resume (a first start, a rollback, a restart
    without ``state_dir``) begins a new run: versions and rounds count from 0 and 1 again, and its
    ``run`` (its start time in milliseconds since the epoch) is larger than any earlier run's, so
    receivers that order by ``(run, number)`` follow the new run without a restart. A recovered
    aggregator keeps its run. ``run`` 0 means the sender gave none (older peers): it orders first.
    """
    return (run, number) > (than_run, than_number)


def model_digest(tensors: Iterable[Tensor]) -> str:
    """SHA-256 (hex) over each tensor's name, shape and data, in order (see docs/protocol.md)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.name.encode())
        h.update(b"\0")
        h.update(",".join(str(d) for d in t.shape).encode())
        h.update(b"\0")
        h.update(t.data)
    return h.hexdigest()


def blocks(n: int, block: int) -> int:
    """Number of scale blocks for ``n`` values in blocks of ``block``."""
    return -(-n // block) if n else 0
