"""docs/operations.md's provisioning commands, run as written over a real Mosquitto.

Substituted: the broker's name (``mqtt.example.com`` -> ``127.0.0.1``) and port (8883 -> a free
one); the broker runs the written ``mosquitto.conf`` through ``MosquittoBroker`` (its one
listener bound to loopback) and ``kill -HUP`` is its ``reload()``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_mosquitto

from fedmq.broker import MosquittoBroker, find_free_port
from fedmq.config import BrokerConfig, load_agent
from fedmq.transport import PahoTransport

from fedhelpers import marked_blocks

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "operations.md"


def _sh(block: str, cwd: Path, port: int, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    script = block.replace("mqtt.example.com", "127.0.0.1").replace("8883", str(port))
    # `fedmq` as the installed command would run it, from this checkout.
    shim = cwd / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "fedmq").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedmq.cli "$@"\n')
    (shim / "fedmq").chmod(0o755)
    environ = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}",
                   PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=120, check=False)


def _connects(cfg: BrokerConfig) -> bool:
    transport = PahoTransport(cfg, client_id=cfg.username or "cert-client")
    transport.start()
    try:
        return transport.wait_connected(5)
    finally:
        transport.stop()


def _device(out: Path, device: str, port: int) -> BrokerConfig:
    cfg = load_agent(out / "devices" / device / "agent.toml").broker
    assert (cfg.host, cfg.port) == ("127.0.0.1", port)
    return BrokerConfig(**{**cfg.__dict__, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5})


def test_operations_page_provisioning_commands(tmp_path: Path) -> None:
    binary = require_mosquitto()
    blocks = marked_blocks(PAGE, "provision")
    assert set(blocks) == {"agent-template", "password", "cert", "watch", "rotate", "revoke"}
    (tmp_path / "agent-template.toml").write_text(blocks["agent-template"])
    port = find_free_port()
    for name in ("password", "cert"):
        done = _sh(blocks[name], tmp_path, port)
        assert done.returncode == 0, done.stderr
    assert load_agent(tmp_path / "fleet" / "devices" / "digits-0001" / "agent.toml").data \
        .num_shards == 3

    with MosquittoBroker(tmp_path / "fleet-certs" / "broker" / "mosquitto.conf", port=port,
                         binary=binary) as broker:
        assert _connects(_device(tmp_path / "fleet-certs", "digits-0002", broker.port))

    out = tmp_path / "fleet"
    with MosquittoBroker(out / "broker" / "mosquitto.conf", port=port, binary=binary) as broker:
        # --revoke deletes devices/ID/ (its ca.crt too): the old configs use the CA's copy
        old2, old3 = (BrokerConfig(**{**_device(out, f"digits-000{n}", port).__dict__,
                                      "ca_file": str(out / "ca" / "ca.crt")}) for n in (2, 3))
        assert _connects(old2)
        assert _connects(old3)
        watch = _sh(blocks["watch"].rstrip() + " --once --exit-after 3", tmp_path, port)
        assert watch.returncode == 0, watch.stderr
        assert "digits" in watch.stdout

        for name in ("rotate", "revoke"):
            done = _sh(blocks[name], tmp_path, port)
            assert done.returncode == 0, done.stderr
        broker.reload()  # kill -HUP
        time.sleep(0.5)
        assert not _connects(old2)  # rotated away
        assert not _connects(old3)  # revoked
        assert _connects(_device(out, "digits-0002", port))  # the new credential
        assert _connects(_device(out, "digits-0001", port))  # untouched
