"""Start an MQTT broker for development, tests and the demo.

Two brokers, one shape (``start()`` / ``stop()`` / context manager / ``host`` / ``port``):

- ``MosquittoBroker``: a real Mosquitto 2.0 process, run from a config template (the shipped
  ones are package data in ``fedmq/broker_config/``) rendered to a free port. MQTT 3.1.1 and
  5. The one the tests use.
- ``EmbeddedBroker`` (``fedmq.embedded_broker``): amqtt in a daemon thread (``pip install
  'fedmq[embedded]'``), for a zero-install demo. MQTT 3.1.1 only, in memory, about 4-8x slower
  than Mosquitto.

``start_broker(spec)`` picks one from a short string (``auto``, ``mosquitto``, ``embedded``,
``HOST:PORT``) and yields a ``BrokerHandle`` saying where to connect.

No MQTT client library is used here: readiness is a TCP connect.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from fedmq.broker_common import START_TIMEOUT_S, find_free_port, stop_process
from fedmq.embedded_broker import EmbeddedBroker
from fedmq.errors import BrokerError

__all__ = [
    "SHIPPED_CONFIGS",
    "BrokerConfigNotFoundError",
    "BrokerHandle",
    "EmbeddedBroker",
    "MosquittoBroker",
    "broker_config_path",
    "default_config_dir",
    "find_free_port",
    "mosquitto_binary",
    "render_config",
    "start_broker",
]

_LOG_TAIL_LINES = 30
_MOSQUITTO_FALLBACK = "/usr/sbin/mosquitto"
_INSTALL_MOSQUITTO = (
    "install it with `apt-get install mosquitto` (Debian/Ubuntu) or `brew install mosquitto`, "
    "or use the embedded broker (`pip install 'fedmq[embedded]'`)"
)


class BrokerConfigNotFoundError(BrokerError, FileNotFoundError):
    """The broker config directory or template does not exist."""


#: The shipped files, by the short name ``fedmq broker --config`` / ``--print-config`` take.
SHIPPED_CONFIGS = {
    "dev": "dev.conf",
    "docker": "docker.conf",
    "production": "production.conf",
    "acl": "acl.template",
}


def default_config_dir() -> Path:
    """Return ``fedmq/broker_config/``: the shipped Mosquitto configs (package data)."""
    path = Path(__file__).resolve().parent / "broker_config"
    if not path.is_dir():
        raise BrokerConfigNotFoundError(
            f"broker config directory not found: looked for {path} (package data of fedmq); "
            "reinstall fedmq, or pass a config file explicitly"
        )
    return path


def broker_config_path(name: str) -> Path:
    """A shipped config by its short name (``dev``, ``docker``, ``production``, ``acl``) or
    file name (``dev.conf``), else ``name`` as a path to a config file of one's own."""
    shipped = SHIPPED_CONFIGS.get(name, name)
    if shipped in SHIPPED_CONFIGS.values():
        return default_config_dir() / shipped
    path = Path(name)
    if not path.is_file():
        known = ", ".join(SHIPPED_CONFIGS)
        raise BrokerConfigNotFoundError(
            f"broker config {name!r} is neither a shipped one ({known}) nor a file")
    return path


def mosquitto_binary() -> str | None:
    """Return the path of the ``mosquitto`` executable, or None if it is not installed."""
    # Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    if os.access(_MOSQUITTO_FALLBACK, os.X_OK):
        return _MOSQUITTO_FALLBACK
    return None


_DIRECTIVE = re.compile(r"^\s*(?P<key>[A-Za-z_]+)(?:\s|$)")
# `port` and `bind_address` configure the legacy default listener: a second, unrendered one.
_LEGACY_LISTENER_KEYS = ("port", "bind_address")


def render_config(
    template: Path,
    port: int,
    host: str = "127.0.0.1",
    data_dir: Path | None = None,
    *,
    user: str | None = None,
) -> str:
    """Return the Mosquitto config ``template`` rewritten to listen on ``host:port`` only.

    The template must declare exactly one ``listener`` line (and no legacy ``port`` /
    ``bind_address``): a second listener would bind a fixed port that parallel test runs
    fight over, so it is refused rather than silently dropped. Everything else, including
    the listener's TLS options, is kept. ``data_dir`` replaces ``persistence_location``;
    ``user`` replaces ``user`` (which account Mosquitto drops to when started as root).
    """
    try:
        lines = template.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise BrokerConfigNotFoundError(f"broker config template not found: {template}") from exc

    # Lines these arguments replace; the new values are appended at the end.
    dropped = {"persistence_location"} if data_dir is not None else set()
    if user is not None:
        dropped.add("user")
    listener_at: list[int] = []
    out: list[str] = []
    for number, line in enumerate(lines, start=1):
        match = _DIRECTIVE.match(line)
        key = match.group("key") if match else None
        if key in _LEGACY_LISTENER_KEYS:
            raise ValueError(
                f"{template}:{number}: `{key}` opens a second, legacy listener; "
                "declare the address on the `listener` line instead"
            )
        if key == "listener":
            listener_at.append(number)
            out.append(f"listener {port} {host}")
        elif key not in dropped:
            out.append(line)
    if len(listener_at) != 1:
        where = ", ".join(f"line {n}" for n in listener_at) or "none"
        raise ValueError(
            f"{template}: expected exactly one `listener` line, found {len(listener_at)} "
            f"({where}); a test broker must bind only the port it was given"
        )
    if data_dir is not None:
        # Trailing slash: Mosquitto 1.x appended the file name without a separator.
        out.append(f"persistence_location {data_dir.as_posix().rstrip('/')}/")
    if user is not None:
        out.append(f"user {user}")
    return "\n".join(out) + "\n"


def _wait_for_port(
    host: str, port: int, deadline: float, alive: Callable[[], bool] | None = None
) -> bool:
    """Poll until ``host:port`` accepts a connection; False on timeout or once ``alive()`` fails."""
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.25):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def _can_listen(host: str, port: int) -> bool:
    """True if a server could listen on ``host:port`` now (as Mosquitto will, with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class MosquittoBroker:
    """A Mosquitto process on its own port, run from a rendered copy of a config template.

    The rendered config, the log (stdout and stderr) and any persistence file live in a
    private temporary directory that survives ``stop()`` and ``restart()`` (so a restart
    with ``persistence true`` reloads its state) and is removed by ``close()`` or on leaving
    the ``with`` block.
    """

    def __init__(
        self,
        config_template: Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
    ) -> None:
        self._template = config_template or default_config_dir() / "dev.conf"
        self._host = host
        self._port = port if port is not None else find_free_port(host)
        found = binary or mosquitto_binary()
        if found is None:
            raise BrokerError(f"mosquitto binary not found: {_INSTALL_MOSQUITTO}")
        self._binary = found
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """Address the listener binds and clients connect to."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port; fixed for the broker's life, so it is the same after ``restart()``."""
        return self._port

    @property
    def log_path(self) -> Path:
        """Mosquitto's combined stdout/stderr; readable after ``stop()`` until ``close()``."""
        return self._ensure_workdir() / "mosquitto.log"

    @property
    def config_path(self) -> Path:
        """The rendered config Mosquitto runs with."""
        return self._ensure_workdir() / "mosquitto.conf"

    @property
    def pid(self) -> int | None:
        """Process id while running, else None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the Mosquitto process is alive."""
        return self._process is not None and self._process.poll() is None

    def _ensure_workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="fedmq-mosquitto-"))
        return self._workdir

    def start(self) -> None:
        """Launch Mosquitto and return once its port accepts connections.

        Raises ``BrokerError`` with the tail of the log if it exits or is not listening within
        ``START_TIMEOUT_S`` seconds.
        """
        if self.running:
            raise BrokerError(f"mosquitto is already running on {self._host}:{self._port}")
        # Checked up front: a broker already listening there would answer the readiness probe
        # while ours is still about to fail on bind.
        if not _can_listen(self._host, self._port):
            raise BrokerError(
                f"port {self._port} on {self._host} is in use (another broker running?): "
                "stop it, or pass --port N"
            )
        workdir = self._ensure_workdir()
        # As root, Mosquitto drops to the `mosquitto` user, which could not write the private
        # (0700) work dir; elsewhere `user` is ignored.
        user = getpass.getuser() if os.geteuid() == 0 else None
        self.config_path.write_text(
            render_config(self._template, self._port, self._host, data_dir=workdir, user=user),
            encoding="utf-8",
        )
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self._binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                # Its own process group: a Ctrl-C meant for the test run reaches us, not the broker.
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        listening = _wait_for_port(self._host, self._port, deadline, alive=lambda: self.running)
        # Something else may own the port; only a live process of ours counts.
        if listening and self.running:
            return
        code = self._process.poll()
        self._terminate(signal.SIGKILL)
        state = f"exited with status {code}" if code is not None else "was not listening"
        raise BrokerError(
            f"mosquitto {state} within {START_TIMEOUT_S:.0f} s on {self._host}:{self._port} "
            f"(config {self.config_path}); last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Last ``lines`` lines of the broker log (empty if there is none yet)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _terminate(self, sig: signal.Signals) -> None:
        if self._process is not None:
            stop_process(self._process, sig)
        self._process = None

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves persistence and exits cleanly), then SIGKILL after a timeout."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is saved since the last autosave."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same work dir."""
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads passwords, ACL and most limits without dropping clients."""
        if self._process is None or not self.running:
            raise BrokerError("mosquitto is not running")
        self._process.send_signal(signal.SIGHUP)

    def close(self) -> None:
        """Stop and delete the work dir (config, log, persistence file)."""
        self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


BrokerKind = Literal["mosquitto", "embedded", "external"]


@dataclass(frozen=True)
class BrokerHandle:
    """Where to connect, what is behind it, and whether it speaks MQTT 5."""

    host: str
    port: int
    kind: BrokerKind
    # For an external broker this is assumed: every maintained broker (Mosquitto >= 1.6, EMQX,
    # HiveMQ, VerneMQ) speaks MQTT 5; only the embedded amqtt does not.
    mqtt5: bool

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_external(spec: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) into host and port."""
    host, sep, port_text = spec.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(
            f"invalid broker {spec!r}: expected 'auto', 'mosquitto', 'embedded' or HOST:PORT "
            "(e.g. localhost:1883)"
        )
    return host, int(port_text)


@contextlib.contextmanager
def start_broker(spec: str = "auto", config_template: Path | None = None) -> Iterator[BrokerHandle]:
    """Start the broker ``spec`` names for the duration of a ``with`` block.

    ``auto``: Mosquitto if installed, else the embedded broker. ``mosquitto`` / ``embedded``:
    that one, on a free loopback port (``config_template`` applies to Mosquitto; default
    the shipped ``dev.conf``). ``HOST:PORT``: an external broker; nothing is started.
    Use ``contextlib.ExitStack`` to hold it open outside a ``with`` block.
    """
    kind = spec.strip().lower()
    if kind == "auto":
        kind = "mosquitto" if mosquitto_binary() is not None else "embedded"
    if kind == "mosquitto":
        with MosquittoBroker(config_template) as mosquitto:
            yield BrokerHandle(mosquitto.host, mosquitto.port, "mosquitto", mqtt5=True)
    elif kind == "embedded":
        with EmbeddedBroker() as embedded:
            yield BrokerHandle(embedded.host, embedded.port, "embedded", mqtt5=False)
    else:
        host, port = parse_external(spec.strip())
        yield BrokerHandle(host, port, "external", mqtt5=True)
