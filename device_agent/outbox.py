"""The device's outbox: update messages kept until the broker acknowledged them.

paho keeps QoS 1 messages that are in flight in memory only, so an update handed to it is lost
if the process dies before the PUBACK. The agent therefore writes every update message here
*before* it publishes it, and removes it only once the broker acknowledged it; whatever is still
here after a restart (or a reconnect) is published again. Duplicates are harmless: the
aggregator rejects a second copy as ``duplicate`` (dedupe by device and update id).

On disk, one file per message, named by a sequence number that only grows (``{seq:020d}.msg``),
so the send order survives restarts. A message is written to ``*.tmp``, fsynced, renamed into
place with ``os.replace`` and the directory fsynced: a file either is complete or does not
exist, and a leftover ``*.tmp`` (a crash mid-write) is ignored and deleted on open. Each file
carries a CRC32; a damaged file is deleted (and counted in ``corrupt``) rather than sent.

Updates and their chunks: the messages of one update (its chunks) form a *group* written by
``put_update``. Its files are renamed into place in order, and the file of a group's last
message is deleted only after every other message of the group, so a group found on disk
without its last message is one whose commit a crash interrupted: it is discarded on open (it
was never published), and a partial update never lingers.

Bounded (``max_bytes`` counts the files' sizes: payload plus a small header; ``max_messages``
counts messages). When a new update does not fit, the **oldest whole updates are dropped** (all
the chunks of an update id together) until it fits, and counted in ``dropped`` (updates) and
``dropped_messages``: a newer update is worth more than an older round's, which the aggregator
has most likely closed (it would reject it as ``stale``) and which the newer model supersedes.
An update that alone exceeds a bound is refused with ``OutboxFullError`` (nothing is dropped for
it; the agent then sends it without the outbox, best effort). Dropping an update some of whose
chunks already reached the broker leaves the aggregator an incomplete chunked update, which it
treats as any update missing chunks. ``directory=None`` keeps the outbox in memory only (same
API, same bounds, lost with the process).

A lock guards every method; the agent uses the outbox from its worker thread only.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmq.durable import fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"FMQOUT1\n"
#: crc32, topic length, group length, index in group, messages in group.
_HEADER = struct.Struct("<IHHII")
_SUFFIX = ".msg"
_TMP = ".tmp"
_SEQ_DIGITS = 20


class OutboxFullError(ValueError):
    """One update is larger than the whole outbox may hold."""


@dataclass(slots=True)
class _Entry:
    seq: int
    topic: str
    group: str
    index: int
    count: int
    size: int
    payload: bytes | None  # None on disk: read back when needed


def _encode(topic: str, group: str, index: int, count: int, payload: bytes) -> bytes:
    t, g = topic.encode(), group.encode()
    body = _HEADER.pack(0, len(t), len(g), index, count)[4:] + t + g + payload
    return MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def _decode(data: bytes) -> tuple[str, str, int, int, bytes]:
    """(topic, group, index, count, payload); ValueError if the file is damaged."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _HEADER.size:
        raise ValueError("not an outbox file")
    crc, tlen, glen, index, count = _HEADER.unpack_from(data, len(MAGIC))
    body = data[len(MAGIC) + 4:]
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    start = len(MAGIC) + _HEADER.size
    if start + tlen + glen > len(data) or not 0 <= index < count:
        raise ValueError("bad header")
    topic = data[start:start + tlen].decode()
    group = data[start + tlen:start + tlen + glen].decode()
    return topic, group, index, count, data[start + tlen + glen:]



class Outbox:
    """Messages waiting for the broker's acknowledgement, in order, optionally on disk.

    ``put``/``put_update`` store, ``pending`` lists (oldest first), ``remove`` forgets one
    message once acknowledged. See the module docstring for the full-outbox policy.
    """

    def __init__(self, directory: Path | None, max_bytes: int, max_messages: int) -> None:
        if max_bytes < 1 or max_messages < 1:
            raise ValueError("outbox bounds must be positive")
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        #: Updates (groups) dropped to make room, and the unacknowledged messages they held.
        self.dropped = 0
        self.dropped_messages = 0
        #: Damaged files, and messages of half-written updates, discarded (never sent).
        self.corrupt = 0
        self._entries: dict[str, _Entry] = {}  # key -> entry, in sequence order
        self._groups: dict[str, list[str]] = {}  # group -> its keys still held, in order
        self._acked_tails: set[str] = set()  # acknowledged last messages kept for their group
        self._size = 0
        self._next_seq = 0
        self._lock = threading.Lock()
        if self.directory is not None:
            self._load(self.directory)

    # ---------------------------------------------------------------- reading

    def __len__(self) -> int:
        """Messages not yet acknowledged."""
        with self._lock:
            return len(self._entries) - len(self._acked_tails)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries and key not in self._acked_tails

    @property
    def size_bytes(self) -> int:
        """Bytes held (file sizes), acknowledged tails kept for crash safety included."""
        return self._size

    def pending_keys(self) -> list[str]:
        """The keys of the messages not yet removed, oldest first."""
        with self._lock:
            return [k for k in self._entries if k not in self._acked_tails]

    def get(self, key: str) -> tuple[str, bytes] | None:
        """(topic, payload) of a message not yet removed, None if it is not here (or damaged)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or key in self._acked_tails:
                return None
            if entry.payload is not None:
                return entry.topic, entry.payload
        payload = self._read_payload(key)
        return (entry.topic, payload) if payload is not None else None

    def pending(self) -> list[tuple[str, str, bytes]]:
        """Every message not yet removed, oldest first, as (key, topic, payload)."""
        out = []
        for key in self.pending_keys():
            item = self.get(key)
            if item is not None:
                out.append((key, *item))
        return out

    def group_of(self, key: str) -> str | None:
        """The update (group) a message belongs to, None if it is not here."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.group if entry is not None else None

    # ---------------------------------------------------------------- writing

    def put(self, topic: str, payload: bytes, *, group: str = "") -> str:
        """Store one message durably (before it is published); returns its key.

        ``group`` names the update it belongs to; empty: it is an update on its own.
        """
        return self.put_update(group, [(topic, payload)])[0]

    def put_update(self, group: str, messages: Sequence[tuple[str, bytes]]) -> list[str]:
        """Store the messages (chunks) of one update durably and in order; their keys.

        Older updates are dropped first if these do not fit; ``OutboxFullError`` if they never can.
        An empty ``group`` makes each message an update on its own.
        """
        if not messages:
            return []
        if not group:
            return [self.put_update(f"solo-{uuid.uuid4().hex}", [m])[0] for m in messages]
        count = len(messages)
        blobs = [_encode(t, group, i, count, p) for i, (t, p) in enumerate(messages)]
        size = sum(len(b) for b in blobs)
        if size > self.max_bytes or count > self.max_messages:
            raise OutboxFullError(f"an update of {count} messages and {size} bytes exceeds the "
                             f"outbox bounds ({self.max_messages} messages, {self.max_bytes} "
                             "bytes)")
        with self._lock:
            if group in self._groups:
                raise ValueError(f"update {group!r} is already in the outbox")
            self._make_room(size, count)
            first = self._next_seq
            self._next_seq += count
            keys = [f"{first + i:0{_SEQ_DIGITS}d}" for i in range(count)]
            if self.directory is not None:
                self._write(keys, blobs)
            for i, (key, (topic, payload)) in enumerate(zip(keys, messages, strict=True)):
                self._add(key, _Entry(first + i, topic, group, i, count, len(blobs[i]),
                                      payload if self.directory is None else None))
        return keys

    def remove(self, key: str) -> bool:
        """Forget an acknowledged message; True if it was the last one of its update.

        Unknown keys are ignored (the update may have been dropped meanwhile).
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or key in self._acked_tails:
                return False
            group = self._groups[entry.group]
            if len(group) - len(self._acked_tails.intersection(group)) > 1:
                if entry.index == entry.count - 1:
                    # Keep the group's last file until the rest is gone (module docstring).
                    self._acked_tails.add(key)
                else:
                    self._delete(key)
                return False
            for k in list(group):  # the last unacknowledged one, and any kept tail
                self._delete(k)
            return True

    # ---------------------------------------------------------------- internals

    def _add(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self._groups.setdefault(entry.group, []).append(key)
        self._size += entry.size

    def _delete(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._acked_tails.discard(key)
        self._size -= entry.size
        keys = self._groups[entry.group]
        keys.remove(key)
        if not keys:
            del self._groups[entry.group]
        if self.directory is not None:
            # No directory fsync: a deletion that a crash undoes only means one more duplicate.
            (self.directory / f"{key}{_SUFFIX}").unlink(missing_ok=True)

    def _make_room(self, size: int, count: int) -> None:
        while self._entries and (self._size + size > self.max_bytes
                                 or len(self._entries) + count > self.max_messages):
            oldest = next(iter(self._entries.values())).group
            victims = list(self._groups[oldest])
            live = [k for k in victims if k not in self._acked_tails]
            for k in victims:
                self._delete(k)
            self.dropped += 1
            self.dropped_messages += len(live)
            log.warning("outbox full: dropped the oldest update %s (%d messages not yet "
                        "acknowledged)", oldest, len(live))

    def _write(self, keys: list[str], blobs: list[bytes]) -> None:
        assert self.directory is not None
        tmps = []
        for key, blob in zip(keys, blobs, strict=True):
            tmp = self.directory / f"{key}{_SUFFIX}{_TMP}"
            with open(tmp, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            tmps.append(tmp)
        # Renamed in order: a crash part-way leaves the group without its last message.
        for key, tmp in zip(keys, tmps, strict=True):
            os.replace(tmp, self.directory / f"{key}{_SUFFIX}")
        fsync_dir(self.directory)

    def _read_payload(self, key: str) -> bytes | None:
        assert self.directory is not None
        try:
            return _decode((self.directory / f"{key}{_SUFFIX}").read_bytes())[4]
        except (OSError, ValueError) as exc:
            log.warning("outbox: cannot read %s (%s); forgetting it", key, exc)
            with self._lock:
                if key in self._entries:
                    self._delete(key)
                    self.corrupt += 1
            return None

    def _load(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        found: list[tuple[str, _Entry]] = []
        for path in directory.iterdir():
            name = path.name
            if name.endswith(f"{_SUFFIX}{_TMP}"):
                log.info("outbox: deleting %s, left over from an interrupted write", name)
                path.unlink(missing_ok=True)
                continue
            key = name.removesuffix(_SUFFIX)
            if not name.endswith(_SUFFIX) or len(key) != _SEQ_DIGITS or not key.isdigit():
                continue  # not ours: leave it alone
            try:
                data = path.read_bytes()
                topic, group, index, count, _ = _decode(data)
            except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
                log.warning("outbox: deleting damaged %s (%s)", name, exc)
                path.unlink(missing_ok=True)
                self.corrupt += 1
                continue
            found.append((key, _Entry(int(key), topic, group, index, count, len(data), None)))
        found.sort(key=lambda f: f[1].seq)
        if found:
            self._next_seq = found[-1][1].seq + 1
        committed = {e.group for _, e in found if e.index == e.count - 1}
        for key, entry in found:
            if entry.group not in committed:  # its write was interrupted: it was never sent
                log.warning("outbox: discarding %s of update %s (written only in part)", key,
                            entry.group)
                (directory / f"{key}{_SUFFIX}").unlink(missing_ok=True)
                self.corrupt += 1
                continue
            self._add(key, entry)
        if self._entries:
            log.info("outbox: %d messages (%d bytes) left from before the restart",
                     len(self._entries), self._size)
