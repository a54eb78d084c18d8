"""``fedmq watch``: a live terminal view of a federation for anyone who can read its topics.

Subscribes, with a clean session and a random client id, to exactly the topics an app may read
(``broker_config/acl.template``): ``round``, ``model`` (the manifest or whole model, never its
parts), ``metrics``, ``metrics/eval``, ``metrics/progress`` and ``status/+``; never the devices'
updates. Messages go into a ``fedmq.watch_state.FleetView``; ``fedmq.watch_render`` draws it
about twice a second with rich. rich is the optional ``watch`` extra, imported only in ``run``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import queue
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fedmq.config import BrokerConfig
from fedmq.topics import Topics
from fedmq.watch_state import FleetView

if TYPE_CHECKING:
    from fedmq.transport import PahoTransport
    from fedmq.watch_render import Link

__all__ = ["add_arguments", "parse_broker", "run", "watched_topics"]

EXTRA_MISSING = "fedmq watch needs the watch extra: pip install 'fedmq[watch]'"

#: Screen refreshes per second.
REFRESH_HZ = 2.0
#: ``--once`` without ``--exit-after``: the longest wait for the broker and the retained state.
ONCE_TIMEOUT_S = 5.0


def watched_topics(topics: Topics) -> list[str]:
    """The topics the watch subscribes to: what the ACL lets apps read, minus model parts."""
    return [topics.round, topics.model, topics.metrics, topics.model_eval, topics.progress,
            topics.statuses]


def parse_broker(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (port 1883) or ``[IPv6]:PORT``; ValueError when malformed."""
    host, port = value, "1883"
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not value[end + 1:].startswith(":")):
            raise ValueError(f"--broker {value!r}: expected [IPv6]:PORT")
        host, port = value[1:end], value[end + 2:] or "1883"
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif ":" in value:
        raise ValueError(f"--broker {value!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--broker {value!r}: expected HOST:PORT with a port in 1..65535")
    return host, int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fedmq watch``."""
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (default %(default)s)")
    p.add_argument("--federation", required=True, help="the federation's name")
    p.add_argument("--username", default=os.environ.get("FEDMQ_USERNAME"),
                   help="MQTT user name (default: $FEDMQ_USERNAME)")
    p.add_argument("--password", default=os.environ.get("FEDMQ_PASSWORD"),
                   help="MQTT password (default: $FEDMQ_PASSWORD; prefer the variable: a "
                        "command line is visible to other users)")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca-file", default=None, help="CA certificate for --tls (default: the "
                                                   "system's)")
    p.add_argument("--cert-file", default=None,
                   help="client certificate for --tls (fedmq provision --mode cert)")
    p.add_argument("--key-file", default=None, help="the client certificate's private key")
    p.add_argument("--mqtt3", action="store_true",
                   help="speak MQTT 3.1.1 (brokers without MQTT 5)")
    p.add_argument("--once", action="store_true",
                   help="print one snapshot once the retained state arrived, then exit "
                        "(also when the output is not a terminal)")
    p.add_argument("--exit-after", type=float, default=None, metavar="SECONDS",
                   help="exit after this long (with --once: collect this long first)")


def _broker(args: argparse.Namespace) -> BrokerConfig:
    host, port = parse_broker(args.broker)
    # Quick reconnects: a person is looking at the screen.
    return BrokerConfig(host=host, port=port, mqtt5=not args.mqtt3, username=args.username,
                        password=args.password, tls=args.tls or args.ca_file is not None,
                        ca_file=args.ca_file, cert_file=args.cert_file,
                        key_file=args.key_file, reconnect_min_s=0.5, reconnect_max_s=5.0)


class _LastLog(logging.Handler):
    """Keeps the last warning logged (the transport's "waiting for the broker at ...")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.line: str | None = None
        self.time: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.line, self.time = record.getMessage(), record.created


@contextmanager
def _logs_to(handler: logging.Handler, *, exclusive: bool) -> Iterator[None]:
    """Send log records to ``handler``; ``exclusive``: only there (a full-screen view must not
    be scrolled by lines on stderr)."""
    root = logging.getLogger()
    saved = list(root.handlers) if exclusive else []
    for h in saved:
        root.removeHandler(h)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for h in saved:
            root.addHandler(h)


def _drain(transport: PahoTransport, view: FleetView, until: float) -> None:
    """Apply what arrives until the monotonic time ``until``."""
    while True:
        left = until - time.monotonic()
        try:
            msg = transport.inbox.get(timeout=left) if left > 0 else \
                transport.inbox.get_nowait()
        except queue.Empty:
            return
        view.handle(msg.topic, msg.payload, time.time(), retained=msg.retain)


def run(args: argparse.Namespace) -> int:
    """``fedmq watch``: exit 0 (Ctrl-C included), 1 if ``--once`` never reached the broker,
    2 for bad arguments or a missing extra."""
    if importlib.util.find_spec("rich") is None:
        print(EXTRA_MISSING, file=sys.stderr)
        return 2
    from fedmq import watch_render
    from fedmq.transport import PahoTransport

    try:
        broker = _broker(args)
        view = FleetView(args.federation, now=time.time())
    except ValueError as exc:
        print(f"fedmq watch: {exc}", file=sys.stderr)
        return 2
    transport = PahoTransport(broker, client_id=f"fedmq-watch-{secrets.token_hex(6)}")
    for topic in watched_topics(view.topics):
        transport.subscribe(topic)
    last_log = _LastLog()
    started = time.time()

    def link() -> Link:
        return watch_render.Link(address=transport.address, connected=transport.connected,
                                 error=transport.last_error, log_line=last_log.line,
                                 log_time=last_log.time, started=started)

    once = args.once or not sys.stdout.isatty()
    try:
        with _logs_to(last_log, exclusive=not once):
            transport.start()
            if once:
                return _once(args, transport, view, link)
            _live(args, transport, view, link)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves the view: no traceback, no message
    finally:
        transport.stop()
    return 0


def _once(args: argparse.Namespace, transport: PahoTransport, view: FleetView,
          link: Callable[[], Link]) -> int:
    """Collect the retained state (or ``--exit-after`` seconds), print one snapshot."""
    from fedmq import watch_render

    end = time.monotonic() + (args.exit_after if args.exit_after is not None
                              else ONCE_TIMEOUT_S)
    connected_at: float | None = None
    while time.monotonic() < end:
        _drain(transport, view, min(time.monotonic() + 0.1, end))
        if connected_at is None and transport.connected:
            connected_at = time.monotonic()
        # Retained messages follow the SUBACK at once: a short quiet spell means all are in.
        settled = (connected_at is not None and time.monotonic() - connected_at > 1.0
                   and transport.inbox.empty())
        if args.exit_after is None and settled:
            break
    watch_render.print_screen(view, link(), time.time())
    return 0 if connected_at is not None else 1


def _live(args: argparse.Namespace, transport: PahoTransport, view: FleetView,
          link: Callable[[], Link]) -> None:
    """Redraw the full-screen view about ``REFRESH_HZ`` times a second until Ctrl-C."""
    from fedmq import watch_render

    end = None if args.exit_after is None else time.monotonic() + args.exit_after
    with watch_render.full_screen() as show:
        show(view, link(), time.time())
        while end is None or time.monotonic() < end:
            _drain(transport, view, time.monotonic() + 1 / REFRESH_HZ)
            show(view, link(), time.time())
