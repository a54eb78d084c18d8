"""The commands as users run them: separate processes, config files, a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedmq.broker import MosquittoBroker
from fedmq.wire import DeviceStatus

from fedhelpers import Recorder, broker_config, unique_federation

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.broker
@pytest.mark.slow
def test_aggregator_and_agents_as_processes(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """`python -m aggregator` + two `fedmq agent` processes complete two rounds on digits."""
    fed = unique_federation("proc")
    broker = f'[broker]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n'
    (tmp_path / "aggregator.toml").write_text(f'federation = "{fed}"\n{broker}' + textwrap.dedent(
        """
        [model]
        layers = [64, 10]
        [rounds]
        min_updates = 2
        max_updates = 2
        deadline_s = 60
        max_rounds = 2
        [train]
        epochs = 2
        """))
    agents = []
    rec = Recorder(broker_config(mosquitto), fed).start()
    try:
        for i in range(2):
            cfg = tmp_path / f"agent{i}.toml"
            cfg.write_text(f'federation = "{fed}"\n{broker}' + textwrap.dedent(
                f"""
                [device]
                id = "proc-dev-{i}"
                [data]
                source = "digits"
                num_shards = 2
                shard = {i}
                [trainer]
                kind = "softmax"
                """))
            cmd = ([sys.executable, "-m", "device_agent", "--config", str(cfg)] if i == 0 else
                   [sys.executable, "-m", "fedmq.cli", "agent", "--config", str(cfg)])
            agents.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True))
        agg = subprocess.run(
            [sys.executable, "-m", "aggregator", "--config", str(tmp_path / "aggregator.toml")],
            env=_env(), capture_output=True, text=True, timeout=180, check=False)
        assert agg.returncode == 0, agg.stdout + agg.stderr
        assert "2 rounds, 4 updates accepted" in agg.stdout, agg.stdout + agg.stderr
        rec.wait_for(lambda r: 2 in r.models())
        assert {s.device_id for s in rec.of(DeviceStatus) if s.state == "online"} == {
            "proc-dev-0", "proc-dev-1"}
        for p in agents:
            p.send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=30)[0] for p in agents]
        assert all(p.returncode == 0 for p in agents), outputs
        # A clean stop says "offline" itself (the last will covers unclean ones).
        rec.wait_for(lambda r: {s.device_id for s in r.of(DeviceStatus)
                                if s.state == "offline"} == {"proc-dev-0", "proc-dev-1"})
    finally:
        for p in agents:
            if p.poll() is None:
                p.kill()
                p.wait()
        rec.stop()


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text('federation = "x"\n[rounds]\nmin_update = 3\n')
    out = subprocess.run([sys.executable, "-m", "aggregator", "--config", str(cfg)],
                         env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "unknown key `rounds.min_update`" in out.stderr


AGENT_DEVICE = '[device]\nid = "dev-1"\n'


@pytest.mark.parametrize(
    ("command", "text", "key"),
    [
        (["-m", "fedmq.cli", "aggregator"], "[train]\nlr = nan\n", "[train] lr = nan"),
        (["-m", "aggregator"], "[train]\nlr = nan\n", "[train] lr = nan"),
        (["-m", "fedmq.cli", "aggregator"], "[broker]\nkeepalive = 0\n", "[broker] keepalive = 0"),
        (["-m", "aggregator"], "[robust]\ntarget_quantile = 1\n", "[robust] target_quantile = 1"),
        (["-m", "aggregator"], "[rounds]\ndeadline_s = -inf\n", "[rounds] deadline_s = -inf"),
        (["-m", "aggregator"], "[model]\nlayers = [64, 0]\n", "[model] layers = [64, 0]"),
        (["-m", "aggregator"], "[robust]\nclip_norm = 500\nmax_norm = 100\n",
         "[robust] clip_norm = 500.0"),
        (["-m", "fedmq.cli", "agent"], AGENT_DEVICE + "outbox_max_bytes = 0\n",
         "[device] outbox_max_bytes = 0"),
        (["-m", "device_agent"], AGENT_DEVICE + "[data]\nseed = -1\n", "[data] seed = -1"),
        (["-m", "device_agent"], '[device]\nid = ""\n', '[device] id = ""'),
    ],
    ids=["fedmq-aggregator-lr-nan", "python-m-aggregator-lr-nan", "keepalive-zero",
         "quantile-one", "deadline-minus-inf", "zero-layer", "clip-above-max-norm",
         "fedmq-agent-outbox-zero", "python-m-device-agent-seed", "empty-device-id"],
)
def test_bad_config_value_is_one_line_and_exit_code_2(
    tmp_path: Path, command: list[str], text: str, key: str
) -> None:
    """The real commands: one line on stderr naming the file and the key, exit code 2."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    out = subprocess.run([sys.executable, *command, "--config", str(cfg)], env=_env(),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert f"{cfg}: {key} must be " in lines[0], lines[0]
    assert lines[0].startswith("fedmq "), lines[0]
    assert out.stdout == ""


@pytest.mark.broker
def test_demo_writes_json(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """A short demo run (in-process) through the `fedmq` entry point."""
    from fedmq.cli import main

    out = tmp_path / "demo.json"
    code = main(["demo", "--devices", "4", "--rounds", "2", "--broker",
                 f"{mosquitto.host}:{mosquitto.port}", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["broker"] == "external"
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert all(r["participants"] == 4 for r in data["rounds"])
    assert all(r["bytes_in"] > 0 for r in data["rounds"])
    assert 0.0 < data["final_accuracy"] <= 1.0
    assert data["final_accuracy"] == data["rounds"][-1]["accuracy"]


def test_demo_on_the_embedded_broker(tmp_path: Path) -> None:
    """The zero-install fallback: amqtt, MQTT 3.1.1."""
    from fedmq.cli import main

    out = tmp_path / "demo.json"
    assert main(["demo", "--devices", "3", "--rounds", "2", "--broker", "embedded",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["broker"] == "embedded"
    assert len(data["rounds"]) == 2


def test_device_side_never_imports_numba() -> None:
    code = ("import sys, device_agent.service, device_agent.agent, fedmq.cli, fedmq.transport, "
            "fedmq.codec; assert 'numba' not in sys.modules, 'numba imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
