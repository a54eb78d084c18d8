"""Every long-running command stopped by Ctrl-C (SIGINT) or SIGTERM: no traceback, a clean exit,
nothing left running (issue 10, acceptance 5) — while serving, and while still waiting for a
broker that is not there."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedmq.broker import MosquittoBroker

from fedhelpers import unique_federation

ROOT = Path(__file__).resolve().parents[2]
SIGNALS = [signal.SIGINT, signal.SIGTERM]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "fedmq.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen[str], text: str, timeout: float = 60.0) -> str:
    """Read the process's output until ``text`` appears; everything read so far."""
    assert proc.stdout is not None
    seen = ""
    end = time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < end, f"{text!r} not printed within {timeout} s:\n{seen}"
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"exited early ({proc.returncode}):\n{seen}"
        seen += line
    return seen


def _stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str]:
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.3)
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running: {[c.name() for c in left]}"
    return proc.returncode, out


def _configs(tmp: Path, port: int, fed: str) -> None:
    broker = f'[broker]\nhost = "127.0.0.1"\nport = {port}\nreconnect_max_s = 1.0\n'
    (tmp / "aggregator.toml").write_text(
        f'federation = "{fed}"\n{broker}[model]\nlayers = [64, 10]\n'
        "[rounds]\nmin_updates = 2\nmax_updates = 2\n")
    (tmp / "agent.toml").write_text(
        f'federation = "{fed}"\n{broker}[device]\nid = "sig-dev"\n[trainer]\nkind = "softmax"\n')


@pytest.mark.broker
@pytest.mark.parametrize("sig", SIGNALS)
def test_serving_commands_stop_cleanly(mosquitto: MosquittoBroker, tmp_path: Path,
                                       sig: signal.Signals) -> None:
    fed = unique_federation("sig")
    _configs(tmp_path, mosquitto.port, fed)
    agg = _start(["aggregator", "--config", "aggregator.toml"], tmp_path)
    agent = _start(["agent", "--config", "agent.toml"], tmp_path)
    try:
        _wait_for(agg, "started")
        _wait_for(agent, "connected to")
        for proc, name in ((agent, "agent"), (agg, "aggregator")):
            code, out = _stop(proc, sig)
            assert "Traceback" not in out, out
            assert code == 0, f"{name} exited {code}:\n{out}"
    finally:
        for proc in (agg, agent):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.broker
@pytest.mark.parametrize("sig", SIGNALS)
def test_broker_command_stops_its_mosquitto(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _start(["broker", "--port", str(_free_port())], tmp_path)
    _wait_for(proc, "listening on")
    brokers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if c.name() == "mosquitto"]
    assert brokers, "fedmq broker runs a mosquitto"
    code, out = _stop(proc, sig)  # fails if that mosquitto outlives it
    assert "Traceback" not in out, out
    assert code == 0, out


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("command", ["aggregator", "agent"])
def test_interrupted_while_waiting_for_a_missing_broker(tmp_path: Path, sig: signal.Signals,
                                                        command: str) -> None:
    _configs(tmp_path, _free_port(), unique_federation("sig"))  # nothing listens there
    proc = _start([command, "--config", f"{command}.toml"], tmp_path)
    seen = _wait_for(proc, "waiting for the broker at 127.0.0.1", timeout=10)
    code, out = _stop(proc, sig)
    out = seen + out
    assert "Traceback" not in out, out
    assert code in (0, 130, 143), out
