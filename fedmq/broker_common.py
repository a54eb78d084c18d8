"""What both local brokers (``fedmq.broker``'s Mosquitto, ``fedmq.embedded_broker``'s amqtt)
share: their start and stop timeouts and a free port to listen on."""

from __future__ import annotations

import signal
import socket
import subprocess

__all__ = ["START_TIMEOUT_S", "STOP_TIMEOUT_S", "find_free_port", "stop_process"]

#: How long a broker may take to accept connections, and to stop.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (another process may still take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def stop_process(process: subprocess.Popen[bytes] | subprocess.Popen[str],
                 sig: signal.Signals) -> None:
    """Send ``sig`` to a broker process still running and reap it; SIGKILL it if it has not
    exited within ``STOP_TIMEOUT_S``."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
