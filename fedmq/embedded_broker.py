"""amqtt in a daemon thread: a zero-install broker for the demo (``pip install
'fedmq[embedded]'``). MQTT 3.1.1 only, in memory, about 4-8x slower than Mosquitto; the same
shape as ``fedmq.broker.MosquittoBroker`` (``start()`` / ``stop()`` / context manager / ``host``
/ ``port``)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Any, Self

from fedmq.broker_common import START_TIMEOUT_S, STOP_TIMEOUT_S, find_free_port
from fedmq.errors import BrokerError

__all__ = ["EmbeddedBroker"]


def _amqtt_broker_class() -> Any:
    """amqtt's broker class, patched to close its connections; or say how to install amqtt."""
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs amqtt: pip install 'fedmq[embedded]' "
            "(or install Mosquitto and use --broker mosquitto)"
        ) from exc

    class ClosingBroker(Broker):  # type: ignore[misc]
        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            try:
                await super().stream_connected(reader, writer, listener_name)
            finally:
                # amqtt 0.12.1 leaks the socket of a client that vanished without DISCONNECT:
                # its close() stops at the first error (write_eof -> ENOTCONN) before closing.
                writer.close()

    return ClosingBroker


def _embedded_config(host: str, port: int, *, durable_sessions: bool) -> dict[str, Any]:
    """amqtt broker config: one TCP listener, open access, no $SYS plugin."""
    bind_host = f"[{host}]" if ":" in host else host
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{bind_host}:{port}"}},
        # An explicit plugin map replaces amqtt's defaults, which include BrokerSysPlugin: it
        # emits a DeprecationWarning (about psutil) that pytest's filterwarnings=error turns
        # into a failure, and $SYS topics are of no use here.
        "plugins": {
            # allow_anonymous=False still accepts any username with any password; what it
            # changes is that amqtt then keeps durable sessions (see EmbeddedBroker).
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                "allow_anonymous": not durable_sessions
            },
        },
    }


class EmbeddedBroker:
    """amqtt (MQTT 3.1.1 only) serving on its own asyncio loop in a daemon thread.

    State is in memory and cleared by ``stop()``. amqtt treats every client it accepts
    anonymously as having no durable session: it forgets a ``clean_session=False`` client's
    subscriptions when it disconnects and queues nothing for it. ``durable_sessions=True``
    turns anonymous access off instead: a client must send a username (any, with any
    password), and in exchange its durable session and offline QoS 1/2 queue are kept.
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", *, durable_sessions: bool = False
    ) -> None:
        self._host = host
        self._durable_sessions = durable_sessions
        self._port = port if port is not None else find_free_port(host)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        """Address the listener binds and clients connect to."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port."""
        return self._port

    @property
    def running(self) -> bool:
        """True while the broker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the broker thread and return once the port accepts connections."""
        if self.running:
            raise BrokerError(f"embedded broker already running on {self._host}:{self._port}")
        broker_class = _amqtt_broker_class()
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._run, args=(broker_class,), name=f"fedmq-amqtt-{self._port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.stop()
            raise BrokerError(
                f"embedded broker did not start within {START_TIMEOUT_S:.0f} s "
                f"on {self._host}:{self._port}"
            )
        if self._error is not None:
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
            raise BrokerError(
                f"embedded broker failed to start on {self._host}:{self._port}: {self._error}"
            ) from self._error

    def _run(self, broker_class: Any) -> None:
        # asyncio.run closes the loop, its async generators and executor: no leaked resources.
        try:
            asyncio.run(self._serve(broker_class))
        except BaseException as exc:  # reported to start() through _error, never lost
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self, broker_class: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        config = _embedded_config(self._host, self._port, durable_sessions=self._durable_sessions)
        broker = broker_class(config)
        await broker.start()
        try:
            self._ready.set()
            await self._stop_event.wait()
        finally:
            await broker.shutdown()

    def stop(self) -> None:
        """Shut the broker down (clients are disconnected) and join its thread."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between check and call
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(STOP_TIMEOUT_S + 5)
        if thread.is_alive():
            raise BrokerError(f"embedded broker on port {self._port} did not stop in time")
        self._thread = self._loop = self._stop_event = None
        error, self._error = self._error, None
        if error is not None:
            raise BrokerError(f"embedded broker on port {self._port} failed: {error}") from error

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
