"""The demo signs its models and announcements (docs/security.md, "Signed models"): a key made
in a temporary directory for the run, trusted by every simulated device and by the watcher;
``--no-signing`` turns it off."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
from pathlib import Path

from fedmq import keys
from fedmq.config import AggregatorConfig, SigningConfig
from fedmq.signed_gate import SignedGate
from fedmq.signing import Verifier, parse_public


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-signing", action="store_true",
                   help="do not sign models and announcements (by default the demo signs with "
                        "a key made in a temporary directory, and every device verifies)")


def demo_key(stack: contextlib.ExitStack, args: argparse.Namespace
             ) -> tuple[str | None, list[str]]:
    """A new private key in a temporary directory (removed with ``stack``) and its public key
    for the devices and the watcher; (None, []) with ``--no-signing``."""
    if getattr(args, "no_signing", False):
        return None, []
    out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmq-demo-key-")))
    private, public = keys.generate(out)
    return str(private), [public]


def signed(config: AggregatorConfig, key: str | None) -> AggregatorConfig:
    """``config`` signing with ``key`` (unchanged without one)."""
    if key is None:
        return config
    return dataclasses.replace(config, security=SigningConfig(signing_key=key))


def device_gate(trusted: list[str]) -> SignedGate | None:
    """One device's signature check for the demo's key; None when the demo does not sign."""
    if not trusted:
        return None
    return SignedGate(Verifier([parse_public(k) for k in trusted]))
