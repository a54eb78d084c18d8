"""A real Prometheus scrapes a real aggregator (over a real Mosquitto) and its query API returns
the round counter and the per-reason rejection counters with the values the test caused.

The binary comes from Debian's ``prometheus`` package (``scripts/test`` installs it). Without it
the test is skipped on a workstation, but fails under CI (``CI`` set), like the broker tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.service import REJECT_REASONS
from fedmq import codec
from fedmq.broker import MosquittoBroker, find_free_port
from fedmq.config import MetricsConfig
from fedmq.wire import DeviceStatus

from fedhelpers import (
    Recorder,
    aggregator_config,
    broker_config,
    random_delta,
    running_aggregator,
    unique_federation,
    update_payload,
)

_INSTALL_HINT = (
    "prometheus not found (looked on PATH and at /usr/bin/prometheus): install it with "
    "`sudo apt-get install prometheus` (Debian/Ubuntu; scripts/test does it when it may)"
)


def require_prometheus() -> str:
    """The prometheus binary; skip the test without it, or fail it under CI."""
    binary = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)
    if binary is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{_INSTALL_HINT}; CI never skips the Prometheus test", pytrace=False)
        pytest.skip(_INSTALL_HINT)
    return binary


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class Prometheus:
    """A Prometheus process scraping one target every second, on a free port."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: fedmq\n    static_configs:\n"
            f"      - targets: ['{target}']\n", encoding="utf-8")
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready within {timeout} s:\n{self.log()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (``/api/v1/query``)."""
        answer = _get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def values(self, expr: str, label: str = "") -> dict[str, float]:
        """``expr``'s samples as {value of ``label``: value}."""
        return {sample["metric"].get(label, ""): float(sample["value"][1])
                for sample in self.query(expr)}

    def wait_for(self, expr: str, want: dict[str, float], label: str = "",
                 timeout: float = 20.0) -> None:
        """Poll until ``expr`` returns exactly ``want`` (scrapes run every second)."""
        end = time.monotonic() + timeout
        got: dict[str, float] = {}
        while time.monotonic() < end:
            got = self.values(expr, label)
            if got == want:
                return
            time.sleep(0.25)
        raise AssertionError(f"{expr}: Prometheus returned {got}, expected {want}\n"
                             f"targets: {_get_json(f'{self.url}/api/v1/targets')}\n{self.log()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    binary = require_prometheus()
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        prom = Prometheus(binary, target, tmp_path)
        started.append(prom)
        prom.wait_ready()
        return prom

    yield start
    for prom in started:
        prom.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_prometheus_scrapes_rounds_and_rejections(
        mosquitto: MosquittoBroker, prometheus_factory: Callable[[str], Prometheus]) -> None:
    fed = unique_federation("prom")
    broker = broker_config(mosquitto)
    listen = f"127.0.0.1:{find_free_port()}"
    config = aggregator_config(broker, fed, max_rounds=0)  # keeps serving after round 2
    config = replace(config, metrics=MetricsConfig(listen=listen))
    rec = Recorder(broker, fed).start()
    prom = prometheus_factory(listen)
    try:
        with running_aggregator(config) as agg:
            rng = np.random.default_rng(7)
            publish = rec.transport.publish
            topics = rec.topics
            publish(topics.status("dev-a"), codec.encode(DeviceStatus(fed, "dev-a", "online")),
                    retain=True)
            rec.wait_for(lambda r: 0 in r.models())
            base = rec.models()[0]
            # Round 1: two malformed payloads and one for another federation, then quorum.
            publish(topics.update("bad-1"), b"\x93not msgpack\xc1")
            publish(topics.update("bad-2"), b"")
            publish(topics.update("bad-3"),
                    update_payload("someone-else", "bad-3", random_delta(base, rng)))
            old = update_payload(fed, "late", random_delta(base, rng))  # for round 1, sent later
            first = update_payload(fed, "dev-a", random_delta(base, rng))
            publish(topics.update("dev-a"), first)
            publish(topics.update("dev-b"), update_payload(fed, "dev-b", random_delta(base, rng)))
            rec.wait_for(lambda r: 1 in r.models())
            # Round 2: a round-1 update (stale) and a device's update sent twice (duplicate).
            v1 = rec.models()[1]
            again = update_payload(fed, "dev-a", random_delta(v1, rng), round_=2, base_version=1)
            publish(topics.update("late"), old)
            publish(topics.update("dev-a"), again)
            publish(topics.update("dev-a"), again)
            publish(topics.update("dev-b"), update_payload(
                fed, "dev-b", random_delta(v1, rng), round_=2, base_version=1))
            rec.wait_for(lambda r: 2 in r.models())

            expected = dict.fromkeys(REJECT_REASONS, 0.0) | {
                "malformed": 2.0, "wrong_federation": 1.0, "stale": 1.0, "duplicate": 1.0}
            assert dict(agg.stats.rejected) == {k: v for k, v in expected.items() if v}
            prom.wait_for("fedmq_rounds_completed_total", {"": 2.0})
            prom.wait_for("fedmq_updates_rejected_total", expected, label="reason")
            prom.wait_for("fedmq_updates_accepted_total", {"": 4.0})
            prom.wait_for("fedmq_model_version", {"": 2.0})
            prom.wait_for("fedmq_round", {"": 3.0})
            prom.wait_for("fedmq_devices_online", {"": 1.0})
            prom.wait_for("fedmq_round_phase", {"open": 0.0, "waiting": 1.0, "stopped": 0.0},
                          label="phase")
            prom.wait_for('up{job="fedmq"}', {"": 1.0})
            steps = prom.values("fedmq_fold_seconds_count")[""]
            assert steps >= 1
            print("prometheus:",
                  prom.query("fedmq_rounds_completed_total"),
                  prom.values("fedmq_updates_rejected_total", "reason"))
    finally:
        rec.stop()
