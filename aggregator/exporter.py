"""The aggregator's Prometheus endpoint (``/metrics``) and health check (``/healthz``), served on
``[metrics] listen`` by one small HTTP server thread (docs/operations.md, "Metrics and health
checks", lists every metric).

Counters the service already keeps (``Stats``, the round machine, ``Presence``) are read when
Prometheus scrapes, by a custom collector: no second set of books that could drift from the
first. Only the two histograms need observations, which the worker hands over with
``observe_step``. Every exporter has its own ``CollectorRegistry``, never prometheus_client's
global one, so several aggregators can run in one process (the tests do).

``prometheus_client`` is imported here only, and only when an exporter is made: the package is
in the ``aggregator`` extra, and an aggregator without ``[metrics] listen`` never needs it.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from aggregator.rounds import Phase
from fedmq.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.metrics_core import Metric

    from aggregator.service import AggregatorService

__all__ = ["DEPTH_BUCKETS", "FOLD_BUCKETS", "PHASES", "Exporter", "parse_listen"]

log = logging.getLogger(__name__)

#: The values of ``fedmq_round_phase{phase}`` (exactly one is 1).
PHASES: tuple[str, ...] = ("open", "waiting", "stopped")

#: ``fedmq_fold_seconds`` buckets: one worker step takes well under a millisecond for a small
#: model and up to seconds for a batch of large updates.
FOLD_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                   0.5, 1.0, 2.5, 5.0, 10.0)

#: ``fedmq_inbox_depth`` buckets (the transport's inbox holds at most 10,000 messages).
DEPTH_BUCKETS: tuple[float, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                    10_000)

#: The 0.0.4 text format, which every Prometheus 2.x reads (newer prometheus_client versions
#: advertise 1.0.0 as their latest, which older servers do not know).
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:9464`` for IPv6; an empty host is every interface) as (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"[metrics] listen = {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:9464")
    host = host.removeprefix("[").removesuffix("]")
    return host or "0.0.0.0", int(port)


class _Collector:
    """Reads the service's counters and state at scrape time.

    The worker thread writes these while a scrape reads them; each read is of one int, one
    float or a copy of one dict (atomic in CPython), so a scrape sees each value as it was at
    some instant of the scrape, never a torn one.
    """

    def __init__(self, service: AggregatorService, worker_alive: Callable[[], bool]) -> None:
        self.service = service
        self.worker_alive = worker_alive

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from aggregator.service import ABANDON_REASONS, REJECT_REASONS

        s = self.service
        stats = s.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def by_reason(name: str, doc: str, counts: dict[str, int],
                      known: tuple[str, ...]) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["reason"])
            # Every known reason from the start (at 0), so rate() and alerts see the series
            # before its first increment; a reason added later still shows.
            for reason in (*known, *sorted(set(counts) - set(known))):
                family.add_metric([reason], counts.get(reason, 0))
            return family

        yield counter("fedmq_rounds_completed", "Rounds closed with a published model.",
                      stats.rounds_completed)
        yield by_reason("fedmq_rounds_abandoned", "Rounds dropped unpublished, by reason.",
                        dict(stats.abandoned), ABANDON_REASONS)
        yield counter("fedmq_updates_accepted", "Updates accepted into a round.", stats.accepted)
        yield by_reason("fedmq_updates_rejected", "Update messages rejected, by reason.",
                        dict(stats.rejected), REJECT_REASONS)
        yield counter("fedmq_updates_clipped", "Accepted updates scaled down to the norm bound.",
                      stats.clipped)
        yield counter("fedmq_bytes_received", "Bytes of update messages received.",
                      stats.bytes_in)
        yield gauge("fedmq_model_version", "Version of the latest published global model.",
                    s.version)
        yield gauge("fedmq_round", "Number of the current (or last) round.", s.round)
        phases = GaugeMetricFamily("fedmq_round_phase", "1 for the round's current phase: "
                                   "open (quorum reached), waiting (below quorum), stopped.",
                                   labels=["phase"])
        current = self.phase()
        for phase in PHASES:
            phases.add_metric([phase], 1.0 if phase == current else 0.0)
        yield phases
        presence = s.presence
        yield gauge("fedmq_devices_online", "Devices whose latest retained status is online or "
                    "training.", presence.online)
        yield gauge("fedmq_devices_offline", "Devices whose latest retained status is offline.",
                    presence.offline)
        yield by_reason("fedmq_status_ignored", "Device status messages ignored, by reason "
                        "(not update rejections).", dict(presence.ignored), ())
        latest = self.latest_eval()
        if latest is not None:
            version, means = latest
            yield gauge("fedmq_eval_version", "Model version of the latest federated "
                        "evaluation.", version)
            for key in ("loss", "accuracy"):
                value = means.get(f"eval_{key}")
                if value is not None:
                    yield gauge(f"fedmq_eval_{key}", f"Example-weighted mean {key} of the "
                                "devices' evaluations of that version.", value)
        bound = s.bound
        if bound.active and math.isfinite(bound.bound()):
            yield gauge("fedmq_norm_bound", "L2 norm bound applied to updates folded now.",
                        bound.bound())
        dp = s.privacy
        if dp is not None:  # docs/privacy.md
            yield gauge("fedmq_dp_epsilon", "Differential privacy: epsilon spent so far, at "
                        "fedmq_dp_delta (PLD accountant).", dp.epsilon)
            yield gauge("fedmq_dp_delta", "Differential privacy: the delta of the reported "
                        "epsilon.", dp.accountant.delta)
            yield counter("fedmq_dp_rounds", "Rounds finalized with noise (the accountant's "
                          "count).", dp.accountant.rounds)

    def phase(self) -> str:
        """``open``: a round is open and has its quorum; ``waiting``: open, below quorum;
        ``stopped``: no round open (finished, between two rounds, or no worker)."""
        if not self.worker_alive():
            return "stopped"
        match self.service.machine.phase:
            case Phase.QUORUM:
                return "open"
            case Phase.OPEN:
                return "waiting"
            case _:
                return "stopped"

    def latest_eval(self) -> tuple[int, dict[str, float]] | None:
        """(version, means) of the newest federated evaluation, or None before the first."""
        s = self.service
        evaluation = getattr(s, "evaluation", None) or getattr(
            getattr(s, "telemetry", None), "evaluation", None)
        if evaluation is None:
            return None
        try:
            entry = evaluation.latest()
            return (int(entry.version), dict(entry.means())) if entry is not None else None
        except RuntimeError:  # the worker added a version mid-read: skip it this scrape
            return None


class Exporter:
    """``/metrics`` and ``/healthz`` for one aggregator; ``start()`` binds, ``close()`` ends it."""

    def __init__(self, service: AggregatorService, listen: str, *,
                 worker_alive: Callable[[], bool]) -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram
        except ImportError:
            raise ConfigError(f"[metrics] listen = {listen!r}: needs the prometheus-client "
                              "package: pip install 'fedmq[aggregator]'") from None
        self.service = service
        self.listen = listen
        self.host, self.port = parse_listen(listen)
        self.worker_alive = worker_alive
        self.collector = _Collector(service, worker_alive)
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.fold_seconds: Histogram = Histogram(
            "fedmq_fold_seconds", "Time of one worker step handling and folding a batch of "
            "messages.", buckets=FOLD_BUCKETS, registry=self.registry)
        self.inbox_depth: Histogram = Histogram(
            "fedmq_inbox_depth", "Messages waiting in the inbox, sampled at each worker step "
            "that handled messages.", buckets=DEPTH_BUCKETS, registry=self.registry)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- worker side

    def observe_step(self, seconds: float, depth: int) -> None:
        """One worker step that handled messages: how long it took, and what still waits."""
        self.fold_seconds.observe(seconds)
        self.inbox_depth.observe(depth)

    # ---------------------------------------------------------------- reads

    def metrics(self) -> bytes:
        """The exposition text Prometheus scrapes."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body): healthy when connected to the broker and the worker thread runs."""
        s = self.service
        connected = bool(s.transport.wait_connected(0.0))
        alive = bool(self.worker_alive())
        ok = connected and alive
        return ok, {"status": "ok" if ok else "unavailable", "connected": connected,
                    "worker_alive": alive, "round": s.round, "version": s.version,
                    "phase": self.collector.phase()}

    # ---------------------------------------------------------------- server

    def start(self) -> None:
        """Bind ``listen`` and serve; a port in use (or a bad host) is a ``ConfigError``."""
        exporter = self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True  # a stuck client never holds up close()
            address_family = family

        class Handler(_Handler):
            owner = exporter

        try:
            server = Server((self.host, self.port), Handler)
        except OSError as exc:
            raise ConfigError(f"[metrics] listen = {self.listen!r}: cannot serve there "
                              f"({exc.strerror or exc}); pick a free port or stop what uses "
                              "it") from None
        self._server = server
        self.port = server.server_address[1]  # the real one when asked for port 0
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="aggregator-metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics, health check on /healthz",
                 self.host, self.port)

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /metrics and /healthz; anything else is 404."""

    owner: Exporter
    timeout = 10  # seconds a client may take to send its request
    server_version = "fedmq"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, _CONTENT_TYPE, self.owner.metrics())
            elif path == "/healthz":
                ok, body = self.owner.health()
                self._send(200 if ok else 503, "application/json",
                           json.dumps(body).encode() + b"\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or "
                           b"/healthz\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to tell it
        except Exception:  # a scrape must never take the server down: answer 500 and log
            log.exception("metrics endpoint error")
            with contextlib.suppress(OSError):
                self._send(500, "text/plain; charset=utf-8", b"internal error\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log: say nothing."""
