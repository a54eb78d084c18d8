"""Fixtures shared by every test directory: a real Mosquitto on a free port.

The broker binary comes from Debian's ``mosquitto`` package. Without it the broker tests are
skipped on a workstation, but fail under CI (``CI`` set): CI must exercise the real path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from hypothesis import settings

from fedmq.broker import MosquittoBroker, default_config_dir, mosquitto_binary

# CI runs the property tests with a fixed seed so a landing never hinges on a lucky draw; local
# runs keep exploring new examples (and their failures are kept in .hypothesis/).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

_INSTALL_HINT = (
    "mosquitto not found (looked on PATH and at /usr/sbin/mosquitto): install it with "
    "`sudo apt-get install mosquitto` (Debian/Ubuntu) or `brew install mosquitto` (macOS)"
)


@pytest.fixture(autouse=True)
def _no_device_id_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """``FEDMQ_DEVICE_ID`` would override every agent.toml's id: tests set it where they mean it."""
    monkeypatch.delenv("FEDMQ_DEVICE_ID", raising=False)


def require_mosquitto() -> str:
    """Return the mosquitto binary; skip the test without it, or fail it under CI."""
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{_INSTALL_HINT}; CI never skips broker tests", pytrace=False)
        pytest.skip(_INSTALL_HINT)
    return binary


@pytest.fixture(scope="module")
def mosquitto() -> Iterator[MosquittoBroker]:
    """A Mosquitto running ``fedmq/broker_config/dev.conf`` on a free loopback port.

    Shared by the tests of one module, so retained messages and sessions outlive a test:
    use topics (federation names) and client ids unique to each test.
    """
    binary = require_mosquitto()
    with MosquittoBroker(default_config_dir() / "dev.conf", binary=binary) as broker:
        yield broker


class MosquittoFactory(Protocol):
    """Type of the ``mosquitto_factory`` fixture."""

    def __call__(
        self, config_template: Path | None = None, port: int | None = None
    ) -> MosquittoBroker: ...


@pytest.fixture
def mosquitto_factory() -> Iterator[MosquittoFactory]:
    """Start private brokers (own config template, restarts, kills); all closed at teardown."""
    binary = require_mosquitto()
    started: list[MosquittoBroker] = []

    def start(config_template: Path | None = None, port: int | None = None) -> MosquittoBroker:
        broker = MosquittoBroker(config_template, port=port, binary=binary)
        started.append(broker)
        broker.start()
        return broker

    yield start
    for broker in started:
        broker.close()
