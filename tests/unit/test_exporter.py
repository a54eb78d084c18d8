"""The Prometheus exporter: scraped over real HTTP from an aggregator on an in-memory hub.

The aggregator runs its own worker thread; a second ``MemoryTransport`` plays the devices.
``/metrics`` is parsed with prometheus_client's own text parser, and every value is checked
against what was sent.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.exporter import PHASES, Exporter, parse_listen
from aggregator.service import ABANDON_REASONS, REJECT_REASONS, AggregatorService
from fedmq import codec
from fedmq.compression import encode_all
from fedmq.config import AggregatorConfig, MetricsConfig, ModelConfig, RoundsConfig
from fedmq.errors import ConfigError
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.models import init_mlp
from fedmq.topics import Topics
from fedmq.wire import DeviceStatus, Evaluation, ModelUpdate

FED = "exporter-test"
TOPICS = Topics(FED)
LAYERS = [4, 3]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_config(port: int) -> AggregatorConfig:
    return AggregatorConfig(
        federation=FED, model=ModelConfig(layers=LAYERS, seed=1),
        rounds=RoundsConfig(min_updates=2, max_updates=2, deadline_s=600.0, grace_s=0.0),
        metrics=MetricsConfig(listen=f"127.0.0.1:{port}"))


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


def scrape(port: int) -> Samples:
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def update(device: str, round_: int, base: int, rng: np.random.Generator,
           federation: str = FED) -> bytes:
    delta = {name: (rng.standard_normal(w.shape) * 0.01).astype(np.float32)
             for name, w in init_mlp(LAYERS, 1).items()}
    return codec.encode(ModelUpdate(federation=federation, device_id=device, round=round_,
                                    base_version=base, update_id=uuid.uuid4().hex,
                                    num_examples=10, tensors=encode_all(delta)))


@pytest.fixture
def fleet() -> Iterator[tuple[AggregatorService, MemoryTransport, int]]:
    """A started aggregator serving metrics on a free port, and a client on the same hub."""
    hub = MemoryHub()
    port = free_port()
    agg = AggregatorService(make_config(port), MemoryTransport(hub))
    agg.start(connect_timeout=0.0)
    devices = MemoryTransport(hub)
    devices.start()
    try:
        yield agg, devices, port
    finally:
        agg.stop()


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_listen(":9464") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:9") == ("::1", 9)
    with pytest.raises(ConfigError, match=r"\[metrics\] listen = 'nope'"):
        parse_listen("nope")


def test_metrics_read_the_services_counters(
        fleet: tuple[AggregatorService, MemoryTransport, int]) -> None:
    agg, devices, port = fleet
    samples = scrape(port)
    # Every reason is there from the start, at 0.
    for reason in REJECT_REASONS:
        assert value(samples, "fedmq_updates_rejected_total", reason=reason) == 0
    for reason in ABANDON_REASONS:
        assert value(samples, "fedmq_rounds_abandoned_total", reason=reason) == 0
    assert value(samples, "fedmq_rounds_completed_total") == 0
    assert value(samples, "fedmq_round") == 1
    assert value(samples, "fedmq_round_phase", phase="waiting") == 1
    assert not any(name.startswith("fedmq_eval_") for name, _ in samples)

    rng = np.random.default_rng(0)
    sent = [update("a", 1, 0, rng), b"\x93junk\xc1", update("c", 1, 0, rng, federation="x"),
            update("d", 1, 0, rng)]
    for device, payload in zip("abcd", sent, strict=True):
        devices.publish(TOPICS.update(device), payload)
    devices.publish(TOPICS.status("a"), codec.encode(DeviceStatus(FED, "a", "online")))
    devices.publish(TOPICS.status("b"), codec.encode(DeviceStatus(FED, "b", "training")))
    devices.publish(TOPICS.status("c"), codec.encode(DeviceStatus(FED, "c", "offline")))
    devices.publish(TOPICS.status("d"), b"not a status")
    wait_until(lambda: agg.stats.rounds_completed == 1 and agg.presence.ignored.total() == 1)
    # Devices evaluate the new model (version 1): 0.5 and 0.7 weighted 10:30.
    for device, loss, n in (("a", 0.5, 10), ("d", 0.7, 30)):
        devices.publish(TOPICS.eval(device), codec.encode(Evaluation(
            FED, device, version=1, num_examples=n, metrics={"loss": loss, "accuracy": 0.8})))
    wait_until(lambda: "fedmq_eval_version" in {n for n, _ in scrape(port)})

    samples = scrape(port)
    assert value(samples, "fedmq_rounds_completed_total") == 1
    assert value(samples, "fedmq_updates_accepted_total") == 2
    assert value(samples, "fedmq_updates_rejected_total", reason="malformed") == 1
    assert value(samples, "fedmq_updates_rejected_total", reason="wrong_federation") == 1
    assert sum(value(samples, "fedmq_updates_rejected_total", reason=r)
               for r in REJECT_REASONS) == 2
    assert value(samples, "fedmq_bytes_received_total") == sum(len(p) for p in sent)
    assert value(samples, "fedmq_model_version") == 1
    assert value(samples, "fedmq_round") == 2
    assert {p: value(samples, "fedmq_round_phase", phase=p) for p in PHASES} == {
        "open": 0, "waiting": 1, "stopped": 0}
    assert value(samples, "fedmq_devices_online") == 2
    assert value(samples, "fedmq_devices_offline") == 1
    assert value(samples, "fedmq_status_ignored_total", reason="malformed") == 1
    assert value(samples, "fedmq_eval_version") == 1
    assert value(samples, "fedmq_eval_loss") == pytest.approx((0.5 * 10 + 0.7 * 30) / 40)
    assert value(samples, "fedmq_eval_accuracy") == pytest.approx(0.8)
    assert value(samples, "fedmq_norm_bound") == pytest.approx(agg.bound.bound())
    # Histograms: one observation per worker step that handled messages.
    steps = value(samples, "fedmq_fold_seconds_count")
    assert 1 <= steps <= 10  # 10 messages, in batches of up to 8
    assert value(samples, "fedmq_inbox_depth_count") == steps
    assert 0 < value(samples, "fedmq_fold_seconds_sum") < 10
    assert value(samples, "fedmq_fold_seconds_bucket", le="+Inf") == steps


def test_healthz_is_200_while_connected_and_working_else_503(
        fleet: tuple[AggregatorService, MemoryTransport, int]) -> None:
    agg, _, port = fleet
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200
    assert json.loads(body) == {"status": "ok", "connected": True, "worker_alive": True,
                                "round": 1, "version": 0, "phase": "waiting"}
    assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    agg.transport.stop()  # leaves the hub: disconnected from the "broker"
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503
    assert json.loads(body)["connected"] is False
    assert json.loads(body)["status"] == "unavailable"


def test_healthz_is_503_without_a_worker() -> None:
    agg = AggregatorService(make_config(free_port()), MemoryTransport())
    agg.transport.start()
    exporter = Exporter(agg, agg.config.metrics.listen, worker_alive=lambda: False)
    exporter.start()
    try:
        status, body = get(f"http://127.0.0.1:{exporter.port}/healthz")
        assert status == 503
        assert json.loads(body) == {"status": "unavailable", "connected": True,
                                    "worker_alive": False, "round": 0, "version": 0,
                                    "phase": "stopped"}
        assert value(scrape(exporter.port), "fedmq_round_phase", phase="stopped") == 1
    finally:
        exporter.close()


def test_a_port_in_use_is_a_config_error_and_leaves_nothing_running() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agg = AggregatorService(make_config(port), MemoryTransport())
        before = threading.active_count()
        with pytest.raises(ConfigError, match=rf"^\[metrics\] listen = '127.0.0.1:{port}': "
                                              r"cannot serve there \(Address already in use\)"):
            agg.start(connect_timeout=0.0)
        assert agg.exporter is None
        assert threading.active_count() <= before  # the worker was stopped again


def test_close_stops_the_thread_and_releases_the_port() -> None:
    port = free_port()
    agg = AggregatorService(make_config(port), MemoryTransport())
    for _ in range(2):  # the second exporter binds the port the first released
        exporter = Exporter(agg, agg.config.metrics.listen, worker_alive=lambda: True)
        exporter.start()
        assert exporter.port == port
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        exporter.close()
        exporter.close()  # idempotent
        assert not [t for t in threading.enumerate() if t.name == "aggregator-metrics"]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
