"""Fuzz: hostile ``sig`` maps, signed manifests and byte-level mutants of signed models and
announcements, fed to a device that pins the federation's key (issue 12, points 1 and 4).

Each case goes to a fresh ``AgentService`` (``MemoryTransport``) that holds the signed version 1;
the genuine messages are a signed version 2 (whole, and chunked: manifest and parts) and a signed
announcement of round 3. A seeded ``random.Random`` builds the cases (exact count, seconds).

For every case ``handle_message`` must not raise, and exactly one of:

- one counted reason from ``REFUSALS`` (nothing else counted), the device still holding
  version 1 (the same weights object) and no announcement;
- nothing counted and what the device took is the genuine signed content (a mutant that decodes
  to the same message, e.g. a field the signature does not cover such as ``metrics``);
- a chunked model's part that claims another version than the awaited one: kept aside, nothing
  counted, nothing taken (docs/security.md: parts are not signed on their own).

Status messages with hostile ``ignored`` maps decode to a ``DeviceStatus`` or raise
``DecodeError``, and ``fedmq watch``'s state takes them without raising.

Run with ``-s`` to see the counts per generator and reason.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec, signing
from fedmq.chunking import split_model
from fedmq.compression import encode_all
from fedmq.errors import DecodeError
from fedmq.memory_transport import MemoryTransport
from fedmq.models import init_mlp
from fedmq.signed_gate import SignedGate
from fedmq.signing import Signer, Verifier, manifest_of
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.watch_state import FleetView
from fedmq.wire import DeviceStatus, GlobalModel, RoundAnnouncement, model_digest

FED = "fuzz"
RUN = 1_700_000_000_000
LAYERS = [64, 32, 10]  # 9.6 kB: 3 parts of a chunked model
KEY = signing.generate()
SIGNER = Signer(KEY)
OTHER = Signer(signing.generate())
TOPICS = Topics(FED)
REFUSALS = {"malformed", "unsigned", "untrusted_key", "bad_signature", "altered", "wrong_part",
            "old_model", "old_round", "unexpected"}
CASES_PER_GENERATOR = 300


def _model(version: int) -> GlobalModel:
    tensors = encode_all(init_mlp(LAYERS, seed=version))
    return GlobalModel(federation=FED, version=version, round=version, tensors=tensors,
                       sha256=model_digest(tensors), run=RUN,
                       metrics={"train_loss": 0.5, "participants": 2.0}, created=1.7e9)


def _whole(version: int, signer: Signer = SIGNER) -> GlobalModel:
    m = _model(version)
    return signer.model(m, manifest_of(m))


def _chunked(version: int) -> tuple[bytes, list[bytes]]:
    m = _model(version)
    messages = split_model(m, 4096)
    parts = [codec.encode(p) for p in messages[1:]]
    return codec.encode(SIGNER.model(messages[0], manifest_of(m, parts))), parts


def _announcement(round_: int, base: int, signer: Signer = SIGNER) -> RoundAnnouncement:
    ann = RoundAnnouncement(federation=FED, round=round_, base_version=base,
                            model_sha256=_model(base).sha256, deadline=2e9, min_updates=1,
                            max_updates=1, run=RUN)
    return signer.round(ann)


HELD = codec.encode(_whole(1))
GOOD_WHOLE = codec.encode(_whole(2))
GOOD_HEAD, GOOD_PARTS = _chunked(2)
GOOD_ROUND = codec.encode(_announcement(3, 2))
GENUINE = _model(2)
assert len(GOOD_PARTS) >= 3


@dataclasses.dataclass(frozen=True)
class Case:
    generator: str
    topic: str
    payload: bytes
    #: The genuine manifest goes first (a part's check against it), for part cases.
    after_head: bool = False


def _device() -> AgentService:
    rng = np.random.default_rng(0)
    trainer = MLPTrainer(rng.normal(size=(4, LAYERS[0])).astype(np.float32),
                         rng.integers(0, LAYERS[-1], size=4), num_classes=LAYERS[-1])
    service = AgentService(FED, "dev", trainer, MemoryTransport(), clock=lambda: 0.0,
                           evaluate=False)
    service.gate = SignedGate(Verifier([KEY.public_key()]))
    service.handle_message(Message(TOPICS.model, HELD, qos=1))
    assert service.machine.model_version == 1
    return service


def _doc(payload: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = msgpack.unpackb(payload, raw=False)
    return doc


def _pack(doc: object) -> bytes:
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


# ---------------------------------------------------------------- generators


def _wrong_values(rng: random.Random) -> object:
    return rng.choice([None, 0, -1, 1.5, True, "", "x" * 300, b"", b"\0" * 64, [], {}, [1, 2],
                       {"a": 1}, rng.randbytes(rng.randrange(1, 100))])


def gen_sig_map(rng: random.Random) -> Case:
    """The ``sig`` map of a genuine model or announcement, broken."""
    topic, payload = rng.choice([(TOPICS.model, GOOD_WHOLE), (TOPICS.model, GOOD_HEAD),
                                 (TOPICS.round, GOOD_ROUND)])
    doc = _doc(payload)
    sig = doc["sig"]
    pick = rng.randrange(8)
    if pick == 0:
        del doc["sig"]
    elif pick == 1:
        doc["sig"] = _wrong_values(rng)
    elif pick == 2:
        del sig[rng.choice(["key", "signed", "ed25519"])]
    elif pick == 3:
        sig[rng.choice(["key", "signed", "ed25519"])] = _wrong_values(rng)
    elif pick == 4:
        sig["ed25519"] = rng.randbytes(rng.choice([0, 1, 63, 65, 128]))
    elif pick == 5:
        sig["ed25519"] = rng.randbytes(64)
    elif pick == 6:
        sig["key"] = rng.choice([OTHER.key_id, "", "0" * 16, SIGNER.key_id.upper(), "k" * 257])
    else:
        sig["signed"] = rng.randbytes(rng.randrange(0, 300))
    return Case("sig_map", topic, _pack(doc))


def _mutate_manifest(m: dict[str, Any], rng: random.Random) -> None:
    key = rng.choice(list(m))
    pick = rng.randrange(4)
    if pick == 0:
        del m[key]
    elif pick == 1:
        m[key] = _wrong_values(rng)
    elif pick == 2 and isinstance(m[key], int) and not isinstance(m[key], bool):
        m[key] += rng.choice([-1, 1, 2, 10**6])
    elif key == "shapes" and m["shapes"]:
        item = rng.choice(m["shapes"])
        item[rng.randrange(2)] = _wrong_values(rng) if rng.random() < 0.5 else (
            [d + 1 for d in item[1]] if isinstance(item[1], list) else "w9")
    elif key == "parts" and m["parts"]:
        i = rng.randrange(len(m["parts"]))
        m["parts"][i] = rng.choice([rng.randbytes(32), rng.randbytes(31), b"", "x" * 32])
    else:
        m[key] = _wrong_values(rng)


def gen_manifest(rng: random.Random) -> Case:
    """A model whose signed manifest is changed and signed again: by the trusted key (it no
    longer matches the model), by another key, or not at all (the trusted key's id and the old
    signature left as they were)."""
    topic, payload = rng.choice([(TOPICS.model, GOOD_WHOLE), (TOPICS.model, GOOD_HEAD)])
    doc = _doc(payload)
    manifest = _doc(doc["sig"]["signed"])
    genuine = _pack(manifest)
    while _pack(manifest) == genuine:  # e.g. a value replaced by an equal one
        _mutate_manifest(manifest, rng)
    signed = _pack(manifest)
    who = rng.randrange(3)
    signer = OTHER if who == 1 else SIGNER
    doc["sig"] = {"key": signer.key_id, "signed": signed,
                  "ed25519": KEY.sign(signed) if who == 0 else (
                      doc["sig"]["ed25519"] if who == 2 else signing.generate().sign(signed))}
    return Case(f"manifest_{['trusted', 'other', 'unsigned'][who]}", topic, _pack(doc))


def _bytes_mutant(payload: bytes, rng: random.Random) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.choice([1, 1, 1, 2, 5])):
        pick = rng.randrange(4)
        at = rng.randrange(len(data))
        if pick == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif pick == 1:
            data[at] = rng.randrange(256)
        elif pick == 2:
            data.insert(at, rng.randrange(256))
        elif len(data) > 1:
            del data[at]
    if rng.random() < 0.1:
        data = data[:rng.randrange(len(data))]
    return bytes(data)


def gen_bytes(rng: random.Random) -> Case:
    """Bit flips, overwritten, inserted and deleted bytes, truncations of signed payloads."""
    topic, payload, after = rng.choice(
        [(TOPICS.model, GOOD_WHOLE, False), (TOPICS.model, GOOD_HEAD, False),
         (TOPICS.round, GOOD_ROUND, False),
         *((TOPICS.model_part(i), p, True) for i, p in enumerate(GOOD_PARTS))])
    mutant = _bytes_mutant(payload, rng)
    while mutant == payload:
        mutant = _bytes_mutant(payload, rng)
    return Case("bytes", topic, mutant, after_head=after)


def gen_swapped(rng: random.Random) -> Case:
    """A part of version 3 relabelled as version 2's, or a genuine part under another index."""
    head3, parts3 = _chunked(3)
    del head3
    i = rng.randrange(len(GOOD_PARTS))
    if rng.random() < 0.5:
        part = dataclasses.replace(codec.decode_as(parts3[i], GlobalModel), version=2, round=2)
    else:
        j = (i + 1 + rng.randrange(len(GOOD_PARTS) - 1)) % len(GOOD_PARTS)
        part = dataclasses.replace(codec.decode_as(GOOD_PARTS[j], GlobalModel), chunk=i)
    return Case("swapped_part", TOPICS.model_part(i), codec.encode(part), after_head=True)


GENERATORS: dict[str, Callable[[random.Random], Case]] = {
    "sig_map": gen_sig_map, "manifest": gen_manifest, "bytes": gen_bytes,
    "swapped_part": gen_swapped}


# ---------------------------------------------------------------- the check


def _run(case: Case) -> str:
    """Feed ``case``; return its counted reason, or what else happened (see the module)."""
    device = _device()
    if case.after_head:
        device.handle_message(Message(TOPICS.model, GOOD_HEAD, qos=1))
    before = Counter(device.ignored)
    weights = device.machine.weights
    device.handle_message(Message(case.topic, case.payload, qos=1))
    counted = device.ignored - before
    m = device.machine
    if counted:
        assert sum(counted.values()) == 1, (case, counted)
        (reason,) = counted
        assert reason in REFUSALS, (case, reason)
        assert (m.model_version, m.weights is weights, m.announcement) == (1, True, None), case
        return reason
    if m.model_version != 1:
        assert (m.run, m.model_version, m.model_sha256) == (RUN, 2, GENUINE.sha256), case
        assert model_digest(encode_all(m.weights or {})) == GENUINE.sha256, case
        return "took the genuine model"
    if m.announcement is not None:
        genuine = dataclasses.replace(codec.decode_as(GOOD_ROUND, RoundAnnouncement), sig=None)
        assert dataclasses.replace(m.announcement, sig=None) == genuine, case
        return "took the genuine announcement"
    part = codec.decode_as(case.payload, GlobalModel)  # nothing counted, nothing taken
    if case.generator == "manifest_trusted" and part.chunk is None and part.chunks > 1:
        # The trusted key signed it (e.g. another codec name): it waits for parts that would
        # have to match it, and nothing is taken meanwhile.
        return "a trusted manifest awaiting its parts"
    assert case.after_head, case
    assert (part.run, part.version) != (RUN, 2), case
    return "part of another version, kept aside"


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_hostile_signatures_are_refused_with_one_counted_reason(name: str) -> None:
    rng = random.Random(f"signatures-{name}")
    outcomes: Counter[str] = Counter()
    for _ in range(CASES_PER_GENERATOR):
        case = GENERATORS[name](rng)
        outcomes[f"{case.generator}: {_run(case)}"] += 1
    print(f"\n{name}: " + ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items())))
    refused = sum(n for k, n in outcomes.items() if k.split(": ")[1] in REFUSALS)
    assert refused >= CASES_PER_GENERATOR * 0.9  # the rest: harmless, checked case by case


def test_the_genuine_messages_pass() -> None:
    """The fuzz's baseline: unmutated, the device takes them (else every refusal is vacuous)."""
    assert _run(Case("genuine", TOPICS.model, GOOD_WHOLE)) == "took the genuine model"
    assert _run(Case("genuine", TOPICS.round, GOOD_ROUND)) == "took the genuine announcement"
    device = _device()
    for i, part in enumerate(GOOD_PARTS):
        device.handle_message(Message(TOPICS.model_part(i), part, qos=1))
    device.handle_message(Message(TOPICS.model, GOOD_HEAD, qos=1))
    assert device.machine.model_version == 2


def test_hostile_ignored_maps_in_a_status_never_raise() -> None:
    rng = random.Random("status")
    good = codec.encode(DeviceStatus(FED, "dev", "online", ignored={"unsigned": 2, "altered": 1}))
    view = FleetView(FED, now=0.0)
    outcomes: Counter[str] = Counter()
    for _ in range(2000):
        if rng.random() < 0.5:
            doc = _doc(good)
            doc["ignored"] = rng.choice([
                _wrong_values(rng), {"unsigned": -1}, {"unsigned": 2**64 - 1}, {1: 1},
                {f"r{i}": 1 for i in range(rng.choice([255, 256, 257, 5000]))},
                {"unsigned": rng.choice([1.5, "1", None, True, [1]])}])
            payload = _pack(doc)
        else:
            payload = _bytes_mutant(good, rng)
        try:
            status = codec.decode(payload)
        except DecodeError:
            outcomes["DecodeError"] += 1
        else:
            outcomes[type(status).__name__] += 1
            if isinstance(status, DeviceStatus):
                assert all(isinstance(k, str) and isinstance(v, int) and v >= 0
                           for k, v in status.ignored.items())
        view.handle(TOPICS.status("dev"), payload, 0.0)  # must not raise
    print("\nstatus mutants:", dict(outcomes))
    assert outcomes["DecodeError"] > 1000
