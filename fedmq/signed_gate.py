"""What a device or an app that pins the federation's keys lets through (docs/security.md,
"Signed models").

``SignedGate`` sits between the decoder and whatever uses models and announcements (the
device's ``AgentMachine``, ``fedmq.subscriber.ModelSubscriber``): an announcement passes only if
a trusted key signed exactly it; a model only if a trusted key signed its manifest and its
tensors (or, for a chunked model, every part's payload) are the signed ones. Everything else is
refused with a reason from ``fedmq.signing.REASONS``, or ``old_model`` / ``old_round`` for a
model (or part) not newer than the one held, or older than the floor (a replay; the floor is
what a device accepted before a restart, ``device_agent.accepted_record``).

Chunked models: parts come before their manifest and are not signed themselves, so they are
kept per ``(run, version)`` for the ``SLOTS`` versions most recently heard of: a part claiming
some far-off version cannot lock the newest real one out. A part of a version whose signed
manifest is in is checked at once against the payload hash the manifest signs. Pure: no
sockets, threads, clock or files.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

from fedmq.chunking import join_ranges
from fedmq.signing import RefusedError, Verifier
from fedmq.wire import GlobalModel, ModelManifest, RoundAnnouncement, newer

#: Versions whose parts are kept while their manifest is awaited.
SLOTS = 2

Key = tuple[int, int]


class SignedGate:
    """Verifies announcements and models for one device or app."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self._slots: OrderedDict[Key, dict[int, tuple[GlobalModel, bytes]]] = OrderedDict()
        #: The newest verified manifest whose parts are not all in yet.
        self._pending: tuple[ModelManifest, GlobalModel] | None = None
        #: Nothing older than these ``(run, version)`` / ``(run, round)`` passes, even when
        #: the device holds nothing yet (after a restart): what it accepted before.
        self.floor_model: Key = (0, -1)
        self.floor_round: Key = (0, 0)

    def round(self, ann: RoundAnnouncement) -> str | None:
        """None if ``ann`` may be used, else the refusal reason."""
        try:
            self.verifier.round(ann)
        except RefusedError as exc:
            return exc.reason
        if newer(*self.floor_round, ann.run, ann.round):
            return "old_round"
        return None

    def model(self, msg: GlobalModel, payload: bytes | memoryview,
              held: Key) -> tuple[GlobalModel | None, str | None]:
        """Feed one message of the model topics (``held``: the (run, version) the device has).

        Returns (the verified whole model, None) when one is complete, (None, reason) for a
        refusal, and (None, None) while a chunked model waits for its other messages.
        """
        key = (msg.run, msg.version)
        if not newer(*key, *held) or newer(*self.floor_model, *key):
            return None, "old_model"
        try:
            if msg.chunks == 1:
                m = self.verifier.manifest(msg)
                self.verifier.whole(m, msg)
                return msg, None
            if msg.chunk is None:
                m = self.verifier.manifest(msg)
                if self._pending is None or not newer(*self._key(self._pending[1]), *key):
                    self._pending = (m, msg)
                    for k in [k for k in self._slots if not newer(*k, *key)]:
                        if k != key:
                            del self._slots[k]  # older than a verified manifest: useless
            else:
                pending = self._pending
                if pending is not None and self._key(pending[1]) == key:
                    Verifier.part(pending[0], msg.chunk, payload)
                self._slot(key)[msg.chunk] = (msg, hashlib.sha256(payload).digest())
            return self._complete()
        except RefusedError as exc:
            return None, exc.reason

    @staticmethod
    def _key(msg: GlobalModel) -> Key:
        return (msg.run, msg.version)

    def _slot(self, key: Key) -> dict[int, tuple[GlobalModel, bytes]]:
        slot = self._slots.setdefault(key, {})
        self._slots.move_to_end(key)
        pending_key = self._key(self._pending[1]) if self._pending is not None else None
        while len(self._slots) > SLOTS:  # drop the least recently heard-of version, never
            oldest = next(k for k in self._slots if k != pending_key)  # the awaited one
            del self._slots[oldest]
        return slot

    def _complete(self) -> tuple[GlobalModel | None, str | None]:
        if self._pending is None:
            return None, None
        m, head = self._pending
        key = self._key(head)
        slot = self._slot(key)
        if len(slot) < m.chunks:
            return None, None
        for chunk, (_, digest) in list(slot.items()):
            if chunk >= m.chunks or digest != m.parts[chunk]:
                del slot[chunk]  # a part heard before its manifest, not the signed one
                return None, "wrong_part"
        try:
            tensors = join_ranges(t for i in range(m.chunks) for t in slot[i][0].tensors)
        except ValueError:
            return None, "altered"
        whole = dataclasses.replace(head, tensors=tensors, chunk=None, chunks=1)
        self._pending = None
        del self._slots[key]
        self.verifier.whole(m, whole)  # the signed parts make this hold; checked all the same
        return whole, None
