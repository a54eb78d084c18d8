"""docs/apps.md and the worked example of docs/protocol.md (section 13), run as written against
a real aggregator that publishes chunked models over Mosquitto.

The federation: an in-process aggregator whose model (a 64-64-10 MLP, 4,810 parameters, 19 KB
in fp32) is above its ``max_chunk_bytes`` (8 KiB), so every version goes out as four parts and a
manifest, and two device agents training on the digits data with int8 updates (the model stays
fp32 whatever the devices send). The page's files are written from its marked blocks into an
empty directory beside protocol.md's code block (``fedmq_protocol.py``, as the page says) and run
there as separate processes; only the broker port changes. What they print is checked against
fedmq's own ``ModelSubscriber`` and the aggregator's published evaluation.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import numpy as np
import pytest

from device_agent.factory import split_holdout
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq.broker import MosquittoBroker
from fedmq.config import CompressionConfig, ModelConfig
from fedmq.datasets import load_digits_split, partition
from fedmq.subscriber import ModelSubscriber
from fedmq.topics import Topics
from fedmq.wire import GlobalModel, ModelEvaluation, model_digest

from fedhelpers import (
    Recorder,
    aggregator_config,
    broker_config,
    marked_blocks,
    running_aggregator,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APPS_MD = ROOT / "docs" / "apps.md"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
FEDERATION = "digits"  # the page's: each test module has a broker of its own
ROUNDS = 2
CHUNK_BYTES = 8192
BLOCKS = ("mosquitto_sub", "read_model_file.py", "follow_model.py", "subscriber.py")


def apps_blocks() -> dict[str, str]:
    """docs/apps.md's code blocks marked ``<!-- apps-doc: NAME -->``, by NAME."""
    return marked_blocks(APPS_MD, "apps-doc")


def protocol_example() -> str:
    """The code block of docs/protocol.md's worked example (as tests/unit/test_codec.py takes
    it: the first Python block after the heading)."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    heading = re.search(r"^## 13\. Worked example.*$", text, re.MULTILINE)
    assert heading is not None, "docs/protocol.md lost its worked example"
    block = re.search(r"```python\n(.*?)```", text[heading.end():], re.DOTALL)
    assert block is not None, "docs/protocol.md lost its worked example's code"
    return block.group(1)


def load_protocol_module(directory: Path) -> ModuleType:
    """protocol.md's block saved as ``fedmq_protocol.py`` and imported from there."""
    path = directory / "fedmq_protocol.py"
    module = ModuleType("fedmq_protocol")
    module.__file__ = str(path)
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__)
    return module


def test_the_page_has_its_blocks_and_names_the_port_it_uses() -> None:
    blocks = apps_blocks()
    assert set(blocks) == set(BLOCKS)
    assert "-p 1883" in blocks["mosquitto_sub"]
    assert "port=1883" in blocks["subscriber.py"]
    # The page's readers use protocol.md's code and nothing of fedmq.
    for name in ("read_model_file.py", "follow_model.py"):
        assert "from fedmq_protocol import ModelReader" in blocks[name]
        assert "fedmq." not in blocks[name].replace("from fedmq_protocol", "")


@dataclass
class Run:
    """What the federation left behind for the tests of this module."""

    directory: Path
    port: int
    #: Every version as fedmq's ModelSubscriber assembled and verified it.
    models: dict[int, GlobalModel]
    #: Every payload on the federation's topics, in arrival order (topic, payload, retained).
    payloads: list[tuple[str, bytes, bool]]
    evaluations: list[ModelEvaluation]
    follow_output: str


def _trainers() -> list[MLPTrainer]:
    x, y, _, _ = load_digits_split(0)
    out = []
    for i, idx in enumerate(partition(y, 2, "iid", 0)):
        x_fit, y_fit, x_ev, y_ev = split_holdout(x[idx], y[idx], 0.2, seed=i)
        out.append(MLPTrainer(x_fit, y_fit, num_classes=10, holdout=(x_ev, y_ev)))
    return out


def _python_env(directory: Path) -> dict[str, str]:
    """The environment of the page's commands: ``python`` is this interpreter, the working
    directory is the page's directory, nothing of the repository on the path but fedmq."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class Output:
    """A process's output lines, read by a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Until a line matches ``pattern``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s: "
                             f"{''.join(self.lines)}")

    def stop(self) -> str:
        """SIGTERM the process; all it printed."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        self._thread.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return "".join(self.lines)


@pytest.fixture(scope="module")
def run(mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory) -> Run:
    directory = tmp_path_factory.mktemp("app")
    blocks = apps_blocks()
    (directory / "fedmq_protocol.py").write_text(protocol_example(), encoding="utf-8")
    for name in ("read_model_file.py", "follow_model.py", "subscriber.py"):
        (directory / name).write_text(blocks[name], encoding="utf-8")
    broker = broker_config(mosquitto)
    config = dataclasses.replace(
        aggregator_config(broker, FEDERATION, min_updates=2, max_updates=2, max_rounds=ROUNDS),
        model=ModelConfig(layers=[64, 64, 10], seed=0),
        compression=CompressionConfig(codec="int8", max_chunk_bytes=CHUNK_BYTES))
    models: dict[int, GlobalModel] = {}

    def keep(model: GlobalModel) -> None:
        models[model.version] = model

    reference = ModelSubscriber(broker, FEDERATION, on_model=keep).start()
    recorder = Recorder(broker, FEDERATION).start()
    agents = [AgentService.over_mqtt(FEDERATION, f"dev-{i}", trainer, broker)
              for i, trainer in enumerate(_trainers())]
    follow: Output | None = None
    follow_output = ""
    try:
        with running_aggregator(config) as agg:
            assert reference.wait_for_version(0, timeout=20) is not None, "no version 0"
            # follow_model.py as the page runs it; version 0 comes to it retained, at once.
            follow = Output(subprocess.Popen(
                [sys.executable, "follow_model.py", "127.0.0.1", str(mosquitto.port),
                 FEDERATION], cwd=directory, env=_python_env(directory), text=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            follow.wait_for(r"version 0:", timeout=20)
            for agent in agents:
                agent.start()
            assert agg.wait(120), "the federation did not finish its rounds"
            follow.wait_for(rf"version {ROUNDS}:", timeout=20)
            assert agg.telemetry.evaluated(ROUNDS) is not None
        assert reference.wait_for_version(ROUNDS, timeout=10) is not None
        recorder.wait_for(lambda r: any(e.version == ROUNDS and e.devices == 2
                                        for e in r.of(ModelEvaluation)))
    finally:
        for agent in agents:
            agent.stop()
        if follow is not None:
            follow_output = follow.stop()
        reference.stop()
        recorder.stop()
    payloads = [(m.topic, m.payload, m.retain) for m, _ in recorder.messages]
    return Run(directory, mosquitto.port, models, payloads, recorder.of(ModelEvaluation),
              follow_output)


def _printed_models(output: str) -> dict[int, str]:
    """``run R version V: …`` lines by version (the run checked to be the same throughout)."""
    found = re.findall(r"^run (\d+) version (\d+)(.*)$", output, re.MULTILINE)
    assert len({run for run, _, _ in found}) == 1, output
    return {int(version): rest for _, version, rest in found}


def test_the_models_are_chunked_as_the_pages_say(run: Run) -> None:
    """What the pages tell app writers, checked on what the aggregator really sent."""
    topics = Topics(FEDERATION)
    seen_parts: dict[tuple[int, int], set[int]] = {}
    manifests = 0
    for topic, payload, _ in run.payloads:
        if topic != topics.model and not topic.startswith(f"{topics.model}/part/"):
            continue
        msg = msgpack.unpackb(payload, raw=False)
        key = (msg.get("run", 0), msg["version"])
        assert msg["chunks"] == 4, "the test's model is meant to go out in four parts"
        for t in msg["tensors"]:
            assert (t["dtype"], t["codec"]) == ("float32", "fp32")  # devices sent int8
        if topic == topics.model:
            manifests += 1
            assert msg["tensors"] == []
            assert "chunk" not in msg
            # The parts came first: all of this version's were already in.
            assert seen_parts.get(key) == set(range(msg["chunks"])), key
        else:
            assert topic == topics.model_part(msg["chunk"])
            seen_parts.setdefault(key, set()).add(msg["chunk"])
    assert manifests == ROUNDS + 1
    # The manifest's digest is the whole model's: hashing the manifest alone never matches.
    manifest = msgpack.unpackb(next(p for t, p, _ in run.payloads if t == topics.model),
                               raw=False)
    assert model_digest(()) != manifest["sha256"]


def test_protocol_example_reads_the_real_chunked_models(run: Run) -> None:
    example = load_protocol_module(run.directory)
    topics = Topics(FEDERATION)
    model_payloads = [(t, p) for t, p, _ in run.payloads
                      if t == topics.model or t.startswith(f"{topics.model}/part/")]

    # read_model is for whole models: a manifest is refused, never "read" with a bad digest.
    with pytest.raises(ValueError, match="use ModelReader"):
        example.read_model(model_payloads[-1][1])

    # ModelReader, fed the payloads as they arrived, returns every version once, in order.
    reader = example.ModelReader()
    got = [out for _, payload in model_payloads if (out := reader.feed(payload)) is not None]
    assert [version for _, version, _ in got] == list(range(ROUNDS + 1))
    for model_run, version, weights in got:
        expected = ModelSubscriber.weights(run.models[version])
        assert model_run == run.models[version].run
        assert list(weights) == list(expected)
        for name, array in weights.items():
            assert array.dtype == np.float32
            np.testing.assert_array_equal(array, expected[name])

    # Parts of two versions interleaved, the older manifest last: the newer model only.
    by_version: dict[int, list[dict[str, Any]]] = {}
    for _, payload in model_payloads:
        msg = msgpack.unpackb(payload, raw=False)
        by_version.setdefault(msg["version"], []).append(msg)
    old, new = by_version[1], by_version[2]
    reader = example.ModelReader()
    order = [*old[:-1], *new[:-1], new[-1], old[-1]]  # each list ends with its manifest
    outputs = [reader.add(msg) for msg in order]
    assert [o[1] for o in outputs if o is not None] == [2]

    # A corrupt part is caught by the digest of the whole model.
    reader = example.ModelReader()
    for msg in new[:-1]:
        reader.add(msg)
    data = bytearray(new[0]["tensors"][0]["data"])
    data[0] ^= 1
    reader.add({**new[0], "tensors": [{**new[0]["tensors"][0], "data": bytes(data)},
                                      *new[0]["tensors"][1:]]})
    with pytest.raises(ValueError, match="sha256 mismatch"):
        reader.add(new[-1])


def test_follow_model_prints_every_version(run: Run) -> None:
    printed = _printed_models(run.follow_output)
    assert sorted(printed) == list(range(ROUNDS + 1)), run.follow_output
    shapes = ": " + ", ".join(f"{t.name} {list(t.shape)}" for t in run.models[0].tensors)
    assert all(rest == shapes for rest in printed.values()), run.follow_output
    assert f"run {run.models[0].run} version 0" in run.follow_output


def _sh_commands(block: str, port: int) -> list[str]:
    """The block's commands (continuation lines joined), with the test broker's port."""
    assert "-p 1883 " in block
    joined = block.replace("\\\n", " ").replace("-p 1883 ", f"-p {port} ")
    return [line for line in joined.splitlines() if line.strip()]


def require_mosquitto_sub() -> None:
    """Skip without ``mosquitto_sub`` (scripts/test installs it), except under CI: fail."""
    if shutil.which("mosquitto_sub") is not None:
        return
    hint = "mosquitto_sub is missing: apt-get install mosquitto-clients (scripts/test does)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{hint}; CI never skips it", pytrace=False)
    pytest.skip(hint)


def test_mosquitto_sub_saves_a_model_that_read_model_file_reads(run: Run) -> None:
    require_mosquitto_sub()
    commands = _sh_commands(apps_blocks()["mosquitto_sub"], run.port)
    assert len(commands) == 2
    env = _python_env(run.directory)
    sub = subprocess.run(["sh", "-c", commands[0]], cwd=run.directory, env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    # How --retained-only -W stops, as the page says.
    assert (sub.returncode, sub.stderr.strip()) == (27, "Timed out"), sub
    saved = (run.directory / "model.msgpack").read_bytes()
    assert len(saved) > 19_240  # the manifest and its four parts
    read = subprocess.run(["sh", "-c", commands[1]], cwd=run.directory, env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert read.returncode == 0, read.stderr
    final = run.models[ROUNDS]
    assert read.stdout.splitlines()[0] == f"run {final.run} version {ROUNDS}", read.stdout
    expected = [f"  {name} {list(a.shape)} mean {a.mean():+.6f}"
                for name, a in ModelSubscriber.weights(final).items()]
    assert read.stdout.splitlines()[1:] == expected, read.stdout

    # Without -N, mosquitto_sub ends every payload with a newline and the file cannot be read.
    plain = commands[0].replace(" -N", "").replace("model.msgpack", "model-no-N.msgpack")
    assert plain != commands[0]
    subprocess.run(["sh", "-c", plain], cwd=run.directory, env=env, capture_output=True,
                   timeout=30, check=False)
    broken = subprocess.run([sys.executable, "read_model_file.py", "model-no-N.msgpack"],
                            cwd=run.directory, env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert broken.returncode != 0
    assert "not a fedmq v1 model message" in broken.stderr, broken.stderr


def test_subscriber_block_reads_the_model_and_its_evaluation(run: Run) -> None:
    source = apps_blocks()["subscriber.py"].replace("port=1883", f"port={run.port}")
    (run.directory / "subscriber_test_port.py").write_text(source, encoding="utf-8")
    out = subprocess.run([sys.executable, "subscriber_test_port.py"], cwd=run.directory,
                         env=_python_env(run.directory), capture_output=True, text=True,
                         timeout=90, check=False)
    assert out.returncode == 0, out.stderr
    final = run.models[ROUNDS]
    lines = out.stdout.splitlines()
    # The retained model is the newest: version 2 answers the wait for version 1.
    assert lines[0] == f"run {final.run} version {ROUNDS} (round {final.round})", out.stdout
    n = len(final.tensors)
    assert lines[1:1 + n] == [f"  {t.name} {list(t.shape)}" for t in final.tensors], out.stdout
    # The retained evaluation is the last one published: version 2's, from both devices.
    evaluation = [e for e in run.evaluations if e.version == ROUNDS][-1]
    assert evaluation.devices == 2
    assert lines[1 + n:] == [f"  version {ROUNDS}: {dict(evaluation.metrics)}"], out.stdout
    assert 0.5 < evaluation.metrics["eval_accuracy"] <= 1.0
