"""The aggregator's write-ahead log and round snapshots (file I/O only; no threads, no clock).

Layout of a state directory::

    snapshot.npz        the state at the last round opening: model, version, round, timing
    wal-00000007.log    records since that snapshot: accepted updates, state-changing ticks
                        and rejections

A record is ``u32 length | u32 crc32 | body`` with body ``u8 kind | f64 now | u16 topic length |
topic | payload``. ``sync`` makes everything appended so far durable (write + fsync) and the
service acknowledges messages to the broker only after it: an update is either in the log or
still the broker's to redeliver. A crash can leave a torn last record; reading stops at the
first record whose length or checksum does not hold, which is exactly the un-synced tail.

A snapshot is written at each round opening (when the accumulator is empty, so it is small) and,
optionally, every so many updates or seconds within a round (then it carries the accumulator and
the round's bookkeeping); either kind carries the server optimizer's state (its moments), if any.
Each time the log moves to a new segment and older segments are deleted, so replay after a crash
covers only what came after the last snapshot.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.durable import atomic_write, fsync_dir

UPDATE = 1  # an accepted update (or a folded chunk): replayed through the same checks
TICK = 2  # a clock tick that changed the round (extend, abandon, close)
REJECT = 3  # a rejected message: its reason (as the topic), so the round's counts survive
COLLECT = 4  # a scale-out worker's round collected by its coordinator (the request's bytes)
ESTIMATE = 5  # a scale-out worker's norm estimate from its coordinator (the message's bytes)

_HEAD = struct.Struct("<II")
_BODY = struct.Struct("<BdH")
SNAPSHOT = "snapshot.npz"
_STATE = "state."  # prefix of the optimizer state's arrays in a snapshot


@dataclass(frozen=True, slots=True)
class Record:
    """One logged event."""

    kind: int
    now: float
    topic: str
    payload: bytes



class WriteAheadLog:
    """Append-only segments of records in ``directory``."""

    def __init__(self, directory: Path, segment: int = 0) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.segment = segment
        self._buffer: list[bytes] = []
        self._must_write = False
        self._file: Any = None  # opened on the first sync: reading never leaves a file open
        self.appended = 0
        self.synced_bytes = 0

    def _path(self, segment: int) -> Path:
        return self.directory / f"wal-{segment:08d}.log"

    def _open(self, segment: int) -> Any:
        return self._path(segment).open("ab")

    def append(self, kind: int, now: float, topic: str = "", payload: bytes = b"",
               lazy: bool = False) -> None:
        """Buffer a record; it is durable only after ``sync``. A ``lazy`` record does not make
        the next ``sync`` write: it goes out with the next record that does (or ``close``)."""
        t = topic.encode()
        body = _BODY.pack(kind, now, len(t)) + t + payload
        self._buffer.append(_HEAD.pack(len(body), zlib.crc32(body)) + body)
        self._must_write = self._must_write or not lazy
        self.appended += 1

    def sync(self, force: bool = False) -> None:
        """Write the buffered records and fsync: after this they survive a crash. Only lazy
        records buffered: nothing is written unless ``force``."""
        if not self._buffer or not (self._must_write or force):
            return
        self._must_write = False
        data = b"".join(self._buffer)
        self._buffer = []
        if self._file is None:
            self._file = self._open(self.segment)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.synced_bytes += len(data)

    def rotate(self, segment: int) -> None:
        """Continue in a new segment and delete the older ones (a snapshot now covers them)."""
        self.sync(force=True)  # lazy records too: they belong to what the snapshot covers
        if self._file is not None:
            self._file.close()
        self.segment = segment
        self._file = self._open(segment)
        fsync_dir(self.directory)
        for old in self.segments():
            if old < segment:
                self._path(old).unlink(missing_ok=True)

    def close(self) -> None:
        self.sync(force=True)
        if self._file is not None:
            self._file.close()
            self._file = None

    def drop(self) -> None:
        """Close without writing the buffer: what a crash does (for tests and fault drills)."""
        self._buffer = []
        self._must_write = False
        if self._file is not None:
            self._file.close()
            self._file = None

    def segments(self) -> list[int]:
        """Segment numbers present, in order."""
        return segments(self.directory)

    def records(self, from_segment: int) -> Iterator[Record]:
        """Every intact record of segments ``>= from_segment``, in order."""
        return read_records(self.directory, from_segment)


def segments(directory: Path) -> list[int]:
    """The log segment numbers in ``directory``, in order."""
    return sorted(int(p.stem[4:]) for p in directory.glob("wal-*.log") if p.stem[4:].isdigit())


def read_records(directory: Path, from_segment: int) -> Iterator[Record]:
    """Every intact record of the segments ``>= from_segment`` in ``directory``, in order."""
    for segment in segments(directory):
        if segment >= from_segment:
            yield from read_segment(directory / f"wal-{segment:08d}.log")


def read_segment(path: Path) -> Iterator[Record]:
    """The records of one segment, stopping at a torn or corrupt tail."""
    data = path.read_bytes()
    pos = 0
    while pos + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, pos)
        body = data[pos + _HEAD.size:pos + _HEAD.size + length]
        if len(body) != length or length < _BODY.size or zlib.crc32(body) != crc:
            return  # the crash happened while this record was being written
        kind, now, tlen = _BODY.unpack_from(body)
        topic = body[_BODY.size:_BODY.size + tlen].decode()
        yield Record(kind, now, topic, body[_BODY.size + tlen:])
        pos += _HEAD.size + length


@dataclass(frozen=True)
class Snapshot:
    """The aggregator's state at a round opening, or in the middle of a round (``acc`` set)."""

    model: Mapping[str, npt.NDArray[np.float32]]
    meta: Mapping[str, Any]
    #: The running weighted sum, for a snapshot taken in the middle of a round.
    acc: npt.NDArray[np.float64] | None = None
    #: The server optimizer's state by name (``Strategy.state``; empty for FedAvg and in
    #: snapshots written before there was any).
    state: Mapping[str, npt.NDArray[np.float64]] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        """Write atomically: a reader sees the old snapshot or the new one, never a mix."""
        meta = dict(self.meta) | {"names": list(self.model)}
        arrays: dict[str, Any] = {f"m{i}": a for i, a in enumerate(self.model.values())}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        if self.acc is not None:
            arrays["acc"] = self.acc
        arrays |= {f"{_STATE}{k}": v for k, v in self.state.items()}
        atomic_write(directory / SNAPSHOT, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, directory: Path) -> Snapshot | None:
        """The last snapshot, or None if there is none."""
        path = directory / SNAPSHOT
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(bytes(f["meta"]).decode())
            model = {name: np.array(f[f"m{i}"], dtype=np.float32)
                     for i, name in enumerate(meta["names"])}
            acc = np.array(f["acc"], dtype=np.float64) if "acc" in f.files else None
            state = {k.removeprefix(_STATE): np.array(f[k], dtype=np.float64)
                     for k in f.files if k.startswith(_STATE)}
        return cls(model, meta, acc, state)
