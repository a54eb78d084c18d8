"""Fault drills against real processes: an aggregator we SIGKILL, devices that count what they sent.

Used by the short fault tests in the suite and by ``scripts/faults`` for long runs. Device updates
are deterministic and exactly summable (small multiples of 2**-10 with integer weights), so the
final model of a run with faults must equal the fault-free reference bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedmq import codec, compression
from fedmq.broker import MosquittoBroker
from fedmq.config import BrokerConfig
from fedmq.models import init_mlp
from fedmq.subscriber import ModelSubscriber
from fedmq.topics import Topics
from fedmq.transport import PahoTransport
from fedmq.wire import ModelUpdate, RoundAnnouncement, RoundSummary

ROOT = Path(__file__).resolve().parents[2]


def broker_config(broker: MosquittoBroker) -> BrokerConfig:
    """How the drill's clients reach ``broker`` (quick reconnects)."""
    return BrokerConfig(host=broker.host, port=broker.port, reconnect_min_s=0.1,
                        reconnect_max_s=1.0)
LAYERS = [6, 4, 3]
SEED = 2


@dataclass
class Drill:
    """One run: the aggregator as a separate process, devices driven from here."""

    broker: BrokerConfig
    state_dir: Path
    devices: int = 4
    rounds: int = 3
    federation: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:8]}")
    kills: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # update id -> round
    proc: subprocess.Popen[str] | None = None
    _announcement: RoundAnnouncement | None = None

    def __post_init__(self) -> None:
        self.topics = Topics(self.federation)
        self.config = self.state_dir / "aggregator.toml"
        self.log = self.state_dir / "aggregator.log"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(f'federation = "{self.federation}"\n' + textwrap.dedent(f"""
            [broker]
            host = "{self.broker.host}"
            port = {self.broker.port}
            reconnect_min_s = 0.1
            reconnect_max_s = 1.0
            [model]
            layers = {LAYERS}
            seed = {SEED}
            [rounds]
            min_updates = {self.devices}
            max_updates = {self.devices}
            deadline_s = 300
            max_rounds = {self.rounds}
            [durability]
            state_dir = "{self.state_dir / 'state'}"
            session_expiry_s = 600
            """))

    def delta(self, round_: int, device: int) -> dict[str, npt.NDArray[np.float32]]:
        rng = np.random.default_rng(round_ * 1000 + device)
        return {k: (rng.integers(-64, 64, v.shape) / 1024).astype(np.float32)
                for k, v in init_mlp(LAYERS, SEED).items()}

    def update_id(self, round_: int, device: int) -> str:
        return f"r{round_}-d{device}"

    def reference(self) -> dict[str, npt.NDArray[np.float32]]:
        """The fault-free model after all rounds (exact arithmetic, any order)."""
        model = init_mlp(LAYERS, SEED)
        for r in range(1, self.rounds + 1):
            w = [d + 1 for d in range(self.devices)]
            model = {k: (v.astype(np.float64) + sum(
                self.delta(r, d)[k].astype(np.float64) * w[d] for d in range(self.devices))
                / sum(w)).astype(np.float32) for k, v in model.items()}
        return model

    def start_aggregator(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with self.log.open("a") as out:  # a file, not a pipe: nobody has to drain it
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aggregator", "--config", str(self.config)], env=env,
                stdout=out, stderr=subprocess.STDOUT, text=True)

    def kill_aggregator(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def run(self, kills: int, rng: random.Random, timeout: float = 120.0) -> dict[str, float]:
        """Run all rounds, SIGKILLing the aggregator ``kills`` times; return the drill keys."""
        driver = PahoTransport(self.broker, client_id=f"drv-{uuid.uuid4().hex[:8]}")
        driver.subscribe(self.topics.round)
        driver.start()
        watcher = ModelSubscriber(self.broker, self.federation, summaries=True).start()
        self.start_aggregator()
        end = time.monotonic() + timeout
        total = self.devices * self.rounds
        # Kill after random numbers of sent updates (and a random moment after that one), so
        # kills land before, during and after logging, folding, acks and round closes.
        schedule = sorted(rng.choices(range(1, total), k=kills))
        try:
            while True:
                if time.monotonic() > end:
                    raise TimeoutError(f"drill did not finish in {timeout} s")
                self._answer_announcements(driver)
                assert self.proc is not None
                if self.proc.poll() is not None:
                    if self.proc.returncode == 0:
                        break
                    raise RuntimeError(f"aggregator exited {self.proc.returncode}: "
                                       f"{self.log.read_text()[-3000:]}")
                if self.kills < kills and len(self.sent) >= schedule[self.kills]:
                    time.sleep(rng.uniform(0.0, 0.05))
                    self.kill_aggregator()
                    time.sleep(rng.uniform(0.0, 0.3))
                    self.start_aggregator()
                time.sleep(0.01)
            latest = watcher.wait_for_version(self.rounds, timeout=10)
            deadline = time.monotonic() + 5
            while len(watcher.summaries) < self.rounds and time.monotonic() < deadline:
                watcher.poll(0.1)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            driver.stop()
            watcher.stop()
        assert latest is not None
        return self._account(ModelSubscriber.weights(latest), watcher.summaries)

    def _answer_announcements(self, driver: PahoTransport) -> None:
        """Send at most one update per call for the newest open round (devices trickle in)."""
        while not driver.inbox.empty():
            msg = driver.inbox.get_nowait()
            ann = codec.decode(msg.payload) if msg.payload else None
            if isinstance(ann, RoundAnnouncement):
                self._announcement = ann
        ann = self._announcement
        if ann is not None and ann.open:
            for d in range(self.devices):
                uid = self.update_id(ann.round, d)
                if uid in self.sent:
                    continue  # already sent: the broker holds it for the aggregator
                u = ModelUpdate(federation=self.federation, device_id=f"d{d}", round=ann.round,
                                base_version=ann.base_version, update_id=uid,
                                num_examples=d + 1,
                                tensors=compression.encode_all(self.delta(ann.round, d)))
                driver.publish(self.topics.update(f"d{d}"), codec.encode(u), qos=1)
                self.sent[uid] = ann.round
                return

    def _account(self, final: dict[str, npt.NDArray[np.float32]],
                 summaries: dict[int, RoundSummary]) -> dict[str, float]:
        folded = [uid for s in summaries.values() for _, uid in s.accepted]
        reference = self.reference()
        return {
            "sent": len(self.sent),
            "folded": len(folded),
            "lost": len(set(self.sent) - set(folded)),
            "double_counted": len(folded) - len(set(folded)),
            "max_abs_diff_vs_reference": max(
                float(np.abs(final[k].astype(np.float64) - reference[k]).max())
                for k in reference),
            "kills": self.kills,
            "rounds": len(summaries),
        }
