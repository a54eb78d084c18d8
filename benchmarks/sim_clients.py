"""Idle MQTT sessions in one process: fedmq's asyncio client against paho's external-loop API.

``python -m benchmarks.sim_clients [--sessions N] [--idle-s S]`` starts a Mosquitto, then runs
each side in a fresh child process: open N sessions (CONNECT, SUBSCRIBE to two topics at QoS 1,
as a simulated device does), then stay idle for S seconds. Printed per side: connect rate
(sessions per second, opened one after another, each waiting for its SUBACK, up to 200 at once),
resident memory per session (RSS after minus RSS before, over N), CPU per idle session per hour
(the process's CPU time over the idle interval), and fds per session. paho's side drives every
``Client`` from one ``selectors.EpollSelector`` with ``loop_read``/``loop_write``/``loop_misc``
(paho's own loop uses select() and fails past 1,023 fds). The figures are in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _result(n: int, connect_s: float, rss_mb: float, fds: int, cpu_s: float,  # noqa: PLR0917
            idle_s: float) -> dict[str, float]:
    return {"sessions": n, "connect_per_s": n / connect_s,
            "rss_kb_per_session": rss_mb * 1024 / n,
            "cpu_ms_per_session_per_hour": cpu_s * 1000 * 3600 / idle_s / n,
            "fds_per_session": fds / n}


def run_asyncio(host: str, port: int, n: int, idle_s: float) -> dict[str, float]:
    from fedmq.mqtt_async import AsyncMqttClient, ConnectOptions

    async def main() -> dict[str, float]:
        base_rss, base_fds = _rss_mb(), _fds()
        clients: list[AsyncMqttClient] = []
        gate = asyncio.Semaphore(200)

        async def one(i: int) -> None:
            async with gate:
                c = AsyncMqttClient(ConnectOptions(f"a-{os.getpid()}-{i}", keepalive=60),
                                    lambda *a: None)
                await c.connect(host, port)
                await c.subscribe([("fedmq/v1/bench/round", 1), ("fedmq/v1/bench/model", 1)])
                clients.append(c)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(2)
        rss, fds = _rss_mb(), _fds()
        cpu0 = _cpu_s()
        await asyncio.sleep(idle_s)
        cpu = _cpu_s() - cpu0
        for c in clients:
            c.disconnect()
        await asyncio.sleep(0.5)
        return _result(n, connect_s, rss - base_rss, fds - base_fds, cpu, idle_s)

    return asyncio.run(main())


def run_paho(host: str, port: int, n: int, idle_s: float) -> dict[str, float]:  # noqa: PLR0915
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    base_rss, base_fds = _rss_mb(), _fds()
    sel = selectors.EpollSelector()
    clients: list[Any] = []
    subscribed = 0

    def on_subscribe(*args: Any) -> None:
        nonlocal subscribed
        subscribed += 1

    def on_connect(client: Any, *args: Any) -> None:
        client.subscribe([("fedmq/v1/bench/round", 1), ("fedmq/v1/bench/model", 1)])

    def pump(timeout: float) -> None:
        for key, events in sel.select(timeout):
            c = key.data
            if events & selectors.EVENT_READ:
                c.loop_read()
            if events & selectors.EVENT_WRITE or c.want_write():
                c.loop_write()

    def misc() -> None:
        for c in clients:
            c.loop_misc()
            if c.want_write():
                c.loop_write()

    t0 = time.perf_counter()
    for i in range(n):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"p-{os.getpid()}-{i}",
                        protocol=mqtt.MQTTv311)
        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.connect(host, port, keepalive=60)
        sock = c.socket()
        assert sock is not None
        sel.register(sock, selectors.EVENT_READ, c)
        clients.append(c)
        if c.want_write():
            c.loop_write()
        while i + 1 - subscribed >= 200:  # at most 200 handshakes in flight, as on the other side
            pump(0.05)
    while subscribed < n:
        pump(0.05)
        misc()
    connect_s = time.perf_counter() - t0
    end = time.monotonic() + 2
    while time.monotonic() < end:
        pump(1.0)
    rss, fds = _rss_mb(), _fds()
    cpu0 = _cpu_s()
    end = time.monotonic() + idle_s
    last_misc = 0.0
    while time.monotonic() < end:
        pump(1.0)
        if time.monotonic() - last_misc >= 1.0:  # keepalive bookkeeping, once a second
            misc()
            last_misc = time.monotonic()
    cpu = _cpu_s() - cpu0
    for c in clients:
        c.disconnect()
    return _result(n, connect_s, rss - base_rss, fds - base_fds, cpu, idle_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--idle-s", type=float, default=30.0)
    p.add_argument("--side", choices=("asyncio", "paho"), default=None,
                   help="(internal) run one side against --broker")
    p.add_argument("--broker", default=None)
    args = p.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.side:
        host, port = args.broker.rsplit(":", 1)
        fn = run_asyncio if args.side == "asyncio" else run_paho
        print(json.dumps(fn(host, int(port), args.sessions, args.idle_s)))
        return 0
    from fedmq.broker import MosquittoBroker

    results = {}
    with MosquittoBroker() as broker:
        for side in ("asyncio", "paho"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.sim_clients", "--side", side, "--broker",
                 f"{broker.host}:{broker.port}", "--sessions", str(args.sessions), "--idle-s",
                 str(args.idle_s)], capture_output=True, text=True, check=True,
                cwd=Path(__file__).resolve().parents[1])
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
            print(side, json.dumps({k: round(v, 2) for k, v in results[side].items()}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
