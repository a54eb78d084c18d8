"""README "Scale-out", run as written: a 3-node NATS cluster from ``fedmq broker --engine nats``,
two workers, the coordinator and four real ``fedmq agent`` processes, each a command of the
README's marked blocks run with bash in a copy of ``examples/cluster/``. The only change: the
README's ports 4883-4885 become free ones (in the commands and the configs). The coordinator's
``max_rounds`` (3) ends the run; then every other process gets Ctrl-C and must exit cleanly,
leaving no nats-server behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import psutil

from fedmq.broker import find_free_port

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- scale-out: (?P<name>[\w-]+) -->\n```sh\n(?P<body>.*?)\n```", re.DOTALL)
README_PORTS = ("4883", "4884", "4885")


def steps() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return {m["name"]: [ln for ln in m["body"].splitlines() if ln.strip()]
            for m in BLOCK.finditer(text)}


def free_base() -> int:
    """Three consecutive free ports (the cluster's MQTT listeners)."""
    for _ in range(50):
        base = find_free_port()
        if base < 65000 and all(_free(base + i) for i in range(1, 3)):
            return base
    raise RuntimeError("no three consecutive free ports")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_scale_out_runs_as_written(tmp_path: Path) -> None:
    blocks = steps()
    assert list(blocks) == ["broker", "workers", "coordinator", "devices"]
    base = free_base()
    ports = {old: str(base + i) for i, old in enumerate(README_PORTS)}

    def local(text: str) -> str:
        for old, new in ports.items():
            text = text.replace(old, new)
        return text

    work = tmp_path / "cluster"
    shutil.copytree(ROOT / "examples" / "cluster", work)
    for f in work.glob("*.toml"):
        f.write_text(local(f.read_text(encoding="utf-8")), encoding="utf-8")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONUNBUFFERED="1")
    procs: dict[str, subprocess.Popen[str]] = {}
    logs: dict[str, Path] = {}
    handles: list[IO[str]] = []

    def start(name: str, line: str) -> None:
        logs[name] = tmp_path / f"{name}.log"
        handles.append(logs[name].open("w"))
        procs[name] = subprocess.Popen(
            ["bash", "-c", local(line)], cwd=work, env=env, text=True,
            stdout=handles[-1], stderr=subprocess.STDOUT, start_new_session=True)

    def log(name: str) -> str:
        return logs[name].read_text(encoding="utf-8", errors="replace")

    try:
        start("broker", blocks["broker"][0])
        deadline = time.monotonic() + 60
        while "Ctrl-C stops it" not in log("broker"):
            assert procs["broker"].poll() is None, log("broker")
            assert time.monotonic() < deadline, f"cluster not up: {log('broker')}"
            time.sleep(0.2)
        for i, line in enumerate(blocks["workers"]):
            start(f"w{i}", line)
        start("coordinator", blocks["coordinator"][0])
        for i, line in enumerate(blocks["devices"]):
            start(f"dev{i}", line)
        try:
            code = procs["coordinator"].wait(timeout=240)
        except subprocess.TimeoutExpired:
            raise AssertionError("the coordinator did not finish its 3 rounds: "
                                 + "\n".join(f"--- {n}\n{log(n)[-1500:]}" for n in logs)
                                 ) from None
        assert code == 0, log("coordinator")
        assert "aggregator stopped: 3 rounds" in log("coordinator"), log("coordinator")
        for w in ("w0", "w1"):
            assert "round 3 collected" in log(w), log(w)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        outcome: dict[str, int | str] = {}
        for name, p in procs.items():
            try:
                outcome[name] = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                outcome[name] = "killed"
        for h in handles:
            h.close()
    for name, status in outcome.items():
        assert "Traceback" not in log(name), f"{name}:\n{log(name)}"
        assert status in (0, -signal.SIGINT, 130), f"{name} exited {status}:\n{log(name)[-2000:]}"
    left = [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "nats-server" and str(tmp_path) in " ".join(
                p.info["cmdline"] or [])]
    assert not left, "nats-server processes outlived `fedmq broker`"
