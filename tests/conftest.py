"""Fixtures shared by every test directory: a real Mosquitto on a free port.

The broker binary comes from Debian's ``mosquitto`` package. Without it the broker tests are
skipped on a workstation, but fail under CI (``CI`` set): CI must exercise the real path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import pytest
from hypothesis import settings

from fedmq.broker import MosquittoBroker, default_config_dir, mosquitto_binary
from fedmq.nats_cluster import NatsCluster

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


class NatsClusterFactory(Protocol):
    """Type of the ``nats_cluster_factory`` fixture."""

    def __call__(self, nodes: int = 3, *, shards: Mapping[str, int] | None = None,
                 max_payload: int = 8 * 1024 * 1024) -> NatsCluster: ...


@pytest.fixture
def nats_cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsClusterFactory]:
    """Start NATS JetStream clusters serving MQTT 3.1.1 on free loopback ports (the ``cluster``
    extra's nats-server, which the dev extra installs: missing, the test fails); each started
    and waited for, all stopped at teardown. Logs: ``cluster.log_path(i)``."""
    started: list[NatsCluster] = []

    def start(nodes: int = 3, *, shards: Mapping[str, int] | None = None,
              max_payload: int = 8 * 1024 * 1024) -> NatsCluster:
        cluster = NatsCluster(nodes, workdir=tmp_path_factory.mktemp("nats"), shards=shards,
                              max_payload=max_payload)
        started.append(cluster)
        cluster.start()
        return cluster

    yield start
    for cluster in started:
        cluster.stop()
