"""Signed models and announcements (fedmq.signing, device_agent.model_gate): every refusal
reason, key rotation, chunked models, and the device keeping its model through each attack."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.model_gate import SLOTS, SignedGate
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec, keys, signing
from fedmq.chunking import split_model
from fedmq.compression import encode_all
from fedmq.errors import ConfigError, DecodeError
from fedmq.memory_transport import MemoryTransport
from fedmq.models import init_mlp
from fedmq.signing import RefusedError, Signer, Verifier, manifest_of
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import GlobalModel, RoundAnnouncement, model_digest

FED = "fed"
RUN = 1_700_000_000_000
KEY = signing.generate()
OTHER = signing.generate()
SIGNER = Signer(KEY)
VERIFIER = Verifier([KEY.public_key()])
LAYERS = (64, 32, 10)


def model(version: int, run: int = RUN, seed: int | None = None) -> GlobalModel:
    weights = init_mlp(list(LAYERS), seed=version if seed is None else seed)
    tensors = encode_all(weights)
    return GlobalModel(federation=FED, version=version, round=version, tensors=tensors,
                       sha256=model_digest(tensors), run=run)


def signed_whole(version: int, run: int = RUN, signer: Signer = SIGNER) -> GlobalModel:
    m = model(version, run)
    return signer.model(m, manifest_of(m))


def signed_chunked(version: int, run: int = RUN) -> tuple[bytes, list[bytes]]:
    """(manifest payload, part payloads) as the aggregator publishes a chunked model."""
    m = model(version, run)
    messages = split_model(m, 4096)
    assert len(messages) > 2
    parts = [codec.encode(p) for p in messages[1:]]
    return codec.encode(SIGNER.model(messages[0], manifest_of(m, parts))), parts


def announce(round_: int, base: int, run: int = RUN, **kw: object) -> RoundAnnouncement:
    return RoundAnnouncement(federation=FED, round=round_, base_version=base,
                             model_sha256=model(base, run).sha256, deadline=2e9,
                             min_updates=1, max_updates=1, run=run, **kw)  # type: ignore[arg-type]


def refused(fn: object, *args: object) -> str:
    with pytest.raises(RefusedError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.reason


def flip(data: bytes | memoryview, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 1
    return bytes(out)


# ---------------------------------------------------------------- keys


def test_public_key_text_round_trips_in_base64_and_hex() -> None:
    public = KEY.public_key()
    text = signing.public_text(public)
    assert len(text) == 44
    raw = signing.raw_public(public)
    for form in (text, raw.hex(), f"  {text}\n"):
        assert signing.raw_public(signing.parse_public(form)) == raw
    assert signing.key_id(signing.parse_public(text)) == SIGNER.key_id


@pytest.mark.parametrize("text", ["", "abc", "BcMQ5aAvh6vArr0F", "z" * 64, "A" * 43 + "!",
                                  "AAAA" * 12])
def test_garbage_is_not_a_public_key(text: str) -> None:
    with pytest.raises(ValueError, match="not an Ed25519 public key"):
        signing.parse_public(text)


def test_private_key_round_trips_and_other_keys_are_refused() -> None:
    again = signing.load_private(signing.private_pem(KEY))
    assert signing.key_id(again.public_key()) == SIGNER.key_id
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        signing.load_private(pem)
    with pytest.raises(ValueError, match="PEM"):
        signing.load_private(b"not a key")


def test_generate_writes_a_0600_key_and_never_overwrites_it(tmp_path: Path) -> None:
    private, public = keys.generate(tmp_path / "k")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert (tmp_path / "k" / keys.PUBLIC_NAME).read_text().strip() == public
    signer = keys.load_signer(str(private))
    assert signer.key_id == signing.key_id(signing.parse_public(public))
    before = private.read_bytes()
    with pytest.raises(FileExistsError):
        keys.generate(tmp_path / "k")
    assert private.read_bytes() == before


def test_a_bad_signing_key_file_is_one_line_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[security\] signing_key = .*cannot read it"):
        keys.load_signer(str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match=r"\[security\] signing_key = .*PEM"):
        keys.load_signer(str(tmp_path / "junk.pem"))


# ---------------------------------------------------------------- announcements


def test_a_signed_announcement_verifies_after_the_wire() -> None:
    ann = SIGNER.round(announce(3, 2, train={"lr": 0.1, "epochs": 2}, codec="int8",
                                codec_params={"block": 64}, sample_rate=0.5))
    VERIFIER.round(codec.decode_as(codec.encode(ann), RoundAnnouncement))


@pytest.mark.parametrize("change", [
    {"train": {"lr": 100.0, "epochs": 2}}, {"round": 4}, {"run": RUN + 1}, {"open": False},
    {"sample_rate": 1.0}, {"base_version": 0}, {"deadline": 3e9}, {"codec": "fp32"}])
def test_an_announcement_changed_after_signing_is_altered(change: dict[str, object]) -> None:
    ann = SIGNER.round(announce(3, 2, train={"lr": 0.1, "epochs": 2}, codec="int8",
                                codec_params={"block": 64}, sample_rate=0.5))
    assert refused(VERIFIER.round, dataclasses.replace(ann, **change)) == "altered"  # type: ignore[arg-type]


def test_announcement_refusals() -> None:
    ann = announce(3, 2)
    signed = SIGNER.round(ann)
    assert signed.sig is not None
    assert refused(VERIFIER.round, ann) == "unsigned"
    assert refused(VERIFIER.round, Signer(OTHER).round(ann)) == "untrusted_key"
    for bad in (dataclasses.replace(signed.sig, ed25519=flip(signed.sig.ed25519, 5)),
                dataclasses.replace(signed.sig, signed=flip(signed.sig.signed, 20))):
        assert refused(VERIFIER.round, dataclasses.replace(signed, sig=bad)) == "bad_signature"
    # A model's signed manifest presented as an announcement's: validly signed, not a round.
    other = signed_whole(2).sig
    assert other is not None
    assert refused(VERIFIER.round, dataclasses.replace(signed, sig=other)) == "altered"


def test_key_rotation_trusts_both_keys_then_only_the_new_one() -> None:
    ann = announce(3, 2)
    both = Verifier([KEY.public_key(), OTHER.public_key()])
    both.round(SIGNER.round(ann))
    both.round(Signer(OTHER).round(ann))
    new_only = Verifier([OTHER.public_key()])
    assert refused(new_only.round, SIGNER.round(ann)) == "untrusted_key"
    with pytest.raises(ValueError, match="at least one"):
        Verifier([])


# ---------------------------------------------------------------- whole models


def test_a_signed_whole_model_verifies_after_the_wire() -> None:
    m = codec.decode_as(codec.encode(signed_whole(4)), GlobalModel)
    manifest = VERIFIER.manifest(m)
    Verifier.whole(manifest, m)
    assert manifest.shapes == tuple((t.name, t.shape) for t in m.tensors)
    assert manifest.parts == ()


def test_one_byte_of_a_model_changed_is_altered() -> None:
    m = signed_whole(4)
    t = m.tensors[0]
    changed = dataclasses.replace(m, tensors=(dataclasses.replace(t, data=flip(t.data, 7)),
                                              *m.tensors[1:]))
    manifest = VERIFIER.manifest(changed)  # the header is as signed ...
    assert refused(Verifier.whole, manifest, changed) == "altered"  # ... the data is not
    # The attacker recomputes sha256 to match the changed data: the header no longer matches.
    resummed = dataclasses.replace(changed, sha256=model_digest(changed.tensors))
    assert refused(VERIFIER.manifest, resummed) == "altered"


@pytest.mark.parametrize("change", [{"version": 5}, {"run": RUN + 1}, {"round": 9},
                                    {"federation": "other"}])
def test_a_model_header_changed_after_signing_is_altered(change: dict[str, object]) -> None:
    m = dataclasses.replace(signed_whole(4), **change)  # type: ignore[arg-type]
    assert refused(VERIFIER.manifest, m) == "altered"


def with_metrics(m: GlobalModel) -> GlobalModel:
    return dataclasses.replace(m, metrics={"train_loss": 0.25, "participants": 3.0},
                               created=1_765_000_000.5)


def rewritten(payload: bytes, **change: object) -> bytes:
    """``payload`` decoded, changed and encoded again, signature kept (a topic writer's edit)."""
    return codec.encode(dataclasses.replace(codec.decode_as(payload, GlobalModel), **change))  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    {"metrics": {"train_loss": 0.01, "participants": 3.0}},  # one value changed
    {"metrics": {"train_loss": 0.25, "participants": 3.0, "eval_accuracy": 0.99}},  # one added
    {"metrics": {"train_loss": 0.25}},  # one dropped
    {"created": 1_765_000_001.5},
])
def test_metrics_or_created_changed_after_signing_are_altered(change: dict[str, object]) -> None:
    m = with_metrics(model(4))
    payload = codec.encode(SIGNER.model(m, manifest_of(m)))
    genuine = codec.decode_as(payload, GlobalModel)
    Verifier.whole(VERIFIER.manifest(genuine), genuine)
    assert VERIFIER.manifest(genuine).metrics == m.metrics
    assert feed(SignedGate(VERIFIER), payload)[0] == genuine  # the device's gate lets it in
    bad = rewritten(payload, **change)
    assert refused(VERIFIER.manifest, codec.decode_as(bad, GlobalModel)) == "altered"
    assert feed(SignedGate(VERIFIER), bad) == (None, "altered")
    # Chunked: the manifest message carries the metrics; changing them there is refused too.
    messages = split_model(m, 4096)
    parts = [codec.encode(p) for p in messages[1:]]
    head = codec.encode(SIGNER.model(messages[0], manifest_of(m, parts)))
    gate = SignedGate(VERIFIER)
    for part in parts:
        assert feed(gate, part) == (None, None)
    assert feed(gate, rewritten(head, **change)) == (None, "altered")
    whole, reason = feed(gate, head)
    assert reason is None
    assert whole is not None
    assert whole.metrics == m.metrics


def test_a_manifest_without_metrics_is_not_a_manifest() -> None:
    raw = msgpack.unpackb(codec.encode_manifest(manifest_of(model(4))), raw=False)
    del raw["metrics"]
    with pytest.raises(DecodeError):
        codec.decode_manifest(msgpack.packb(raw, use_bin_type=True))


def test_model_refusals() -> None:
    m = model(4)
    assert refused(VERIFIER.manifest, m) == "unsigned"
    assert refused(VERIFIER.manifest, signed_whole(4, signer=Signer(OTHER))) == "untrusted_key"
    sig = signed_whole(4).sig
    assert sig is not None
    bad = dataclasses.replace(m, sig=dataclasses.replace(sig, ed25519=flip(sig.ed25519, 0)))
    assert refused(VERIFIER.manifest, bad) == "bad_signature"
    # An announcement's signature on a model: validly signed bytes, not a manifest.
    ann_sig = SIGNER.round(announce(5, 4)).sig
    assert refused(VERIFIER.manifest, dataclasses.replace(m, sig=ann_sig)) == "altered"


# ---------------------------------------------------------------- the device's gate


def feed(gate: SignedGate, payload: bytes, held: tuple[int, int] = (0, -1)
         ) -> tuple[GlobalModel | None, str | None]:
    return gate.model(codec.decode_as(payload, GlobalModel), payload, held)


def test_gate_assembles_a_signed_chunked_model_from_parts_then_manifest() -> None:
    gate = SignedGate(VERIFIER)
    manifest, parts = signed_chunked(4)
    for p in parts:
        assert feed(gate, p) == (None, None)
    whole, reason = feed(gate, manifest)
    assert reason is None
    assert whole is not None
    assert whole.tensors == model(4).tensors


def test_gate_parts_after_the_manifest_are_checked_at_once() -> None:
    gate = SignedGate(VERIFIER)
    manifest, parts = signed_chunked(4)
    _, old_parts = signed_chunked(3)
    assert feed(gate, manifest) == (None, None)
    # Part 1 of version 3 with its header rewritten to version 4: not the signed payload.
    swapped = codec.decode_as(old_parts[1], GlobalModel)
    forged = codec.encode(dataclasses.replace(swapped, version=4, round=4,
                                              sha256=model(4).sha256))
    assert feed(gate, forged) == (None, "wrong_part")
    for p in parts[:-1]:
        assert feed(gate, p) == (None, None)
    whole, reason = feed(gate, parts[-1])
    assert reason is None
    assert whole is not None
    assert whole.sha256 == model(4).sha256


def test_gate_a_swapped_part_heard_before_the_manifest_is_refused_then_replaced() -> None:
    gate = SignedGate(VERIFIER)
    manifest, parts = signed_chunked(4)
    _, old_parts = signed_chunked(3)
    swapped = codec.decode_as(old_parts[0], GlobalModel)
    forged = codec.encode(dataclasses.replace(swapped, version=4, round=4,
                                              sha256=model(4).sha256))
    for p in [forged, *parts[1:]]:
        assert feed(gate, p) == (None, None)
    assert feed(gate, manifest) == (None, "wrong_part")
    whole, reason = feed(gate, parts[0])  # the aggregator's part arrives again
    assert reason is None
    assert whole is not None


def test_gate_refuses_unsigned_and_untrusted_chunked_manifests() -> None:
    gate = SignedGate(VERIFIER)
    m = model(4)
    messages = split_model(m, 4096)
    parts = [codec.encode(p) for p in messages[1:]]
    for p in parts:
        feed(gate, p)
    assert feed(gate, codec.encode(messages[0])) == (None, "unsigned")
    foreign = Signer(OTHER).model(messages[0], manifest_of(m, parts))
    assert feed(gate, codec.encode(foreign)) == (None, "untrusted_key")


def test_gate_a_part_claiming_a_far_version_does_not_lock_the_real_one_out() -> None:
    gate = SignedGate(VERIFIER)
    manifest, parts = signed_chunked(4)
    junk = codec.decode_as(parts[0], GlobalModel)
    for v in range(SLOTS + 3):  # parts of versions nobody signed, before and between
        feed(gate, codec.encode(dataclasses.replace(junk, version=10**9 + v)))
    for p in parts:
        feed(gate, p)
    feed(gate, codec.encode(dataclasses.replace(junk, version=10**12)))
    whole, reason = feed(gate, manifest)
    assert reason is None
    assert whole is not None


def test_gate_replays_are_old() -> None:
    gate = SignedGate(VERIFIER)
    held = (RUN, 4)
    manifest, parts = signed_chunked(4)
    for payload in (codec.encode(signed_whole(3)), codec.encode(signed_whole(4)), manifest,
                    *parts, codec.encode(signed_whole(9, run=RUN - 1))):
        assert feed(gate, payload, held) == (None, "old_model")
    # A later run signed by the trusted key is legitimate.
    whole, reason = feed(gate, codec.encode(signed_whole(0, run=RUN + 1)), held)
    assert reason is None
    assert whole is not None


# ---------------------------------------------------------------- the service keeps its model


def _service() -> tuple[AgentService, Topics]:
    transport = MemoryTransport()
    rng = np.random.default_rng(0)
    trainer = MLPTrainer(rng.normal(size=(6, 64)).astype(np.float32),
                         rng.integers(0, 10, size=6), num_classes=10)
    service = AgentService(FED, "dev-1", trainer, transport, clock=lambda: 0.0, evaluate=False)
    service.gate = SignedGate(VERIFIER)
    return service, Topics(FED)


def test_service_refuses_every_forgery_counts_it_and_keeps_training() -> None:
    service, topics = _service()

    def deliver(topic: str, payload: bytes) -> None:
        service.handle_message(Message(topic, payload, qos=1))

    def updates() -> int:
        return service.updates_sent

    deliver(topics.model, codec.encode(signed_whole(1)))
    deliver(topics.round, codec.encode(SIGNER.round(announce(2, 1))))
    assert updates() == 1
    assert service.machine.model_version == 1
    held = service.machine.weights

    later = RUN + 10**6  # the attack of issue 12: a later run, unsigned or forged
    forged = model(0, run=later, seed=99)
    zero = dataclasses.replace(forged, tensors=encode_all(
        {k: np.zeros_like(v) for k, v in init_mlp(list(LAYERS), seed=0).items()}))
    zero = dataclasses.replace(zero, sha256=model_digest(zero.tensors))
    good4 = signed_whole(4)
    t = good4.tensors[1]
    attacks = [
        (topics.model, codec.encode(zero), "unsigned"),
        (topics.round, codec.encode(announce(1, 0, run=later)), "unsigned"),
        (topics.model, codec.encode(signed_whole(0, run=later, signer=Signer(OTHER))),
         "untrusted_key"),
        (topics.round, codec.encode(Signer(OTHER).round(announce(1, 0, run=later))),
         "untrusted_key"),
        (topics.model, codec.encode(dataclasses.replace(good4, tensors=(
            good4.tensors[0], dataclasses.replace(t, data=flip(t.data, 3)),
            *good4.tensors[2:]))), "altered"),
        (topics.round, codec.encode(dataclasses.replace(
            SIGNER.round(announce(3, 1)), train={"lr": 50.0})), "altered"),
        (topics.model, codec.encode(signed_whole(0)), "old_model"),  # a replay
        (topics.round, codec.encode(SIGNER.round(announce(1, 0))), "old_round"),
    ]
    for topic, payload, reason in attacks:
        before = service.ignored[reason]
        deliver(topic, payload)
        assert service.ignored[reason] == before + 1, reason
        assert (service.machine.run, service.machine.model_version) == (RUN, 1), reason
        assert service.machine.weights is held, reason
    assert updates() == 1  # trained for nothing forged
    # The real aggregator goes on: its next version and round are used.
    deliver(topics.model, codec.encode(signed_whole(2)))
    deliver(topics.round, codec.encode(SIGNER.round(announce(3, 2))))
    assert updates() == 2
    assert service.machine.model_version == 2


def test_the_manifest_bytes_are_what_docs_say() -> None:
    m = model(4)
    parts = [b"part zero", b"part one"]
    manifest = codec.decode_manifest(codec.encode_manifest(manifest_of(m, parts)))
    assert manifest.parts == tuple(hashlib.sha256(p).digest() for p in parts)
    assert manifest.chunks == 2
    assert manifest.codec == "fp32"
    assert (manifest.federation, manifest.run, manifest.version) == (FED, RUN, 4)


def test_the_protocol_pages_verifier_uses_plain_cryptography() -> None:
    """docs/protocol.md 5b's verify_model, run as written (msgpack + cryptography only)."""
    import re

    text = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text[text.index("## 5b."):text.index("## 6.")]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert block is not None
    assert set(re.findall(r"^(?:import|from)\s+(\w+)", block.group(1), re.MULTILINE)) == {
        "hashlib", "msgpack", "cryptography"}
    namespace: dict[str, object] = {}
    exec(compile(block.group(1), "protocol.md", "exec"), namespace)
    verify_model = namespace["verify_model"]
    trusted = {SIGNER.key_id: KEY.public_key()}
    payload = codec.encode(signed_whole(4))
    assert verify_model(payload, trusted)["version"] == 4  # type: ignore[operator]
    m = with_metrics(model(5))
    measured = codec.encode(SIGNER.model(m, manifest_of(m)))
    assert verify_model(measured, trusted)["metrics"] == m.metrics  # type: ignore[operator]
    for bad in (codec.encode(model(4)), codec.encode(signed_whole(4, signer=Signer(OTHER))),
                flip(payload, 300), flip(payload, len(payload) - 200),
                rewritten(measured, metrics={"train_loss": 0.01, "participants": 3.0}),
                rewritten(measured, created=1.0)):
        with pytest.raises(Exception):  # noqa: B017, PT011 - ValueError or InvalidSignature
            verify_model(bad, trusted)  # type: ignore[operator]
