"""Scale: how many devices one Mosquitto holds, the aggregator's memory and model latency.

Every figure comes from real processes on this machine: a Mosquitto (fresh per scenario, its
open-file limit raised to the hard limit, ``max_connections -1``), the aggregator as its own
``fedmq aggregator`` process (its memory read from /proc), and ``fedmq simulate`` holding the
devices in one process (``fedmq/simulate.py``). The model is the digits MLP (64-128-10, 9,610
parameters, fp32 updates of 38 KB).

Keys (docs/scaling.md explains each; ``null`` = not measured in this run, with a note):
  connections_held_mosquitto   devices connected at once through one Mosquitto, every one of
                               which sent an update the aggregator accepted in one round (target
                               10,000; --quick: 2,000)
  agg_rss_ratio_10k_over_1k    aggregator peak RSS with 10,000 devices (rounds of 1,000 of them,
                               sampled) over 1,000 devices (rounds of all 1,000), same model
  model_latency_ms_100         median over rounds of: the broker's PUBACK of the round's last
  model_latency_ms_1000        accepted update (its summary lists them; timed at the device
                               that sent it) to the new model's first arrival at a device;
                               rounds of 100 and 1,000 updates
  agent_idle_cpu_s_per_hour    one real ``fedmq agent`` between rounds (benchmarks/agent_idle.py)
  connections_held_cluster, model_latency_ms_100_cluster, model_latency_ms_1000_cluster,
  ingest_updates_per_s_1_worker, ingest_updates_per_s_2_workers, cpu_ms_per_update_per_worker:
                               the same over a 3-node NATS cluster with a coordinator and
                               workers, and the worker tier's ingest and CPU per update
                               (benchmarks/bench_scale_cluster.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.broker import MosquittoBroker, default_config_dir

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [64, 128, 10]
CLUSTER_SLOTS = ("connections_held_cluster", "model_latency_ms_100_cluster",
                 "model_latency_ms_1000_cluster", "ingest_updates_per_s_1_worker",
                 "ingest_updates_per_s_2_workers", "cpu_ms_per_update_per_worker")

_AGGREGATOR_TOML = """\
federation = "{federation}"

[broker]
host = "{host}"
port = {port}

[model]
layers = {layers}
seed = 0

[rounds]
min_updates = {min_updates}
max_updates = {max_updates}
deadline_s = {deadline_s}
grace_s = 2
max_rounds = 0

[sampling]
rate = {rate}
seed = 0
"""


@dataclass(frozen=True)
class Scenario:
    """One run: ``devices`` simulated devices, rounds of ``max_updates`` accepted updates."""

    name: str
    devices: int
    max_updates: int
    rate: float
    rounds: int
    delay_ms: str
    deadline_s: float = 600.0


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MB) of a live process, and its CPU seconds."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _nofile_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return 0


def _broker_template(tmp: Path) -> Path:
    """dev.conf with the connection limit stated (unlimited, as Mosquitto 2.0's default)."""
    dev = (default_config_dir() / "dev.conf").read_text()
    path = tmp / "scale.conf"
    path.write_text(dev + "\n# scale bench: no connection limit (the file limit is the bound)\n"
                          "max_connections -1\n")
    return path


def run_scenario(s: Scenario, tmp: Path, aggregator: Sequence[str] = ()) -> dict[str, Any]:
    """A fresh Mosquitto, an aggregator process and one ``fedmq simulate`` of ``s.devices``.
    ``aggregator``: the command that runs ``fedmq`` for it (default: this Python's)."""
    fed = f"scale-{s.name}"
    with MosquittoBroker(_broker_template(tmp)) as broker:
        assert broker.pid is not None
        broker_nofile = _nofile_limit(broker.pid)
        toml = tmp / f"{s.name}.toml"
        toml.write_text(_AGGREGATOR_TOML.format(
            federation=fed, host=broker.host, port=broker.port, layers=LAYERS,
            min_updates=s.max_updates, max_updates=s.max_updates, deadline_s=s.deadline_s,
            rate=s.rate))
        agg = subprocess.Popen([*(aggregator or (sys.executable, "-m", "fedmq.cli")),
                                "aggregator", "--config",
                                str(toml), "--log-level", "warning"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        summary_path = tmp / f"{s.name}.json"
        try:
            time.sleep(1.0)
            cmd = [sys.executable, "-m", "fedmq.cli", "simulate", "--devices", str(s.devices),
                   "--broker", f"{broker.host}:{broker.port}", "--federation", fed,
                   "--rounds", str(s.rounds), "--delay-ms", s.delay_ms, "--status",
                   "--connect-rate", "1000", "--duration", str(s.deadline_s),
                   "--progress", "10", "--json", str(summary_path)]
            t0 = time.monotonic()
            sim = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, check=False)
            for line in sim.stdout.splitlines():
                if line.startswith("simulate"):
                    print(f"  [{s.name}] {line}", flush=True)
            if agg.poll() is not None:
                err = agg.stderr.read() if agg.stderr else ""
                raise RuntimeError(f"the aggregator exited: {err}")
            agg_status = proc_status(agg.pid)
            broker_status = proc_status(broker.pid)
        finally:
            agg.send_signal(signal.SIGTERM)
            try:
                agg.wait(30)
            except subprocess.TimeoutExpired:
                agg.kill()
        if sim.returncode != 0 or not summary_path.exists():
            raise RuntimeError(f"fedmq simulate failed ({sim.returncode}):\n{sim.stdout[-2000:]}")
        summary = json.loads(summary_path.read_text())
    return {"scenario": s.name, "elapsed_s": round(time.monotonic() - t0, 1), "sim": summary,
            "agg_rss_mb": round(agg_status["VmRSS"], 1),
            "agg_rss_peak_mb": round(agg_status["VmHWM"], 1),
            "agg_cpu_s": round(agg_status["cpu_s"], 2),
            "broker_rss_mb": round(broker_status["VmRSS"], 1),
            "broker_rss_peak_mb": round(broker_status["VmHWM"], 1),
            "broker_cpu_s": round(broker_status["cpu_s"], 2), "broker_nofile": broker_nofile}


def _latency(run: dict[str, Any]) -> float | None:
    values = [r["last_accepted_ack_to_model_ms"] for r in run["sim"]["rounds_detail"]
              if "last_accepted_ack_to_model_ms" in r]
    return round(statistics.median(values), 1) if values else None


def _participants(run: dict[str, Any]) -> list[int]:
    return [r.get("participants", 0) for r in run["sim"]["rounds_detail"] if r["model_seen"]]


def _machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True,
                               check=False).stdout.splitlines()[:1]
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gb": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "mosquitto": mosquitto[0] if mosquitto else "?",
            "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def _agent_idle(duration_s: float) -> tuple[float | None, str]:
    try:
        from benchmarks.agent_idle import measure_agent_idle_cpu
    except ImportError as exc:
        return None, f"benchmarks/agent_idle.py not available ({exc})"
    found = measure_agent_idle_cpu(duration_s)
    value = found.get("agent_idle_cpu_s_per_hour")
    return (None if value is None else round(float(value), 3),
            f"one fedmq agent idle for {duration_s:.0f} s: {json.dumps(found)}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2,000 devices held instead of 10,000, 3 rounds per latency, a 60 s "
                        "idle agent (a few minutes)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--skip-idle", action="store_true", help="do not measure the idle agent")
    args = p.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # Mosquitto inherits it
    print(f"open-file limit raised to the hard limit, {hard}, for this process, Mosquitto and "
          "fedmq simulate", flush=True)
    held = 2000 if args.quick else 10_000
    rounds = 3 if args.quick else 5
    scenarios = {
        "held": Scenario("held", held, held, 1.0, 1, "uniform:0:10000"),
        "lat100": Scenario("lat100", 100, 100, 1.0, rounds, "uniform:0:1000"),
        "k1": Scenario("k1", 1000, 1000, 1.0, rounds, "uniform:0:3000"),
        # ~1,100 of the 10,000 are sampled per round; the round closes at its 1,000th update.
        "k10": Scenario("k10", 10_000, 1000, 0.11, rounds, "uniform:0:3000"),
    }
    result: dict[str, Any] = {"quick": args.quick, "machine": _machine(), "model_layers": LAYERS,
                              "notes": {}}
    runs: dict[str, dict[str, Any]] = {}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedmq-scale-") as tmpdir:
        for name, s in scenarios.items():
            print(f"== {name}: {s.devices} devices, rounds of {s.max_updates} updates "
                  f"(sample rate {s.rate}), {s.rounds} round(s), delay {s.delay_ms} ms",
                  flush=True)
            runs[name] = run_scenario(s, Path(tmpdir))
            r = runs[name]
            print(f"  aggregator rss {r['agg_rss_mb']} MB (peak {r['agg_rss_peak_mb']}), "
                  f"cpu {r['agg_cpu_s']} s; mosquitto rss {r['broker_rss_mb']} MB (peak "
                  f"{r['broker_rss_peak_mb']}), cpu "
                  f"{r['broker_cpu_s']} s, open-file limit {r['broker_nofile']}; simulate cpu "
                  f"{r['sim']['cpu_s']} s rss {r['sim']['rss_mb']} MB; participants "
                  f"{_participants(r)}; {r['elapsed_s']} s", flush=True)
    h = runs["held"]
    complete = (h["sim"]["connected_max"] >= held and _participants(h) == [held])
    result["connections_held_mosquitto"] = (held if complete else min(
        h["sim"]["connected_max"], max(_participants(h), default=0)))
    result["notes"]["connections_held_mosquitto"] = (
        f"{h['sim']['connected_max']} sessions connected at once, round participants "
        f"{_participants(h)}, broker rss {h['broker_rss_mb']} MB (peak "
        f"{h['broker_rss_peak_mb']} MB), broker open-file limit "
        f"{h['broker_nofile']}")
    result["agg_rss_ratio_10k_over_1k"] = round(
        runs["k10"]["agg_rss_peak_mb"] / runs["k1"]["agg_rss_peak_mb"], 3)
    result["notes"]["agg_rss_ratio_10k_over_1k"] = (
        f"aggregator peak RSS {runs['k10']['agg_rss_peak_mb']} MB (10,000 devices, participants "
        f"{_participants(runs['k10'])}) / {runs['k1']['agg_rss_peak_mb']} MB (1,000 devices, "
        f"participants {_participants(runs['k1'])})")
    result["model_latency_ms_100"] = _latency(runs["lat100"])
    result["model_latency_ms_1000"] = _latency(runs["k1"])
    for key, name in (("model_latency_ms_100", "lat100"), ("model_latency_ms_1000", "k1")):
        result["notes"][key] = "per round: " + ", ".join(
            str(r.get("last_accepted_ack_to_model_ms"))
            for r in runs[name]["sim"]["rounds_detail"] if r["model_seen"])
    if args.skip_idle:
        result["agent_idle_cpu_s_per_hour"] = None
        result["notes"]["agent_idle_cpu_s_per_hour"] = "skipped (--skip-idle)"
    else:
        print("== idle agent", flush=True)
        value, note = _agent_idle(60.0 if args.quick else 300.0)
        result["agent_idle_cpu_s_per_hour"] = value
        result["notes"]["agent_idle_cpu_s_per_hour"] = note
    # The cluster keys (benchmarks/bench_scale_cluster.py); agg_rss_ratio_10k_over_1k becomes
    # the largest of the single aggregator's, the coordinator's and the workers' ratios.
    from benchmarks.bench_scale_cluster import add_cluster_figures
    with tempfile.TemporaryDirectory(prefix="fedmq-scale-cluster-") as cluster_tmp:
        add_cluster_figures(result, runs, args.quick, Path(cluster_tmp))
    result["runs"] = runs
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    _table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "notes")}))
    return 0


def _table(result: dict[str, Any]) -> None:
    targets = {"connections_held_mosquitto": ">= 10000", "agg_rss_ratio_10k_over_1k": "<= 1.1",
               "model_latency_ms_1000": "<= 2 x model_latency_ms_100",
               "agent_idle_cpu_s_per_hour": "<= 2", "connections_held_cluster": ">= 10000"}
    keys = ["connections_held_mosquitto", "agg_rss_ratio_10k_over_1k", "model_latency_ms_100",
            "model_latency_ms_1000", "agent_idle_cpu_s_per_hour", *CLUSTER_SLOTS]
    print(f"\n{'key':<34} {'value':>10}  target")
    for key in keys:
        value = result.get(key)
        print(f"{key:<34} {'null' if value is None else value:>10}  {targets.get(key, '')}")
    print(f"({result['elapsed_s']} s, {'quick' if result['quick'] else 'full'} run; machine: "
          f"{result['machine']['cpus']} cpus, {result['machine']['cpu']})\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
