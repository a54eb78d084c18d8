"""Key files for signed models: ``fedmq keys generate`` and the aggregator's ``[security]
signing_key`` (docs/security.md, "Signed models")."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedmq import signing
from fedmq.errors import ConfigError

PRIVATE_NAME = "signing_key.pem"
PUBLIC_NAME = "signing_key.pub"


def generate(out: Path) -> tuple[Path, str]:
    """Write a new key pair into ``out``: the private key (mode 0600, never overwritten) and its
    public key as one line of base64; return the private key's path and the public key."""
    out.mkdir(parents=True, exist_ok=True)
    private = out / PRIVATE_NAME
    key = signing.generate()
    # O_EXCL: an existing key is never replaced (devices trust it); 0600 from the first byte.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(signing.private_pem(key))
    public = signing.public_text(key.public_key())
    (out / PUBLIC_NAME).write_text(public + "\n", encoding="ascii")
    return private, public


def load_signer(path: str) -> signing.Signer:
    """The signer of ``[security] signing_key``; a ConfigError names the key otherwise."""
    where = f'[security] signing_key = "{path}" must be an Ed25519 private key file'
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where} (cannot read it: {exc.strerror or exc}; create one with "
                          "`fedmq keys generate --out DIR`)") from None
    try:
        return signing.Signer(signing.load_private(pem))
    except ValueError as exc:
        raise ConfigError(f"{where} ({exc})") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_command", required=True)
    g = sub.add_parser("generate", help="a new Ed25519 key pair: the private key for the "
                                        "aggregator, the public key for agent.toml")
    g.add_argument("--out", required=True, type=Path,
                   help=f"directory for {PRIVATE_NAME} (mode 0600) and {PUBLIC_NAME}")


def run(args: argparse.Namespace) -> int:
    """``fedmq keys generate --out DIR``."""
    try:
        private, public = generate(args.out)
    except FileExistsError:
        raise ConfigError(f"{args.out / PRIVATE_NAME} exists: devices may trust it, so it is "
                          "never overwritten (choose another --out for a new key)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write a key into {args.out}: {exc.strerror or exc}") from None
    print(f"private key: {private} (mode 0600; keep it on the aggregator only)\n"
          f"public key:  {public} (also in {args.out / PUBLIC_NAME})\n\n"
          f'aggregator.toml:\n[security]\nsigning_key = "{private}"\n\n'
          f'agent.toml:\n[security]\ntrusted_keys = ["{public}"]')
    return 0
