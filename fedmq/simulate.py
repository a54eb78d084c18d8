"""``fedmq simulate``: a fleet of N simulated devices in one process, for sizing a deployment.

One process holds N MQTT sessions (``fedmq.mqtt_async``: one socket and no thread per session,
all waited on by asyncio's epoll), each a simulated device (``fedmq.simulate_fleet``) that follows
the federation's retained round announcement and model and sends a small valid update per round,
after a delay drawn from ``--delay-ms`` and unless it drops out (``--dropout``). A line every few
seconds shows the progress; ``--json`` writes a summary. Runs until ``--rounds`` rounds the fleet
sent updates to have produced a new model, ``--duration`` seconds, or Ctrl-C.

The open-file limit is raised to the hard limit at start (each session is one file descriptor);
when N does not fit under the hard limit the command says so in one line and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.backoff import Backoff
from fedmq.mqtt_async import AsyncMqttClient, ConnectOptions, MqttError, Will
from fedmq.simulate_fleet import Delay, Fleet, SimDevice, status_payload
from fedmq.topics import check_name
from fedmq.wire import RoundSummary

__all__ = ["SimOptions", "add_arguments", "raise_nofile", "run", "simulate"]

#: File descriptors the process needs besides one per session (stdio, epoll, logs, imports).
FD_RESERVE = 64


@dataclass(slots=True)
class SimOptions:
    """What ``fedmq simulate`` is asked to do (the command's options)."""

    devices: int
    host: str
    port: int
    federation: str = "digits"
    rounds: int = 0
    duration_s: float = 0.0
    delay: Delay = field(default_factory=lambda: Delay("fixed", 0.0))
    dropout: float = 0.0
    connect_rate: float = 500.0
    mqtt5: bool = False
    #: QoS of the round and model subscriptions (0 on a NATS cluster: there every QoS 1
    #: subscription is a JetStream consumer, docs/scaling.md).
    subscribe_qos: int = 1
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 60
    status: bool = False
    prefix: str = "sim"
    seed: int = 0
    progress_s: float = 5.0


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; (old soft, new soft). Raises SystemExit
    with one line when ``needed`` descriptors do not fit under the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise SystemExit(
            f"fedmq simulate: {needed} open files needed (one per device plus {FD_RESERVE}) but "
            f"the hard limit is {hard}: raise it (ulimit -Hn, prlimit --nofile, systemd "
            "LimitNOFILE=) or simulate fewer devices")
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory in MB."""
    now = peak = 0.0
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return now, peak


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Simulation:
    """The fleet's sessions: connecting at ``connect_rate``, reconnecting with back-off, the
    progress line and the summary."""

    def __init__(self, opts: SimOptions, out: Any = sys.stdout) -> None:
        self.opts = opts
        self.out = out
        self.stop = asyncio.Event()
        self.fleet = Fleet(opts.federation, delay=opts.delay, dropout=opts.dropout,
                           status=opts.status, seed=opts.seed, on_round_done=self._round_done)
        self.devices = [SimDevice(self.fleet, i, f"{opts.prefix}-{i:05d}")
                        for i in range(opts.devices)]
        self.ssl = self._ssl_context() if opts.tls else None
        self.started = time.monotonic()
        self.all_connected_s: float | None = None
        self.summaries: dict[tuple[int, int], RoundSummary] = {}
        self.latency_ms: dict[tuple[int, int], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._backoff: dict[int, Backoff] = {}

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.opts.ca_file)
        if self.opts.cert_file:
            ctx.load_cert_chain(self.opts.cert_file, self.opts.key_file)
        return ctx

    def _round_done(self) -> None:
        if self.opts.rounds and len(self.fleet.stats.rounds_done) == self.opts.rounds:
            self._spawn(self._stop_after_summaries())

    async def _stop_after_summaries(self, timeout: float = 15.0) -> None:
        """Stop once the done rounds' summaries are in (they follow the model, behind its
        fan-out to every device), or after ``timeout``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.fleet.stats.rounds_done <= set(self.summaries):
            await asyncio.sleep(0.1)
        self.stop.set()

    # --- sessions --------------------------------------------------------------------------
    async def _connect(self, device: SimDevice) -> None:
        o, stats = self.opts, self.fleet.stats
        while not self.stop.is_set():
            will = (Will(self.fleet.topics.status(device.device_id),
                         status_payload(o.federation, device.device_id, "offline"))
                    if o.status else None)
            client = AsyncMqttClient(
                ConnectOptions(device.device_id, keepalive=o.keepalive,
                               username=_fill(o.username, device.device_id),
                               password=_fill(o.password, device.device_id),
                               will=will, mqtt5=o.mqtt5),
                device.on_message, self._on_lost)
            try:
                await client.connect(o.host, o.port, ssl_context=self.ssl)
                q = o.subscribe_qos
                filters = [(self.fleet.topics.round, q), (self.fleet.topics.model, q),
                           (self.fleet.topics.model_parts, q)]
                if device.index == 0:  # one session watches the round summaries
                    filters.append((self.fleet.topics.metrics, q))
                    client.on_message = self._watch_summaries(device)
                device.client = client
                stats.connects += 1
                stats.connected += 1
                stats.connected_max = max(stats.connected_max, stats.connected)
                if stats.connected == o.devices and self.all_connected_s is None:
                    self.all_connected_s = time.monotonic() - self.started
                self._backoff.pop(device.index, None)
                await client.subscribe(filters)
                device.on_connected()
                return
            except (TimeoutError, OSError, MqttError) as exc:
                stats.errors[_error_kind(exc)] += 1
                client.close()
                if device.client is client:
                    return  # connected, then lost while subscribing: _on_lost reconnects
                backoff = self._backoff.setdefault(device.index, Backoff(0.5, 30.0))
                await asyncio.sleep(backoff.next_delay())

    def _watch_summaries(self, device: SimDevice) -> Any:
        metrics = self.fleet.topics.metrics

        def on_message(client: AsyncMqttClient, topic: str, payload: bytes,
                       retained: bool) -> None:
            if topic == metrics:
                msg = self.fleet.decode(payload)
                if isinstance(msg, RoundSummary):
                    key = (device.run, msg.round)
                    self.summaries[key] = msg
                    # Now, while the round's acknowledgment times are still kept.
                    latency = self._latency(key)
                    if latency is not None:
                        self.latency_ms[key] = latency
                return
            device.on_message(client, topic, payload, retained)

        return on_message

    def _latency(self, key: tuple[int, int]) -> float | None:
        """Milliseconds from the broker's PUBACK of round ``key``'s last accepted update (as its
        summary lists them) to the round's model reaching the first device."""
        summary, stats = self.summaries.get(key), self.fleet.stats
        model_at, acked = stats.model_at.get(key), stats.ack_at.get(key, {})
        if summary is None or model_at is None:
            return None
        acks = [acked.get(uid) for dev, uid in summary.accepted
                if dev.startswith(self.opts.prefix + "-")]
        if not acks or None in acks:
            return None
        return round((model_at - max(a for a in acks if a is not None)) * 1000, 1)

    def _on_lost(self, client: AsyncMqttClient, exc: BaseException | None) -> None:
        device = next((d for d in self._owner(client)), None)
        if device is None or device.client is not client:
            return
        stats = self.fleet.stats
        stats.connected -= 1
        device.client = None
        if self.stop.is_set():
            return
        stats.disconnects += 1
        backoff = self._backoff.setdefault(device.index, Backoff(0.5, 30.0))
        self._spawn(self._reconnect_later(device, backoff.next_delay()))

    def _owner(self, client: AsyncMqttClient) -> list[SimDevice]:
        index = int(client.options.client_id.rsplit("-", 1)[1])
        return [self.devices[index]] if index < len(self.devices) else []

    async def _reconnect_later(self, device: SimDevice, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._connect(device)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_all(self) -> None:
        """Start each session at ``connect_rate`` per second, at most 1,000 handshakes open."""
        gate = asyncio.Semaphore(1000)
        interval = 1.0 / self.opts.connect_rate if self.opts.connect_rate > 0 else 0.0
        t0 = time.monotonic()

        async def one(device: SimDevice) -> None:
            async with gate:
                await self._connect(device)

        for i, device in enumerate(self.devices):
            if self.stop.is_set():
                return
            wait = t0 + i * interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._spawn(one(device))

    # --- progress and summary --------------------------------------------------------------
    def line(self) -> str:
        s = self.fleet.stats
        cpu = _cpu_s()
        rss, _ = _rss_mb()
        return (f"simulate {time.monotonic() - self.started:6.1f}s  connected {s.connected}/"
                f"{self.opts.devices} (max {s.connected_max})  rounds seen {len(s.rounds_seen)}"
                f" done {len(s.rounds_done)}  updates sent {s.updates_sent} acked "
                f"{s.updates_acked} dropped {s.dropped}  errors {sum(s.errors.values())}  "
                f"cpu {cpu:.1f}s rss {rss:.0f} MB")

    async def _progress(self) -> None:
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), self.opts.progress_s)
            except TimeoutError:
                print(self.line(), file=self.out, flush=True)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        try:
            self._spawn(self._connect_all())
            self._spawn(self._progress())
            if self.opts.duration_s > 0:
                loop.call_later(self.opts.duration_s, self.stop.set)
            await self.stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        print(self.line(), file=self.out, flush=True)
        await self._shutdown()
        return self.summary()

    async def _shutdown(self) -> None:
        self.fleet.stopping = True
        for task in list(self._tasks):
            task.cancel()
        for device in self.devices:
            if device.timer is not None:
                device.timer.cancel()
            if device.client is not None and device.client.connected:
                if self.opts.status:
                    device.client.publish(self.fleet.topics.status(device.device_id),
                                          status_payload(self.opts.federation,
                                                         device.device_id, "offline"),
                                          qos=0, retain=True)
                device.client.disconnect()
        await asyncio.sleep(0.2)  # let the DISCONNECTs leave

    def summary(self) -> dict[str, Any]:
        s = self.fleet.stats
        rss, peak = _rss_mb()
        rounds = []
        for key in sorted(s.rounds_sent):
            summary = self.summaries.get(key)
            detail: dict[str, Any] = {"run": key[0], "round": key[1],
                                      "model_seen": key in s.rounds_done}
            acked_at, model_at = s.last_ack_at.get(key), s.model_at.get(key)
            if acked_at is not None and model_at is not None:
                detail["last_ack_to_model_ms"] = round((model_at - acked_at) * 1000, 1)
            latency = self.latency_ms.get(key, self._latency(key))
            if latency is not None:
                detail["last_accepted_ack_to_model_ms"] = latency
            if summary is not None:
                detail.update(participants=summary.participants, closed_by=summary.closed_by,
                              accepted_from_fleet=sum(
                                  1 for dev, _ in summary.accepted
                                  if dev.startswith(self.opts.prefix + "-")))
            rounds.append(detail)
        return {
            "devices": self.opts.devices, "federation": self.opts.federation,
            "broker": f"{self.opts.host}:{self.opts.port}",
            "protocol": "mqtt5" if self.opts.mqtt5 else "mqtt3.1.1",
            "connected_max": s.connected_max, "all_connected_s": _r(self.all_connected_s),
            "connects": s.connects, "disconnects": s.disconnects,
            "updates_sent": s.updates_sent, "updates_acked": s.updates_acked,
            "dropped": s.dropped, "rounds": len(s.rounds_done), "rounds_seen": len(s.rounds_seen),
            "rounds_detail": rounds, "errors": sum(s.errors.values()),
            "errors_by_kind": dict(s.errors), "cpu_s": round(_cpu_s(), 2),
            "rss_mb": round(rss, 1), "rss_peak_mb": round(peak, 1),
            "elapsed_s": round(time.monotonic() - self.started, 2),
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _fill(template: str | None, device_id: str) -> str | None:
    return None if template is None else template.replace("{device}", device_id)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, MqttError):
        return "connack_refused" if exc.code else "connection_lost"
    if isinstance(exc, TimeoutError):
        return "connect_timeout"
    return f"connect_{type(exc).__name__}"


async def simulate(opts: SimOptions, out: Any = sys.stdout) -> dict[str, Any]:
    """Run a simulation to its end and return the summary."""
    return await Simulation(opts, out).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fedmq simulate``."""
    p.add_argument("--devices", type=int, required=True, metavar="N",
                   help="simulated devices, one MQTT session each")
    p.add_argument("--broker", required=True, metavar="HOST:PORT")
    p.add_argument("--federation", default="digits", metavar="F")
    p.add_argument("--rounds", type=int, default=0, metavar="R",
                   help="stop once R rounds the fleet sent updates to produced a model "
                        "(default 0: run until --duration or Ctrl-C)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S",
                   help="stop after S seconds (default 0: no limit)")
    p.add_argument("--delay-ms", default="0", metavar="DIST",
                   help="delay from a round's announcement to a device's update: MS, "
                        "uniform:MIN:MAX, exp:MEAN or normal:MEAN:SD (default 0)")
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="probability that a selected device skips a round (default 0)")
    p.add_argument("--connect-rate", type=float, default=500.0, metavar="R",
                   help="new sessions per second while the fleet connects (default 500)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the summary there as JSON")
    p.add_argument("--mqtt5", action=argparse.BooleanOptionalAction, default=False,
                   help="speak MQTT 5 (default: 3.1.1, which every broker fedmq supports)")
    p.add_argument("--subscribe-qos", type=int, choices=(0, 1), default=1, metavar="Q",
                   help="QoS of the round and model subscriptions (default 1; 0 on a NATS "
                        "cluster, where each QoS 1 subscription is a JetStream consumer)")
    p.add_argument("--username", default=None,
                   help="username of every device; '{device}' is replaced by its id")
    p.add_argument("--password", default=None, help="password; '{device}' as in --username")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca-file", default=None)
    p.add_argument("--cert-file", default=None, help="client certificate (with --key-file)")
    p.add_argument("--key-file", default=None)
    p.add_argument("--keepalive", type=int, default=60, metavar="S")
    p.add_argument("--status", action="store_true",
                   help="publish each device's retained status and last will as real agents do")
    p.add_argument("--prefix", default="sim",
                   help="device ids are PREFIX-00000, PREFIX-00001, ... (default sim)")
    p.add_argument("--seed", type=int, default=0, help="seed of delays, drop-outs and deltas")
    p.add_argument("--progress", type=float, default=5.0, metavar="S",
                   help="seconds between progress lines (default 5)")


def options_from(args: argparse.Namespace) -> SimOptions:
    """Check the parsed arguments (ValueError with a readable message) and build SimOptions."""
    host, sep, port = args.broker.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--broker {args.broker!r}: expected HOST:PORT")
    if args.devices < 1:
        raise ValueError("--devices must be at least 1")
    if not 0.0 <= args.dropout <= 1.0:
        raise ValueError("--dropout must be in [0, 1]")
    check_name(args.federation, "federation")
    check_name(f"{args.prefix}-{args.devices - 1:05d}", "device id")
    return SimOptions(
        devices=args.devices, host=host, port=int(port), federation=args.federation,
        rounds=args.rounds, duration_s=args.duration, delay=Delay.parse(args.delay_ms),
        dropout=args.dropout, connect_rate=args.connect_rate, mqtt5=args.mqtt5,
        subscribe_qos=args.subscribe_qos,
        username=args.username, password=args.password,
        tls=args.tls or bool(args.ca_file or args.cert_file), ca_file=args.ca_file,
        cert_file=args.cert_file, key_file=args.key_file, keepalive=args.keepalive,
        status=args.status, prefix=args.prefix, seed=args.seed, progress_s=args.progress)


def run(args: argparse.Namespace) -> int:
    """``fedmq simulate``."""
    try:
        opts = options_from(args)
    except ValueError as exc:
        print(f"fedmq simulate: {exc}", file=sys.stderr)
        return 2
    old, new = raise_nofile(opts.devices + FD_RESERVE)
    if new != old:
        print(f"fedmq simulate: open-file limit raised from {old} to {new} (the hard limit)",
              flush=True)
    random.seed(opts.seed)
    summary = asyncio.run(simulate(opts))
    text = json.dumps(summary, indent=2)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds_detail"}), flush=True)
    return 0 if summary["connected_max"] else 1
