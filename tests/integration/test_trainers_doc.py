"""docs/trainers.md's worked example, run as written: its files written from the page's marked
blocks into an empty directory, its commands run there as separate processes (the ``fedmq``
console script, so the trainer module is found in the working directory as on a device), over a
real Mosquitto. Only the broker port changes.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmq.broker import MosquittoBroker
from fedmq.subscriber import ModelSubscriber

from fedhelpers import broker_config, marked_blocks

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "trainers.md"
FILES = ("linear_regression.py", "make_model.py", "aggregator.toml", "agent.toml")


def doc_blocks() -> dict[str, str]:
    """The page's code blocks marked ``<!-- trainers-doc: NAME -->``, by NAME."""
    return marked_blocks(DOC, "trainers-doc")


def test_the_doc_shows_the_example_file_as_it_is() -> None:
    blocks = doc_blocks()
    assert set(blocks) == {*FILES, "commands"}
    assert blocks["linear_regression.py"] == (ROOT / "examples" / "linear_regression.py"
                                              ).read_text(encoding="utf-8")


def command(line: str) -> list[str]:
    """A command line of the page, with ``python`` and ``fedmq`` those of this environment."""
    argv = shlex.split(line)
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    assert argv[0] == "fedmq", line
    script = Path(sys.executable).parent / "fedmq"
    assert script.exists(), f"the fedmq console script is not installed beside {sys.executable}"
    return [str(script), *argv[1:]]


@pytest.mark.broker
def test_the_worked_example_runs_as_written(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    blocks = doc_blocks()
    for name in FILES:
        text = blocks[name]
        if name.endswith(".toml"):
            assert 'host = "127.0.0.1"\nport = 1883\n' in text, name
            text = text.replace("port = 1883", f"port = {mosquitto.port}")
        (tmp_path / name).write_text(text, encoding="utf-8")
    lines = [line for line in blocks["commands"].splitlines() if line.strip()]
    assert len(lines) == 5
    # The console script's sys.path holds neither the repository nor the working directory:
    # the trainer module must be found in the working directory, as on a device.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDMQ_DEVICE_ID")}
    made = subprocess.run(command(lines[0]), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "model.npz").exists()

    app = ModelSubscriber(broker_config(mosquitto), "sensors", evaluations=True).start()
    procs: list[subprocess.Popen[str]] = []
    try:
        for line in lines[1:]:
            procs.append(subprocess.Popen(command(line), cwd=tmp_path, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        aggregator = procs[0]
        out, _ = aggregator.communicate(timeout=120)
        assert aggregator.returncode == 0, out
        assert app.wait_for_version(3, timeout=10) is not None
        app.poll(1.0)  # the last evaluations
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=30)[0] for p in procs[1:]]
        app.stop()
    for p, log in zip(procs[1:], logs, strict=True):
        assert p.returncode == 0, log
        assert "Traceback" not in log, log
        assert "sent update for round 3" in log, log

    # Every version was scored by the three sensors on their held-out readings, no accuracy.
    losses = []
    for version in range(4):
        evaluation = app.evaluations[version]
        metrics = evaluation.metrics
        assert (evaluation.devices, evaluation.num_examples) == (3, 300)
        assert "eval_accuracy" not in metrics
        assert metrics["eval_mae"] > 0
        losses.append(metrics["eval_loss"])
    print("eval_loss by version:", losses)
    assert losses == sorted(losses, reverse=True), losses
    assert losses[0] > 100  # zeros predict 0 °C for about 21 °C
    assert losses[-1] < 0.5  # the noise alone costs 0.25
    model = app.latest
    assert model is not None
    assert model.version == 3
    weights = ModelSubscriber.weights(model)
    assert weights["bias"].shape == ()
    print("final model:", weights)
    np.testing.assert_allclose(weights["weight"], [1.5, -2.0, 0.5, 3.0], atol=0.1)
    np.testing.assert_allclose(weights["bias"], 21.0, atol=0.2)
