"""``fedmq watch`` in a real terminal: tmux runs the command against a live federation over
Mosquitto, and the test reads the screen with ``capture-pane`` as a person would see it.

Three devices train on digits and evaluate every version on held-out data; one of them stalls in
its third round, so round 3 stays open at 2/3 updates (dev-2 "training") while the screen is
read; a fourth, evaluation-only device has gone offline; a malformed update makes a rejection.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_agent.factory import split_holdout
from device_agent.service import AgentService
from device_agent.trainers import EvalResult, FitResult, MLPTrainer, TrainConfig
from fedmq.broker import MosquittoBroker
from fedmq.config import ModelConfig, TrainSettings
from fedmq.datasets import load_digits_split, partition
from fedmq.models import Weights
from fedmq.topics import Topics
from fedmq.transport import PahoTransport

from fedhelpers import aggregator_config, broker_config, running_aggregator, unique_federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT = 120, 40


def require_tmux() -> str:
    """The tmux binary; skip without it, or fail under CI (the real terminal path must run)."""
    binary = shutil.which("tmux")
    if binary is None:
        hint = "tmux not found: install it with `sudo apt-get install tmux` (scripts/test does)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{hint}; CI never skips the terminal test", pytrace=False)
        pytest.skip(hint)
    return binary


class Tmux:
    """One tmux server on a private socket, with one session of a fixed size."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.socket = f"fedmq-watch-{uuid.uuid4().hex[:8]}"
        self.session = "watch"

    def __call__(self, *args: str) -> str:
        done = subprocess.run([self.binary, "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=10, check=True,
                              env=_ENV)
        return done.stdout

    def start(self, command: list[str]) -> None:
        """Run ``command`` in a shell that prints its exit status once it ends, then idles, so
        the screen stays readable. ``trap : INT``: the shell outlives the Ctrl-C meant for the
        command (which gets the default handler back at exec, so Python's KeyboardInterrupt)."""
        line = " ".join(_quote(c) for c in command)
        self("new-session", "-d", "-s", self.session, "-x", str(WIDTH), "-y", str(HEIGHT),
             "-c", str(ROOT), f"trap : INT; {line}; echo \"exit status $?\"; sleep 120")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.session)

    def pane(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", self.session, fmt).strip()

    def kill(self) -> None:
        subprocess.run([self.binary, "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=10, check=False)


# The server takes its environment from the first client. Without ``env`` a child gets the C
# library's environ, where something in this process may have set COLUMNS=80 and LINES=24
# (seen under pytest): rich would then draw 80x24 in a 120x40 pane.
_ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux(require_tmux())
    try:
        yield t
    finally:
        t.kill()


class StallingTrainer:
    """A trainer that stalls in its ``stall_at``-th round until ``release`` is set."""

    def __init__(self, inner: MLPTrainer, stall_at: int, release: threading.Event) -> None:
        self.inner = inner
        self.stall_at = stall_at
        self.release = release
        self.calls = 0

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        self.calls += 1
        if self.calls >= self.stall_at:
            self.release.wait(60)
        return self.inner.fit(weights, config, round_seed)

    def evaluate(self, weights: Weights) -> EvalResult:
        return self.inner.evaluate(weights)


def _trainers() -> list[MLPTrainer]:
    x, y, _, _ = load_digits_split(0)
    out = []
    for i, idx in enumerate(partition(y, 4, "iid", 0)):
        x_fit, y_fit, x_ev, y_ev = split_holdout(x[idx], y[idx], 0.3 if i < 3 else 1.0, seed=i)
        out.append(MLPTrainer(x_fit, y_fit, num_classes=10, holdout=(x_ev, y_ev)))
    return out


def wait_for_screen(tmux: Tmux, ok: Callable[[str], bool], what: str,
                    timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < end:
        screen = tmux.screen()
        if ok(screen):
            return screen
        time.sleep(0.25)
    size = tmux.pane("#{window_width}x#{window_height}")
    raise AssertionError(f"the screen ({size}) never showed {what} within {timeout} s:\n"
                         f"{screen}")


def test_watch_shows_the_round_the_devices_and_the_accuracy_of_the_last_versions(
        mosquitto: MosquittoBroker, tmux: Tmux) -> None:
    broker = broker_config(mosquitto)
    fed = unique_federation("watch")
    release = threading.Event()
    fit_a, fit_b, fit_c, evaluator = _trainers()
    agents = [AgentService.over_mqtt(fed, "dev-0", fit_a, broker),
              AgentService.over_mqtt(fed, "dev-1", fit_b, broker),
              AgentService.over_mqtt(fed, "dev-2", StallingTrainer(fit_c, 3, release), broker),
              AgentService.over_mqtt(fed, "eval-3", evaluator, broker, train=False)]
    config = dataclasses.replace(
        aggregator_config(broker, fed, min_updates=3, max_updates=3, deadline_s=120,
                          max_rounds=0),
        model=ModelConfig(layers=[64, 16, 10], seed=0),
        train=TrainSettings(epochs=1, batch_size=10, lr=0.3))
    # The watch starts first: it waits for the federation, then follows it from round 1.
    tmux.start([sys.executable, "-m", "fedmq.cli", "watch", "--broker",
                f"{broker.host}:{broker.port}", "--federation", fed])
    wait_for_screen(tmux, lambda s: f"waiting for fedmq/v1/{fed}/round" in s,
                    "the waiting line")
    intruder = PahoTransport(broker, client_id=f"intruder-{uuid.uuid4().hex[:6]}")
    try:
        for agent in agents:
            agent.start()
        with running_aggregator(config) as agg:
            deadline = time.monotonic() + 30
            while agg.version < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert agg.version == 2, "the federation did not reach model version 2"
            agents[3].stop()  # the evaluation-only device leaves: shown offline
            intruder.start()
            assert intruder.wait_connected(5)
            intruder.publish(Topics(fed).update("dev-1"), b"not an update", qos=1)

            def complete(s: str) -> bool:
                return all(re.search(p, s) for p in (
                    r"Round 3\s+on model v2\s+open", r"2/3 updates", r"deadline in \d+ s",
                    r"rejected: malformed 1",
                    r"◆ dev-2\s+training", r"● dev-0\s+online", r"● dev-1\s+online",
                    r"○ eval-3\s+offline",
                    # v1 and v2 scored by the devices on held-out data (█), v0 too.
                    r"v2\s+2\s+3\s+\d+\.\d% █\s+\d\.\d+ █\s+\d",
                    r"v1\s+1\s+3\s+\d+\.\d% █", r"v0\s+0\s+—\s+\d+\.\d% █",
                    r"round 2 → v2\s+3 updates", r"malformed\s+1\s+\+1 this round"))

            screen = wait_for_screen(tmux, complete, "round 3, the devices and v0-v2 evaluated")
            print(f"fedmq watch at {WIDTH}x{HEIGHT}:\n{screen}")  # shown with pytest -s
            lines = screen.splitlines()
            assert len(lines) == HEIGHT
            assert all(len(line) <= WIDTH for line in lines)
            assert f"fedmq watch · {fed} · {broker.host}:{broker.port} · ● connected" in lines[0]
            # The accuracy chart has a bar per version and the versions under them.
            assert re.search(r"100%┤", screen)
            assert re.search(r"v 0  1  2", screen)

            tmux("send-keys", "-t", tmux.session, "C-c")
            after = wait_for_screen(tmux, lambda s: "exit status" in s, "the exit status",
                                    timeout=10)
            assert "exit status 0" in after
            assert "Traceback" not in after
            assert "KeyboardInterrupt" not in after
            assert "interrupted" not in after  # the CLI's line for a Ctrl-C it had to catch
            release.set()
    finally:
        release.set()
        intruder.stop()
        for agent in agents:
            agent.stop()
