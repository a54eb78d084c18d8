"""Signed models and round announcements (Ed25519, with ``cryptography``).

The aggregator signs; devices that pin the federation's public keys verify. What is signed
(docs/protocol.md, 5b):

- a round announcement: its own payload encoded without ``sig``, carried in ``sig.signed``; a
  verifier decodes that copy and requires the announcement to equal it;
- a model (whole, or a chunked model's manifest): a ``ModelManifest`` (federation, run, version,
  round, digest, codec, tensor names and shapes, SHA-256 of each part's payload, metrics,
  created).

Refusals are ``RefusedError`` with one of ``REASONS``. Pure: no sockets, threads, clocks or files.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmq import codec
from fedmq.errors import DecodeError
from fedmq.wire import GlobalModel, ModelManifest, RoundAnnouncement, Signature, model_digest

#: Why a device refused a model or an announcement (counted in its ``ignored``):
#: ``unsigned``: no signature; ``untrusted_key``: signed by a key not pinned; ``bad_signature``:
#: the signature does not verify (the signed bytes or the signature were changed);
#: ``altered``: validly signed, but the message differs from what was signed (its tensors,
#: digest, shapes, codec, header, metrics or ``created``); ``wrong_part``: a chunked model's
#: part whose payload is not the one the manifest signs (changed, or swapped in from another
#: version).
REASONS = ("unsigned", "untrusted_key", "bad_signature", "altered", "wrong_part")

KEY_BYTES = 32


class RefusedError(Exception):
    """A message that must not be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---------------------------------------------------------------- keys


def key_id(public: Ed25519PublicKey) -> str:
    """The key's name on the wire: the first 8 bytes of SHA-256 of its 32 raw bytes, as hex."""
    return hashlib.sha256(raw_public(public)).hexdigest()[:16]


def raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_text(public: Ed25519PublicKey) -> str:
    """The public key as agent.toml's ``trusted_keys`` takes it: base64 of its 32 raw bytes."""
    return base64.b64encode(raw_public(public)).decode("ascii")


def parse_public(text: str) -> Ed25519PublicKey:
    """A public key from ``public_text`` (base64) or 64 hex digits; ValueError otherwise."""
    text = text.strip()
    try:
        raw = (bytes.fromhex(text) if len(text) == 2 * KEY_BYTES
               else base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ValueError("not an Ed25519 public key (44 characters of base64, or 64 hex "
                         "digits, as `fedmq keys generate` prints)")
    return Ed25519PublicKey.from_public_bytes(raw)


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """The private key as an unencrypted PKCS#8 PEM file (keep it 0600)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private(pem: bytes) -> Ed25519PrivateKey:
    """A private key from ``private_pem``'s bytes; ValueError if it is not an Ed25519 key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"a {type(key).__name__}, not an Ed25519 key")
    return key


# ---------------------------------------------------------------- signing


def manifest_of(model: GlobalModel, parts: Sequence[bytes] = ()) -> ModelManifest:
    """The manifest of ``model`` (whole, with its tensors) published as ``parts`` (the part
    payloads, in order; none when it goes out whole)."""
    return ModelManifest(
        federation=model.federation, run=model.run, version=model.version, round=model.round,
        sha256=model.sha256, chunks=max(1, len(parts)), codec="fp32",
        shapes=tuple((t.name, t.shape) for t in model.tensors),
        parts=tuple(hashlib.sha256(p).digest() for p in parts), metrics=dict(model.metrics),
        created=model.created)


class Signer:
    """Signs with the aggregator's private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key.public_key())

    def _sig(self, signed: bytes) -> Signature:
        return Signature(key=self.key_id, signed=signed, ed25519=self._key.sign(signed))

    def round(self, ann: RoundAnnouncement) -> RoundAnnouncement:
        """``ann`` with a signature over its own encoding."""
        return dataclasses.replace(
            ann, sig=self._sig(codec.encode(dataclasses.replace(ann, sig=None))))

    def model(self, head: GlobalModel, manifest: ModelManifest) -> GlobalModel:
        """``head`` (the whole model, or a chunked model's manifest message) signed."""
        return dataclasses.replace(head, sig=self._sig(codec.encode_manifest(manifest)))


# ---------------------------------------------------------------- verifying


class Verifier:
    """Checks signatures against the pinned keys (several during a key rotation)."""

    def __init__(self, trusted: Iterable[Ed25519PublicKey]) -> None:
        self.keys = {key_id(k): k for k in trusted}
        if not self.keys:
            raise ValueError("a Verifier needs at least one trusted key")

    def _signed(self, sig: Signature | None) -> bytes:
        if sig is None:
            raise RefusedError("unsigned", "no signature")
        key = self.keys.get(sig.key)
        if key is None:
            raise RefusedError("untrusted_key", f"signed by key {sig.key!r}, which is not trusted")
        signed = bytes(sig.signed)
        try:
            key.verify(bytes(sig.ed25519), signed)
        except InvalidSignature:
            raise RefusedError("bad_signature", "the signature does not verify") from None
        return signed

    def round(self, ann: RoundAnnouncement) -> None:
        """Raise ``RefusedError`` unless ``ann`` is exactly what a trusted key signed."""
        signed = self._signed(ann.sig)
        try:
            inner = codec.decode_as(signed, RoundAnnouncement)
        except DecodeError:
            raise RefusedError("altered", "the signed bytes are not an announcement") from None
        if dataclasses.replace(ann, sig=None) != inner:
            raise RefusedError("altered", "the announcement differs from the one signed")

    def manifest(self, head: GlobalModel) -> ModelManifest:
        """The signed manifest of a whole model or of a chunked model's manifest message,
        checked against its header; ``RefusedError`` otherwise."""
        signed = self._signed(head.sig)
        try:
            m = codec.decode_manifest(signed)
        except DecodeError:
            raise RefusedError("altered", "the signed bytes are not a model manifest") from None
        if (m.federation, m.run, m.version, m.round, m.sha256, m.chunks) != (
                head.federation, head.run, head.version, head.round, head.sha256, head.chunks):
            raise RefusedError("altered", "the model's header differs from the signed manifest")
        # Decoded alike on both sides (non-finite values dropped, numbers as floats).
        if dict(head.metrics) != dict(m.metrics) or head.created != m.created:
            raise RefusedError("altered", "the model's metrics or created differ from the "
                               "signed manifest")
        return m

    @staticmethod
    def part(m: ModelManifest, chunk: int, payload: bytes | memoryview) -> None:
        """Raise ``RefusedError("wrong_part")`` unless ``payload`` is part ``chunk`` as signed."""
        if chunk >= len(m.parts) or hashlib.sha256(payload).digest() != m.parts[chunk]:
            raise RefusedError("wrong_part", f"part {chunk} is not the one the manifest signs")

    @staticmethod
    def whole(m: ModelManifest, model: GlobalModel) -> None:
        """Raise ``RefusedError("altered")`` unless the (assembled) model's tensors are the signed
        ones: names, shapes and codec as listed, and the signed digest."""
        if tuple((t.name, t.shape) for t in model.tensors) != m.shapes or any(
                t.codec != m.codec for t in model.tensors):
            raise RefusedError("altered", "tensor names, shapes or codec are not the signed ones")
        if model_digest(model.tensors) != m.sha256:
            raise RefusedError("altered", "the tensors' digest is not the signed one")
