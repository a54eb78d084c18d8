"""The cryptographic primitives of a round, all from ``cryptography`` (nothing hand-written).

* key agreement: X25519; the shared secret goes through HKDF-SHA256 with the round's context as
  salt and the key's purpose as info, so a mask seed and a sealing key never coincide and no key
  is reused across federations, runs or rounds;
* mask generator: AES-256-CTR keyed by a 32-byte seed, zero nonce, over zero bytes: the keystream
  read as little-endian uint32 (each seed is used for one vector of one round only);
* share sealing: AES-256-GCM with a random 12-byte nonce in front of the ciphertext; the
  associated data binds the round context and both device ids, so the server cannot move a
  sealed share to another pair or round.

``Random`` is where randomness comes from (``os.urandom``; tests pass a seeded one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmq.secagg.fixedpoint import U32

Random = Callable[[int], bytes]
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

_MASK_INFO = b"fedmq/secagg/mask"
_SEAL_INFO = b"fedmq/secagg/seal"
_ZERO_NONCE = bytes(16)


class SealError(ValueError):
    """A sealed share did not open: wrong key, altered bytes, or another pair's or round's."""


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What a round's keys are bound to."""

    federation: str
    run: int
    round: int

    def salt(self) -> bytes:
        return f"fedmq/v1/{self.federation}/{self.run}/{self.round}".encode()


class KeyPair:
    """An X25519 key pair; ``secret`` is the 32 private bytes (Shamir-shared for the mask key)."""

    __slots__ = ("_private", "public", "secret")

    def __init__(self, secret: bytes) -> None:
        self._private = X25519PrivateKey.from_private_bytes(secret)
        self.secret = secret
        self.public = public_bytes(self._private.public_key())

    @classmethod
    def generate(cls, random: Random = os.urandom) -> KeyPair:
        return cls(random(KEY_BYTES))

    def agree(self, peer_public: bytes, ctx: RoundContext, info: bytes) -> bytes:
        """HKDF(X25519(self, peer)) for ``info``: the same bytes on both ends."""
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        return HKDF(hashes.SHA256(), KEY_BYTES, ctx.salt(), info).derive(shared)

    def mask_seed(self, peer_public: bytes, ctx: RoundContext) -> bytes:
        return self.agree(peer_public, ctx, _MASK_INFO)

    def seal_key(self, peer_public: bytes, ctx: RoundContext) -> bytes:
        return self.agree(peer_public, ctx, _SEAL_INFO)


def public_bytes(key: X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def valid_public(raw: bytes) -> bool:
    """A 32-byte X25519 public key that ``cryptography`` accepts."""
    if len(raw) != KEY_BYTES:
        return False
    try:
        X25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return False
    return True


def prg(seed: bytes, n: int) -> U32:
    """``n`` uint32 values from the AES-CTR keystream of ``seed`` (32 bytes)."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = enc.update(bytes(4 * n)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def _aad(ctx: RoundContext, sender: str, recipient: str) -> bytes:
    return ctx.salt() + b"\x00" + sender.encode() + b"\x00" + recipient.encode()


def seal(key: bytes, ctx: RoundContext, sender: str, recipient: str, plaintext: bytes, *,
         random: Random = os.urandom) -> bytes:
    """``nonce | AES-GCM(plaintext)`` for ``recipient``."""
    nonce = random(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(ctx, sender, recipient))


def open_sealed(key: bytes, ctx: RoundContext, sender: str, recipient: str,
                sealed: bytes) -> bytes:
    """The plaintext of ``seal``'s output, or ``SealError``."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise SealError("sealed share too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                   _aad(ctx, sender, recipient))
    except InvalidTag:
        raise SealError("sealed share does not open") from None
