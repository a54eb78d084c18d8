"""An idle device agent's CPU cost: one real ``fedmq agent`` process between rounds.

``measure_agent_idle_cpu(duration_s)`` starts a Mosquitto on a free port, publishes a retained
round announcement that is already closed (the agent follows the federation but has no round to
train for), starts one ``fedmq agent`` process (the MLP on digits, as docker/agent.toml), waits
until its retained status says ``online`` and lets it settle, then reads its CPU seconds (user +
system, psutil) and the voluntary context switches of all its threads (``/proc/PID/task/*/status``:
each one is a thread going to sleep, so roughly its wake-ups) over ``duration_s``.

``python -m benchmarks.agent_idle [--duration S] [--repo PATH]`` prints the figures; ``--repo``
runs the agent from another checkout (e.g. a ``git worktree`` of an older commit) to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from fedmq import codec
from fedmq.broker import MosquittoBroker
from fedmq.config import BrokerConfig
from fedmq.topics import Topics
from fedmq.transport import PahoTransport
from fedmq.wire import DeviceStatus, RoundAnnouncement

FEDERATION = "idlebench"
DEVICE_ID = "idle-0"
#: Seconds the agent gets after it reported ``online`` before measuring (imports, data, the
#: first status and the retained announcement are behind it by then).
SETTLE_S = 5.0
START_TIMEOUT_S = 120.0

_AGENT_TOML = """\
federation = "{federation}"

[broker]
host = "127.0.0.1"
port = {port}

[device]
id = "{device_id}"

[data]
source = "digits"
partition = "iid"
num_shards = 3

[trainer]
kind = "mlp"
"""

_RUN_CLI = "import sys; from fedmq.cli import main; sys.exit(main(sys.argv[1:]))"


def _run_ns(pid: int) -> int:
    """CPU time (ns) of every thread of ``pid`` from ``/proc/PID/task/*/schedstat``: psutil's
    figure counts 10 ms clock ticks, too coarse for an agent that barely runs."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # ended meanwhile, or no schedstat
            continue
    return total


def _switches(pid: int) -> int:
    """Voluntary context switches summed over every thread of ``pid``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:  # the thread ended meanwhile
            continue
    return total


def _wait_online(broker: MosquittoBroker, proc: subprocess.Popen[bytes]) -> None:
    """Block until the agent's retained status says ``online``."""
    watcher = PahoTransport(BrokerConfig(host=broker.host, port=broker.port),
                            client_id="idlebench-watch", quiet=True)
    watcher.subscribe(Topics(FEDERATION).status(DEVICE_ID), qos=1)
    watcher.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {proc.returncode} before it was "
                                   "online")
            try:
                msg = watcher.inbox.get(timeout=0.5)
            except Exception:  # queue.Empty
                continue
            status = codec.decode(msg.payload) if msg.payload else None
            if isinstance(status, DeviceStatus) and status.state == "online":
                return
        raise RuntimeError("the agent was not online within "
                           f"{START_TIMEOUT_S:.0f} s")
    finally:
        watcher.stop()


def _announce_closed(broker: MosquittoBroker) -> None:
    """Retain a closed round on the round topic: the federation is between rounds."""
    ann = RoundAnnouncement(federation=FEDERATION, round=1, base_version=0, model_sha256="",
                            deadline=time.time(), min_updates=1, max_updates=1, open=False)
    pub = PahoTransport(BrokerConfig(host=broker.host, port=broker.port),
                        client_id="idlebench-aggregator", quiet=True)
    pub.start()
    try:
        if not pub.wait_connected(30):
            raise RuntimeError("cannot connect to the benchmark broker")
        delivery = pub.publish(Topics(FEDERATION).round, codec.encode(ann), qos=1, retain=True)
        deadline = time.monotonic() + 10
        while not delivery.done() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        pub.stop()


def measure_agent_idle_cpu(duration_s: float, *, repo: Path | None = None,
                           settle_s: float = SETTLE_S) -> dict[str, float]:
    """CPU seconds an idle ``fedmq agent`` process uses, scaled to an hour.

    Returns ``agent_idle_cpu_s_per_hour`` (psutil: user + system, in 10 ms ticks, so below
    ``36 / duration_s`` it reads 0), ``measured_s`` (the window actually measured),
    ``wakeups_per_s`` (voluntary context switches of all the agent's threads per second) and
    ``agent_idle_cpu_s_per_hour_schedstat`` (the scheduler's nanosecond run time, same scale).
    ``repo``: run the agent from that checkout instead of this one.
    """
    root = (repo or Path(__file__).resolve().parent.parent).resolve()
    with tempfile.TemporaryDirectory(prefix="fedmq-idle-") as tmp, MosquittoBroker() as broker:
        config = Path(tmp) / "agent.toml"
        config.write_text(_AGENT_TOML.format(federation=FEDERATION, port=broker.port,
                                             device_id=DEVICE_ID))
        _announce_closed(broker)
        env = {**os.environ, "PYTHONPATH": str(root)}
        env.pop("FEDMQ_DEVICE_ID", None)
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUN_CLI, "agent", "--config", str(config),
             "--log-level", "warning"],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_online(broker, proc)
            time.sleep(settle_s)
            agent = psutil.Process(proc.pid)
            cpu0, ns0, sw0 = agent.cpu_times(), _run_ns(proc.pid), _switches(proc.pid)
            t0 = time.monotonic()
            time.sleep(duration_s)
            cpu1, ns1, sw1 = agent.cpu_times(), _run_ns(proc.pid), _switches(proc.pid)
            t1 = time.monotonic()
            if proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {proc.returncode} while measured")
        finally:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        if proc.returncode not in (0, -15):
            sys.stderr.write(err.decode(errors="replace")[-2000:])
    measured = t1 - t0
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {"agent_idle_cpu_s_per_hour": cpu * 3600.0 / measured, "measured_s": measured,
            "wakeups_per_s": (sw1 - sw0) / measured,
            "agent_idle_cpu_s_per_hour_schedstat": (ns1 - ns0) * 1e-9 * 3600.0 / measured}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent_idle")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--repo", type=Path, default=None,
                        help="run the agent from this checkout (default: this one)")
    args = parser.parse_args(argv)
    result: dict[str, Any] = measure_agent_idle_cpu(args.duration, repo=args.repo)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
