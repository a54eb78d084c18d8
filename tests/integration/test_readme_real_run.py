"""README "Running it for real", run literally from a wheel built from this checkout.

Every ``sh`` block preceded by ``<!-- real-run: NAME -->`` in README.md is run with ``bash`` as
written, except that the port 1883 becomes a free one: in the commands and in the example
configs they read. The "machines" are directories outside the repository, under a temporary
HOME (so ``~/fedmq-server`` and ``~/fedmq-device`` are fresh virtual environments there):

- the clone: the checkout's files (tracked and new ones), copied;
- a device: the wheel and ``examples/agent.toml``, copied from the clone, as the README's
  ``scp`` line says.

The server environment gets ``[aggregator]``; the device one the bare wheel, where scikit-learn
and Numba must not be importable. Broker, aggregator and two agents run until an app has read
the model of round 2; then each gets Ctrl-C (SIGINT to its process group) and must exit cleanly,
without a traceback, leaving no Mosquitto behind. pip reuses this user's cache (installs need
PyPI or that cache). Changing a README command without this test still passing fails it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.broker import find_free_port, mosquitto_binary

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- real-run: (?P<name>[\w-]+) -->\n```sh\n(?P<body>.*?)\n```", re.DOTALL)
STEPS = ("server-install", "broker", "aggregator", "device-install", "device-1", "device-2", "app")
README_PORT = "1883"

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def readme_steps() -> dict[str, str]:
    """The marked blocks of README.md, by name."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def test_readme_marks_every_step() -> None:
    steps = readme_steps()
    assert list(steps) == list(STEPS)
    for name, body in steps.items():
        assert body.strip(), name
    # The only thing the test changes: the port, in the commands and the example configs.
    assert README_PORT in steps["broker"]
    assert README_PORT in steps["app"]
    for config in ("aggregator.toml", "agent.toml"):
        assert f"port = {README_PORT}" in (ROOT / "examples" / config).read_text()


def _copy_checkout(dest: Path) -> None:
    """The checkout's tracked and untracked (not ignored) files, as a fresh clone would have
    them plus work in progress."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = ROOT / rel
        if source.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


class Machine:
    """Runs README blocks with bash in one directory, HOME and PATH shared by the test."""

    def __init__(self, cwd: Path, env: dict[str, str], port: int) -> None:
        self.cwd, self.env, self.port = cwd, env, port
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def script(self, body: str) -> str:
        return body.replace(README_PORT, str(self.port))

    def run(self, name: str, body: str, timeout: float) -> str:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", self.script(body)], cwd=self.cwd,
                             env=self.env, capture_output=True, text=True, timeout=timeout,
                             check=False)
        assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def start(self, name: str, body: str) -> None:
        log = self.cwd.parent / f"{name}.log"
        self.logs[name] = log
        with log.open("w") as fh:
            # Its own process group: a Ctrl-C in its terminal reaches it and only it.
            self.running[name] = subprocess.Popen(
                ["bash", "-c", self.script(body)], cwd=self.cwd, env=self.env, stdout=fh,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while text not in self.log(name):
            proc = self.running[name]
            assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n{self.log(name)}"
            assert time.monotonic() < end, f"no {text!r} from {name} in {timeout} s:\n" \
                                           f"{self.log(name)}"
            time.sleep(0.2)

    def ctrl_c(self, name: str, timeout: float = 30) -> int:
        proc = self.running[name]
        os.killpg(proc.pid, signal.SIGINT)
        return proc.wait(timeout=timeout)

    def kill_all(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _interpreter_dir(tmp: Path) -> Path:
    """A PATH entry whose ``python3`` is this machine's (a pyenv shim would need the real HOME)."""
    found = shutil.which("python3")
    if found is None:
        pytest.skip("no python3 on PATH")
    real = subprocess.run([found, "-c", "import sys; print(sys.executable)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    version = subprocess.run([real, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if version != "True":
        pytest.skip(f"python3 ({real}) is older than 3.11")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(real)
    return bin_dir


@pytest.fixture
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Machine, Machine]]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    tmp = tmp_path_factory.mktemp("readme")
    assert ROOT not in tmp.parents
    port = find_free_port()
    home = tmp / "home"
    home.mkdir()
    cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True,
                           text=True, check=False).stdout.strip()
    env = {
        "HOME": str(home),
        "PATH": f"{_interpreter_dir(tmp)}{os.pathsep}/usr/sbin{os.pathsep}/usr/bin{os.pathsep}"
                "/bin",
        "LANG": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_PROGRESS_BAR": "off",
    }
    if cache:
        env["PIP_CACHE_DIR"] = cache
    clone = tmp / "clone"
    _copy_checkout(clone)
    for config in ("aggregator.toml", "agent.toml"):  # the port, as in the commands
        path = clone / "examples" / config
        path.write_text(path.read_text().replace(f"port = {README_PORT}", f"port = {port}"))
    device = tmp / "device"
    device.mkdir()
    server, dev = Machine(clone, env, port), Machine(device, env, port)
    try:
        yield server, dev
    finally:
        for m in (dev, server):
            m.kill_all()


def test_readme_real_run(machines: tuple[Machine, Machine]) -> None:
    server, device = machines
    steps = readme_steps()
    t0 = time.monotonic()
    server.run("server-install", steps["server-install"], timeout=600)
    wheels = sorted((server.cwd / "dist").glob("fedmq-*.whl"))
    assert [w.name for w in wheels] == ["fedmq-0.1.0-py3-none-any.whl"]

    server.start("broker", steps["broker"])
    server.wait_for("broker", f"mosquitto listening on 127.0.0.1:{server.port}", 20)
    server.start("aggregator", steps["aggregator"])

    # The README's scp: the wheel and the example agent config, to the device.
    shutil.copy2(wheels[0], device.cwd)
    shutil.copy2(server.cwd / "examples" / "agent.toml", device.cwd)
    device.run("device-install", steps["device-install"], timeout=600)
    python = Path(device.env["HOME"]) / "fedmq-device" / "bin" / "python"
    for missing in ("sklearn", "numba"):
        probe = subprocess.run([str(python), "-c", f"import {missing}"], capture_output=True,
                               text=True, check=False)
        assert probe.returncode != 0, f"{missing} is installed on the device"
    installed = time.monotonic() - t0

    device.start("device-1", steps["device-1"])
    device.start("device-2", steps["device-2"])
    server.wait_for("aggregator", "aggregator for federation 'digits' started", 120)
    app = device.run("app", steps["app"], timeout=300)
    assert re.search(r"^model version ([2-9]|\d\d+) \{", app, re.MULTILINE), app

    agg = server.log("aggregator")
    for n in (1, 2):
        assert f"round {n} closed by " in agg, agg
    for name in ("device-1", "device-2"):
        log = device.log(name)
        assert f"as fedmq-device-dev-{name[-1]}" in log, log

    # Ctrl-C: each stops cleanly, in one piece, and the broker takes its Mosquitto along.
    for machine, name in ((device, "device-1"), (device, "device-2"), (server, "aggregator"),
                          (server, "broker")):
        code = machine.ctrl_c(name)
        log = machine.log(name)
        assert "Traceback" not in log, log
        assert code in (0, 130), f"{name} exited {code}:\n{log}"
    assert "aggregator stopped: " in server.log("aggregator")
    broker_log = re.search(r"log (\S+/mosquitto\.log)", server.log("broker"))
    assert broker_log is not None
    assert not Path(broker_log[1]).parent.exists(), "the broker's work dir was left behind"
    _assert_port_free(server.port)
    print(f"installs {installed:.0f} s, total {time.monotonic() - t0:.0f} s")


def _assert_port_free(port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))  # raises if a Mosquitto still listens
