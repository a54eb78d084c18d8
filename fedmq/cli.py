"""The ``fedmq`` command: ``aggregator``, ``agent``, ``broker``, ``demo``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fedmq import __version__
from fedmq.errors import FedmqError


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _wait_for_signal(done: threading.Event | None = None) -> None:
    """Block until SIGINT/SIGTERM (or ``done``), so services stop cleanly."""
    stop = done or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def cmd_aggregator(args: argparse.Namespace) -> int:
    """Run the aggregator service until stopped or ``rounds.max_rounds`` is reached."""
    from fedmq.config import load_aggregator

    # The config first: a bad value is one line on stderr, before numba is even imported.
    config = load_aggregator(args.config)
    try:
        from aggregator.service import AggregatorService
    except ImportError as exc:
        print(f"the aggregator needs numba ({exc.name} is missing): "
              "pip install 'fedmq[aggregator]'", file=sys.stderr)
        return 2
    service = AggregatorService(config)
    service.start()
    try:
        _wait_for_signal(service.done)
    finally:
        service.stop()
    s = service.stats
    print(f"aggregator stopped: {s.rounds_completed} rounds, {s.accepted} updates accepted, "
          f"rejected {dict(s.rejected) or 'none'}")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    """Run one device agent until stopped."""
    from fedmq.config import load_agent

    config = load_agent(args.config)
    from device_agent.service import AgentService

    service = AgentService.from_config(config)
    service.start()
    try:
        _wait_for_signal()
    finally:
        service.stop()
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    """Run Mosquitto with a config from broker_config/ on the given port until stopped."""
    from fedmq.broker import MosquittoBroker, default_config_dir

    template = Path(args.config) if args.config else default_config_dir() / "dev.conf"
    with MosquittoBroker(template, port=args.port, host=args.host) as broker:
        print(f"mosquitto listening on {broker.host}:{broker.port} (config {template}, "
              f"log {broker.log_path}); Ctrl-C stops it", flush=True)
        _wait_for_signal()
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``fedmq history list|export --dir DIR …`` (aggregator.history)."""
    from aggregator.history import main as history_main

    code: int = history_main(args.args)
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``with`` and ``finally`` cleans up."""


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def cmd_demo(args: argparse.Namespace) -> int:
    from fedmq import demo

    # The demo owns a broker process and a temporary directory: a SIGTERM must unwind the
    # ExitStack that closes them, as Ctrl-C does, instead of ending the process where it is.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    return demo.run(args)


def cmd_watch(args: argparse.Namespace) -> int:
    """``fedmq watch``: a live terminal view of a federation (fedmq.watch)."""
    from fedmq import watch

    return watch.run(args)


def cmd_report(args: argparse.Namespace) -> int:
    """``fedmq report``: the model history as a picture (aggregator.report)."""
    from aggregator import report

    return report.run(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedmq``."""
    p = argparse.ArgumentParser(prog="fedmq", description="Federated learning over MQTT.")
    p.add_argument("--version", action="version", version=f"fedmq {__version__}")
    p.add_argument("--log-level", default=None,
                   help="debug, info, warning (default: info for services, warning otherwise)")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("aggregator", help="run the aggregator service")
    a.add_argument("--config", required=True, help="aggregator.toml")
    a.set_defaults(func=cmd_aggregator, log_default="info")

    g = sub.add_parser("agent", help="run a device agent")
    g.add_argument("--config", required=True, help="agent.toml")
    g.set_defaults(func=cmd_agent, log_default="info")

    b = sub.add_parser("broker", help="run Mosquitto with a config from broker_config/")
    b.add_argument("--config", default=None,
                   help="config template (default broker_config/dev.conf)")
    b.add_argument("--port", type=int, default=1883)
    b.add_argument("--host", default="127.0.0.1")
    b.set_defaults(func=cmd_broker, log_default="warning")

    h = sub.add_parser("history", help="list or export the aggregator's saved models",
                       add_help=False)
    h.add_argument("args", nargs=argparse.REMAINDER)
    h.set_defaults(func=cmd_history, log_default="warning")

    d = sub.add_parser("demo", help="run a whole federation on the digits data set")
    from fedmq import demo

    demo.add_arguments(d)
    d.set_defaults(func=cmd_demo, log_default="warning")

    w = sub.add_parser("watch", help="a live terminal view of a federation (the watch extra)")
    from fedmq import watch

    watch.add_arguments(w)
    w.set_defaults(func=cmd_watch, log_default="warning")

    r = sub.add_parser("report", help="accuracy, loss, participants and bytes per version "
                                      "from the model history, as a PNG (the plot extra)")
    from aggregator import report

    report.add_arguments(r)
    r.set_defaults(func=cmd_report, log_default="warning")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedmq`` command.

    A ``FedmqError`` (a bad config file: ``ConfigError``, naming the file and the key) is one
    line on stderr and exit code 2, never a traceback; a connection failure exits with 1.
    """
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level or args.log_default)
    try:
        code: int = args.func(args)
    except FedmqError as exc:
        print(f"fedmq {args.command}: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"fedmq {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # Ctrl-C (or SIGTERM in the demo) once everything has been closed: one line, no traceback.
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"fedmq {args.command}: {what}; everything it started is stopped", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return code


if __name__ == "__main__":
    sys.exit(main())
