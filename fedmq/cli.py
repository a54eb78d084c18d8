"""The ``fedmq`` command: ``aggregator``, ``agent``, ``broker``, ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from fedmq import __version__
from fedmq.errors import FedmqError

#: ``--log-level`` choices (before or after the command: ``fedmq --log-level debug agent ...``
#: or ``fedmq agent ... --log-level debug``).
LOG_LEVELS = ("debug", "info", "warning", "error")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _add_log_level(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=default,
                   help="debug, info, warning or error (default: info for the services, "
                        "warning otherwise)")


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: it takes ``--log-level`` too, so the option may follow the
    command. Its default is SUPPRESS, so that it does not overwrite a level given before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_log_level(self, argparse.SUPPRESS)


def _stop_on_signals(done: threading.Event | None = None) -> threading.Event:
    """From now on SIGINT/SIGTERM set the returned event (``done`` if given) instead of
    interrupting: the caller stops cleanly when it sees it."""
    stop = done or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _wait_for_signal(done: threading.Event | None = None) -> None:
    """Block until SIGINT/SIGTERM (or ``done``), so services stop cleanly."""
    stop = _stop_on_signals(done)
    # The handlers run on this thread even while it waits (the wait is interruptible), and
    # ``done`` is set from another thread: no need to wake up every half second (an idle
    # agent's main thread did, twice its worker's idle cost).
    while not stop.wait(3600):
        pass


def cmd_aggregator(args: argparse.Namespace) -> int:
    """Run the aggregator service until stopped or ``rounds.max_rounds`` is reached."""
    from fedmq.config import load_aggregator

    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # until the service runs: see _wait_for_signal
    # The config first: a bad value is one line on stderr, before numba is even imported.
    config = load_aggregator(args.config)
    try:
        from aggregator.service import AggregatorService

        service_class: type[AggregatorService] = AggregatorService
        if config.cluster.role == "coordinator":  # scale-out roles (docs/scaling.md)
            from aggregator.cluster_coordinator import CoordinatorService

            service_class = CoordinatorService
        elif config.cluster.role == "worker":
            from aggregator.cluster_worker import WorkerService

            service_class = WorkerService
    except ImportError as exc:
        print(f"the aggregator needs numba ({exc.name} is missing): "
              "pip install 'fedmq[aggregator]'", file=sys.stderr)
        return 2
    service = service_class(config)
    try:  # a Ctrl-C or SIGTERM while it starts stops what it started too
        service.start()
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

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    config = load_agent(args.config, device_id=args.device_id)
    from device_agent.service import AgentService

    service = AgentService.from_config(config)
    stop = _stop_on_signals()  # start() does not block: a signal during it is a clean stop too
    try:
        service.start()
        _wait_for_signal(stop)
    finally:
        service.stop()
    return 0


#: What each shipped broker config is for (``fedmq broker --list-configs``).
BROKER_CONFIGS = {
    "dev": "loopback, anonymous, in memory: development and a trial on one machine",
    "docker": "every interface, anonymous, in memory: what docker/compose.yaml runs",
    "production": "a template to copy and edit: TLS, passwords, per-device ACL, persistent",
    "acl": "the ACL file production.conf points at (devices write only their own topics)",
}


def cmd_broker(args: argparse.Namespace) -> int:
    """Run Mosquitto with a shipped config (or one's own) on the given port until stopped."""
    from fedmq.broker import MosquittoBroker, broker_config_path

    if args.list_configs:
        for name, what in BROKER_CONFIGS.items():
            print(f"{name:<11} {broker_config_path(name)}\n            {what}")
        return 0
    if args.print_config:
        sys.stdout.write(broker_config_path(args.print_config).read_text(encoding="utf-8"))
        return 0
    if args.engine == "nats":
        return _broker_nats(args)
    # A SIGTERM while Mosquitto starts unwinds the `with` (Mosquitto runs in its own session,
    # so it would outlive us otherwise).
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    template = broker_config_path(args.config)
    with MosquittoBroker(template, port=args.port, host=args.host) as broker:
        stop = _stop_on_signals()  # before the line: a signal right after it is a clean stop
        print(f"mosquitto listening on {broker.host}:{broker.port} (config {template}, "
              f"log {broker.log_path}); Ctrl-C stops it", flush=True)
        _wait_for_signal(stop)
    return 0


def _broker_nats(args: argparse.Namespace) -> int:
    """``fedmq broker --engine nats``: a local NATS JetStream cluster serving MQTT 3.1.1 on
    ports ``--port``, ``--port``+1, ... (fedmq.nats_cluster; docs/scaling.md, "Engine")."""
    import tempfile
    from pathlib import Path

    from fedmq.nats_cluster import NatsCluster

    shards: dict[str, int] = {}
    for spec in args.shards:
        fed, sep, count = spec.partition("=")
        if not sep or not count.isdigit():
            raise SystemExit(f"fedmq broker: --shards expects FED=N, got {spec!r}")
        shards[fed] = int(count)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # as for Mosquitto: unwind the `with`s
    with contextlib.ExitStack() as stack:
        workdir = (Path(args.data_dir) if args.data_dir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmq-nats-"))))
        cluster = NatsCluster(args.nodes, workdir=workdir, shards=shards, host=args.host,
                              mqtt_port_base=args.port)
        stack.enter_context(cluster)
        stop = _stop_on_signals()
        for i, (host, port) in enumerate(cluster.mqtt_endpoints):
            print(f"{cluster.nodes[i].name} mqtt {host}:{port} nats {cluster.nats_urls[i]} "
                  f"monitor {cluster.monitor_urls[i]} (config {cluster.config_path(i)}, "
                  f"log {cluster.log_path(i)})", flush=True)
        sharded = ", ".join(f"{fed} in {n}" for fed, n in shards.items()) or "none"
        kept = "kept" if args.data_dir else "removed when it stops"
        print(f"nats cluster of {args.nodes} nodes, MQTT 3.1.1 only ([broker] mqtt5 = false); "
              f"sharded: {sharded}; data in {workdir} ({kept}); Ctrl-C stops it", flush=True)
        _wait_for_signal(stop)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``fedmq history list|export --dir DIR …`` (aggregator.history)."""
    from aggregator.history import run

    return run(args)


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


def cmd_provision(args: argparse.Namespace) -> int:
    """``fedmq provision``: identities, ACL and broker config for a federation (fedmq.provision)."""
    from fedmq import provision

    return provision.run(args)


def cmd_keys(args: argparse.Namespace) -> int:
    """``fedmq keys generate``: the key pair of signed models (fedmq.keys)."""
    from fedmq import keys

    return keys.run(args)


def cmd_report(args: argparse.Namespace) -> int:
    """``fedmq report``: the model history as a picture (aggregator.report)."""
    from aggregator import report

    return report.run(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    """``fedmq simulate``: N simulated devices in one process (fedmq.simulate)."""
    from fedmq import simulate

    return simulate.run(args)


def _add_nats_arguments(b: argparse.ArgumentParser) -> None:
    """``fedmq broker``'s options for ``--engine nats``."""
    b.add_argument("--engine", choices=("mosquitto", "nats"), default="mosquitto",
                   help="mosquitto (default): one broker; nats: a local NATS JetStream cluster "
                        "(pip install 'fedmq[cluster]'), MQTT on --port, --port+1, ...")
    b.add_argument("--nodes", type=int, default=3, help="--engine nats: nodes (default: 3)")
    b.add_argument("--shards", action="append", default=[], metavar="FED=N",
                   help="--engine nats: deliver federation FED's updates on "
                        "fedmq/v1/FED/shard/K/update/DEVICE, K < N (repeatable)")
    b.add_argument("--data-dir", default=None, metavar="DIR",
                   help="--engine nats: configs, logs and JetStream stores here, kept "
                        "(default: a temporary directory, removed at stop)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedmq``."""
    p = argparse.ArgumentParser(prog="fedmq", description="Federated learning over MQTT.")
    p.add_argument("--version", action="version", version=f"fedmq {__version__}")
    _add_log_level(p, None)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    a = sub.add_parser("aggregator", help="run the aggregator service")
    a.add_argument("--config", required=True, help="aggregator.toml")
    a.set_defaults(func=cmd_aggregator, log_default="info")

    g = sub.add_parser("agent", help="run a device agent")
    g.add_argument("--config", required=True, help="agent.toml")
    g.add_argument("--device-id", default=None, metavar="ID",
                   help="this device's id, unique per agent (default: $FEDMQ_DEVICE_ID, else "
                        "[device] id or id_from_env in agent.toml)")
    g.set_defaults(func=cmd_agent, log_default="info")

    b = sub.add_parser(
        "broker", help="run Mosquitto with a shipped config (dev, docker, production)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a Mosquitto broker (install it first: apt-get install mosquitto) "
                    "until Ctrl-C or SIGTERM.\nOnce it listens, one line says where, the "
                    "config it runs (rendered to a private temporary\ndirectory) and its log "
                    "file; both are removed when it stops.",
        epilog="configs shipped with fedmq (--list-configs shows their paths):\n"
               + "".join(f"  {name:<11} {what}\n" for name, what in BROKER_CONFIGS.items())
               + "The config's one `listener` line is replaced by --host and --port. For a "
                 "real fleet, copy\nproduction (--print-config production > production.conf), "
                 "edit it and run it with\n`mosquitto -c` (fedmq/broker_config/README.md).")
    b.add_argument("--config", default="dev", metavar="NAME|FILE",
                   help="a shipped config (dev, docker, production) or a Mosquitto config file "
                        "of your own with one listener line (default: dev)")
    b.add_argument("--port", type=int, default=1883,
                   help="TCP port to listen on (default: 1883, MQTT's)")
    b.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; "
                        "0.0.0.0 for every interface)")
    b.add_argument("--print-config", metavar="NAME", default=None,
                   help="print a shipped config (dev, docker, production, acl) and exit")
    b.add_argument("--list-configs", action="store_true",
                   help="list the shipped configs and where they are installed, and exit")
    _add_nats_arguments(b)
    b.set_defaults(func=cmd_broker, log_default="warning")

    from aggregator import history

    h = sub.add_parser("history", help="list or export the aggregator's saved models",
                       description=history.DESCRIPTION)
    history.add_commands(h)
    h.set_defaults(func=cmd_history, log_default="warning")

    d = sub.add_parser("demo", help="run a whole federation on the digits data set")
    from fedmq import demo_options

    demo_options.add_arguments(d)
    d.set_defaults(func=cmd_demo, log_default="warning")

    w = sub.add_parser("watch", help="a live terminal view of a federation (the watch extra)")
    from fedmq import watch

    watch.add_arguments(w)
    w.set_defaults(func=cmd_watch, log_default="warning")

    v = sub.add_parser("provision", help="per-device credentials (passwords or client "
                                         "certificates), the ACL and the broker config")
    from fedmq import provision

    provision.add_arguments(v)
    v.set_defaults(func=cmd_provision, log_default="warning")

    k = sub.add_parser("keys", help="the aggregator's signing key pair (signed models)")
    from fedmq import keys

    keys.add_arguments(k)
    k.set_defaults(func=cmd_keys, log_default="warning")

    r = sub.add_parser("report", help="accuracy, loss, participants and bytes per version "
                                      "from the model history, as a PNG (the plot extra)")
    from aggregator import report

    report.add_arguments(r)
    r.set_defaults(func=cmd_report, log_default="warning")

    s = sub.add_parser("simulate", help="a fleet of simulated devices in one process, for load "
                                        "tests and sizing")
    from fedmq import simulate

    simulate.add_arguments(s)
    s.set_defaults(func=cmd_simulate, log_default="warning")
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
