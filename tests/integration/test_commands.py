"""The commands as users run them: separate processes, config files, a real broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
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
    """`python -m aggregator` + two agent processes complete two rounds on digits; one agent.toml
    without an id serves both (the id from --device-id, and from FEDMQ_DEVICE_ID)."""
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
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'federation = "{fed}"\n{broker}' + textwrap.dedent(
            """
            [data]
            source = "digits"
            num_shards = 2
            shard_from_env = "FEDMQ_SHARD"
            [trainer]
            kind = "softmax"
            """))
        for i in range(2):
            cmd = ([sys.executable, "-m", "device_agent", "--config", str(cfg),
                    "--device-id", "proc-dev-0"] if i == 0 else
                   [sys.executable, "-m", "fedmq.cli", "agent", "--config", str(cfg)])
            env = _env() | {"FEDMQ_SHARD": str(i)} | ({"FEDMQ_DEVICE_ID": "proc-dev-1"} if i
                                                        else {})
            agents.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
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
        assert not any("Traceback" in out for out in outputs), outputs
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


# ---------------------------------------------------------------- the command line itself


def _fedmq(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedmq.cli", *args], env=env or _env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_history_help_lists_its_commands() -> None:
    out = _fedmq("history", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: fedmq history")
    assert "list" in out.stdout
    assert "export" in out.stdout
    listing = _fedmq("history", "list", "--help")
    assert listing.returncode == 0, listing.stderr
    assert "--dir" in listing.stdout


def test_history_runs_through_fedmq(tmp_path: Path) -> None:
    out = _fedmq("history", "list", "--dir", str(tmp_path))
    assert "Traceback" not in out.stderr
    assert out.returncode in (0, 1), out.stderr  # an empty directory: nothing saved


@pytest.mark.parametrize(
    "argv",
    [["--log-level", "debug", "agent", "--config", "a.toml"],
     ["agent", "--config", "a.toml", "--log-level", "debug"],
     ["agent", "--log-level", "DEBUG", "--config", "a.toml"]],
    ids=["before", "after", "upper-case"],
)
def test_log_level_before_or_after_the_command(argv: list[str]) -> None:
    from fedmq.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.command, args.log_level) == ("agent", "debug")


def test_log_level_after_does_not_hide_the_one_before() -> None:
    from fedmq.cli import build_parser

    args = build_parser().parse_args(["--log-level", "error", "broker"])
    assert args.log_level == "error"
    assert build_parser().parse_args(["broker"]).log_level is None  # the command's default


@pytest.mark.parametrize("where", ["before", "after"])
def test_unknown_log_level_is_a_usage_error(where: str) -> None:
    command = ["broker", "--list-configs"]
    argv = ["--log-level", "loud", *command] if where == "before" else [*command, "--log-level",
                                                                           "loud"]
    out = _fedmq(*argv)
    assert out.returncode == 2
    assert "argument --log-level: invalid choice: 'loud' (choose from 'debug', 'info', " \
           "'warning', 'error')" in out.stderr
    assert "Traceback" not in out.stderr


def test_broker_help_explains_configs_port_and_output() -> None:
    out = _fedmq("broker", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for words in ("dev loopback, anonymous, in memory", "docker every interface",
                  "production a template to copy and edit", "--port PORT TCP port to listen on",
                  "--host HOST address to listen on", "Ctrl-C or SIGTERM",
                  "one line says where, the config it runs", "--print-config production"):
        assert words in text, words


def test_broker_prints_and_lists_the_shipped_configs() -> None:
    from fedmq.broker import default_config_dir

    listed = _fedmq("broker", "--list-configs")
    assert listed.returncode == 0, listed.stderr
    for name in ("dev.conf", "docker.conf", "production.conf", "acl.template"):
        assert str(default_config_dir() / name) in listed.stdout
    printed = _fedmq("broker", "--print-config", "production")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == (default_config_dir() / "production.conf").read_text()
    unknown = _fedmq("broker", "--print-config", "staging")
    assert unknown.returncode == 2
    assert unknown.stderr == ("fedmq broker: broker config 'staging' is neither a shipped one "
                              "(dev, docker, production, acl) nor a file\n")


@pytest.mark.broker
def test_broker_on_a_port_in_use_says_so_in_one_line(mosquitto: MosquittoBroker) -> None:
    out = _fedmq("broker", "--port", str(mosquitto.port))
    assert out.returncode == 2
    assert out.stderr == (f"fedmq broker: port {mosquitto.port} on 127.0.0.1 is in use (another "
                          "broker running?): stop it, or pass --port N\n")
    assert out.stdout == ""


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.broker
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_broker_stops_on_a_signal_and_leaves_nothing(sig: signal.Signals) -> None:
    from fedmq.broker import find_free_port

    port = find_free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "broker", "--port", str(port)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"mosquitto listening on 127.0.0.1:{port} (config "), line
        assert line.rstrip().endswith("Ctrl-C stops it")
        assert not _free(port)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert err == ""
    assert _free(port)  # no Mosquitto left behind
    workdir = Path(line.split(", log ")[1].split(")")[0]).parent
    assert not workdir.exists()


def test_agent_without_a_device_id_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[data]\nsource = "digits"\n')
    out = _fedmq("agent", "--config", str(cfg))
    assert out.returncode == 2
    assert out.stderr == (f"fedmq agent: {cfg}: no device id: pass --device-id ID, set "
                          "FEDMQ_DEVICE_ID, or set [device] id in the file (every agent needs "
                          "its own)\n")
    bad = _fedmq("agent", "--config", str(cfg), env=_env() | {"FEDMQ_DEVICE_ID": "room/3"})
    assert bad.returncode == 2
    assert bad.stderr.startswith("fedmq agent: $FEDMQ_DEVICE_ID: device id 'room/3' must be ")
    assert len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize("command", ["agent", "aggregator"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_services_stop_without_a_traceback_while_waiting_for_the_broker(
        tmp_path: Path, command: str, sig: signal.Signals) -> None:
    """Ctrl-C or SIGTERM at any moment (here: no broker yet) ends in a clean stop."""
    from fedmq.broker import find_free_port

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[broker]\nport = {find_free_port()}\nreconnect_max_s = 0.5\n'
                   '[device]\nid = "sig-1"\n[data]\nsource = "digits"\n' if command == "agent"
                   else f'[broker]\nport = {find_free_port()}\nreconnect_max_s = 0.5\n'
                        '[model]\nlayers = [8, 3]\n')
    proc = subprocess.Popen([sys.executable, "-m", "fedmq.cli", command, "--config", str(cfg)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "waiting for the broker" not in seen:
            assert time.monotonic() < deadline, seen
            seen += proc.stderr.readline()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = seen + err
    assert "Traceback" not in err, err
    if command == "agent":  # running: the signal handler stops it
        assert proc.returncode == 0, err
    else:  # still starting: one line says so
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
        assert err.splitlines()[-1] == (
            "fedmq aggregator: " + ("interrupted" if sig == signal.SIGINT else "terminated")
            + "; everything it started is stopped")


@pytest.mark.broker
@pytest.mark.slow
def test_demo_knobs_sampling_fedprox_fedsgd_and_slow_devices(tmp_path: Path) -> None:
    """Issue 11's demo knobs: --fraction samples devices, --batch-size full with --epochs 1 is
    FedSGD, --proximal-mu and --clip-norm reach the federation, --slow-fraction slows some."""
    out = tmp_path / "knobs.json"
    run = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--devices", "6", "--rounds", "3",
         "--broker", "mosquitto", "--fraction", "0.5", "--batch-size", "full", "--epochs", "1",
         "--lr", "0.5", "--proximal-mu", "0.01", "--clip-norm", "50", "--slow-fraction", "0.34",
         "--slow-factor", "3", "--json", str(out)],
        env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    rounds = json.loads(out.read_text())["rounds"]
    assert len(rounds) == 3
    assert all(1 <= r["participants"] <= 6 for r in rounds)
    assert any(r["participants"] < 6 for r in rounds)  # sampling at 0.5 left some out
    assert all(r["norm_bound"] == 50 for r in rounds)
    bad = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--fraction", "0", "--batch-size", "full"],
        env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "fedmq demo: --fraction 0.0 must be in (0, 1]"
    worse = subprocess.run([sys.executable, "-m", "fedmq.cli", "demo", "--batch-size", "0"],
                           env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert worse.returncode == 2
    assert "'0' is not a positive integer or 'full'" in worse.stderr


@pytest.mark.broker
@pytest.mark.slow
def test_demo_with_a_server_optimizer(tmp_path: Path) -> None:
    """--strategy reaches the aggregator: FedAdam at its defaults learns in a few rounds (its
    first step moves every weight by about server_lr, so round 1 is still near chance)."""
    out = tmp_path / "fedadam.json"
    run = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--devices", "4", "--rounds", "4",
         "--broker", "mosquitto", "--strategy", "fedadam", "--json", str(out)],
        env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["strategy"] == "fedadam (server_lr 0.01, beta1 0.9, beta2 0.99, tau 0.001)"
    accuracy = [r["accuracy"] for r in result["rounds"]]
    assert len(accuracy) == 4
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy
    assert "fedadam (server_lr 0.01" in run.stdout.splitlines()[-2]  # the final line names it
    bad = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--strategy", "fedadam", "--server-lr", "0"],
        env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "fedmq demo: --server-lr 0.0 must be a positive number"


def test_demo_refuses_more_devices_than_one_process_can_hold() -> None:
    """Issue 13: `fedmq demo --devices 1000` died in a storm of reconnects (paho's select()
    loop and 1,024 file descriptors); now one line says why and what to run instead."""
    out = subprocess.run([sys.executable, "-m", "fedmq.cli", "demo", "--devices", "1000"],
                         env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith("fedmq demo: --devices 1000 is more than this demo holds")
    assert "fedmq simulate --devices N" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
