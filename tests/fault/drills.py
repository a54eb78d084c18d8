"""``scripts/faults NAME``: fault drills against real processes, JSON report with ``--json``.

kill9_aggregator
    SIGKILL the aggregator ``--kills`` times (default 20) at random moments of a ``--rounds``
    (10) round run of ``--devices`` (5) driven devices, restarting it each time, with the
    ``--strategy`` (fedavg; or fedavgm, fedadam, fedyogi, fedadagrad with their default
    settings: the optimizer's moments must survive every kill too). Passes with ``lost`` = 0,
    ``double_counted`` = 0 and ``max_abs_diff_vs_reference`` <= 1e-9 (the reference is the
    fault-free run computed in numpy: 0.0 means bit-identical).

    With ``--noise-multiplier Z`` (``dp_drill.py``): differential privacy on, clip 1.0; the
    reference re-derives each round's noise from the secret in the state directory, and every
    round's summary must carry dp-accounting's epsilon for that many rounds
    (``epsilon_mismatches`` = 0): a restarted aggregator continues the same epsilon.

    With ``--secure-aggregation`` (``secagg_drill.py``): ``[privacy] secure_aggregation = true``;
    the driver plays every device's side of the protocol (keys, sealed shares, masked fixed-point
    updates, reveals), the reference is the fixed-point sum written out from docs/security.md,
    and a restarted aggregator must finish each secure round from its log.

    With ``--mode async`` (``async_drill.py``): buffered asynchronous rounds (FedBuff), each
    buffer ``--devices`` fresh updates and one 0-2 versions stale; the fault-free run first,
    then the killed one, which passes only with the fault-free run's bits too
    (``bit_identical_to_fault_free``).

restart_broker
    SIGKILL Mosquitto ``--kills`` times (default 10) mid-round and restart it on the same port,
    across ``--rounds`` (10) rounds of ``--devices`` (5) device-agent processes with on-disk
    outboxes. Mosquitto persists (``persistence true``, ``autosave_interval 1``,
    ``autosave_on_changes true``: saved after every change it counts). Every round needs every
    device. Passes with ``lost`` = 0, ``double_counted`` = 0, every round closed under the rules
    and the model equal to the reference.

drop_devices
    Device-agent processes vanish mid-round (SIGKILL, SIGTERM, or SIGSTOP past the keepalive)
    and come back later, ``--drops`` times (default 24) across ``--rounds`` (20) rounds of
    ``--devices`` (6) with ``min_updates`` 3: rounds close at quorum + grace or when all are in;
    late updates join the open round or are rejected as stale. Same pass criteria.

soak
    ``--devices`` (50) driven devices, ``--rounds`` (100) fault-free rounds of the default
    64-128-10 model (fp32 updates) through an aggregator process with durability on; its RSS
    (psutil) when round 5 closes and when the last one does. Passes with ``rss_growth_ratio``
    <= 1.10 and ``lost`` = ``double_counted`` = 0.

burst
    For each shipped broker config (dev, docker, production with TLS, passwords and the ACL), an
    authenticated hostile device publishes 10,000 unpaced QoS 1 messages of an update's size on
    its update topic while ``--devices`` (4) real agents train (digits, the MLP) for a real
    durable aggregator, until ``--rounds`` (4) rounds are closed (burst.py). Passes when every
    config has ``valid_lost`` = 0 (acknowledged updates the aggregator never saw) and
    ``max_delivery_gap_s`` <= 5 (the aggregator hearing nothing while acknowledged messages
    were undelivered).

broker_ack_window
    Not a pass/fail drill: measures whether a kill -9 of the persisting Mosquitto loses a message
    it has already acknowledged (faultkit.AckWindowProbe), ``--trials`` (20) times per case: the
    SIGKILL lands 0, 0.5, 1, 2 or 5 ms after the publisher got its PUBACK, with the durable
    subscriber offline (message queued) or online. Exit status 0.

poison
    The demo setting (``--devices`` (20) devices, IID digits, the MLP, ``--rounds`` (20) rounds,
    in this process over its own Mosquitto) with rounds closing at a quorum of half the devices
    plus 2 s grace (deadline 30 s), run four times (poison.py): clean; ``huge`` (devices 0 and 1
    replaced by attackers sending +3e38 everywhere at the maximum weight); ``noise`` (the same,
    Gaussian sigma 10); ``bitflip`` (all honest, 5% of update messages get one bit flipped).
    Passes when every run closes all its rounds with ``worker_errors`` = 0 and
    ``max_accuracy_drop`` (clean minus scenario final held-out accuracy) <= 0.03.

cluster_node, cluster_worker, cluster_coordinator
    Scale-out (cluster_drill.py): a coordinator and two workers (2 shards) as processes with
    durable state on a 3-node NATS JetStream cluster, ``--devices`` (8) driven MQTT 3.1.1 devices
    spread over the nodes (each moves to another node when its own dies), ``--rounds`` (8)
    rounds needing every device; ``--kills`` (6) times mid-round: SIGKILL the node leading
    ``$MQTT_msgs`` (cluster_node), a worker (alternately, cluster_worker) or the coordinator
    (cluster_coordinator), restarted at once. The fault-free run comes first on the same
    cluster. Passes with ``lost`` = 0 (PUBACKed updates not in their round's merged partials),
    ``double_counted`` = 0, every round closed, ``max_abs_diff_vs_reference`` = 0 (the reference
    summed from the devices' own bits in the coordinator's order) and
    ``bit_identical_to_fault_free``. ``--ack-wait`` sets the engine's MQTT ``ack_wait`` (the
    shipped template keeps nats-server's 30 s: a message delivered to a killed client's session
    comes again after that long, so a kill can hold a round up to 30 s; the suite uses 3 s).
    Updates are on a 2**-10 grid, so every sum is exact in any order; ``--gaussian-updates``
    sends Gaussian ones, whose sums depend on the order each worker folded them in (arrival
    order, which a kill changes): then ``bit_identical_to_fault_free`` measures that.

``lost`` means an update the broker acknowledged (or, for the driven drills, one the driver
published) that was never folded; for the agent drills an update rejected because it reached the
aggregator after its round had closed (``stale``), or as a device's second update in a round
that counted its first (``duplicate``), is reported apart and is not lost (faultkit.AgentDrill).
Exit status 0 when the drill passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster_drill import KINDS as CLUSTER_DRILLS
from cluster_drill import cluster_passed, run_cluster_drill

from fedmq.broker import MosquittoBroker, default_config_dir
from fedmq.config import STRATEGY_DEFAULTS

from async_drill import kill9_async
from dp_drill import DpDrill
from faultkit import (
    AckWindowProbe,
    Drill,
    DropDevicesDrill,
    PersistentMosquitto,
    RestartBrokerDrill,
    broker_config,
)
from secagg_drill import SecAggDrill

DEFAULTS: dict[str, dict[str, int]] = {
    "kill9_aggregator": {"kills": 20, "rounds": 10, "devices": 5},
    "restart_broker": {"kills": 10, "rounds": 10, "devices": 5},
    "drop_devices": {"drops": 24, "rounds": 20, "devices": 6},
    "soak": {"rounds": 100, "devices": 50},
    "burst": {"rounds": 4, "devices": 4},
    "broker_ack_window": {"trials": 20},
    "poison": {"rounds": 20, "devices": 20},
    **{name: {"kills": 6, "rounds": 8, "devices": 8} for name in CLUSTER_DRILLS},
}
ACK_WINDOW_DELAYS_MS = (0.0, 0.5, 1.0, 2.0, 5.0)
SOAK_LAYERS = [64, 128, 10]
MAX_RSS_GROWTH = 1.10


def passed(result: dict[str, Any]) -> bool:
    """Whether a drill's result meets its acceptance criteria."""
    if result["drill"] == "broker_ack_window":
        return True  # a measurement
    if result["drill"] == "burst":
        from burst import passed as burst_passed  # valid_lost 0, max_delivery_gap_s <= 5

        return burst_passed(result)
    if result["drill"] in CLUSTER_DRILLS:
        return cluster_passed(result)
    if result["drill"] == "poison":
        from poison import poison_passed  # every run closes all rounds, 0 worker errors, drop

        return poison_passed(result)
    diff = result["max_abs_diff_vs_reference"]
    ok = (result["lost"] == 0 and result["double_counted"] == 0
          and diff is not None and diff <= 1e-9)
    if result["drill"] == "soak":
        return ok and result["rss_growth_ratio"] <= MAX_RSS_GROWTH
    if result["drill"] in ("restart_broker", "drop_devices"):
        return (ok and not result["round_rule_violations"] and not result["stalled"]
                and result["rounds"] == result["rounds_expected"])
    if result.get("noise_multiplier"):
        ok = ok and result["epsilon_mismatches"] == 0
    if result.get("mode") == "async":
        ok = ok and result["bit_identical_to_fault_free"] is True
    return ok and result["rounds"] == result["rounds_expected"]


def run(name: str, opts: dict[str, int], seed: int, tmp: Path,
        keep: bool = False, *, strategy: str = "fedavg",
        noise_multiplier: float = 0.0, secure: bool = False,
        ack_wait: str | None = None, gaussian: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    if name == "broker_ack_window":
        return AckWindowProbe(tmp / "broker").run(opts["trials"], ACK_WINDOW_DELAYS_MS)
    if name == "poison":
        from poison import run_poison  # its own Mosquitto per run

        return run_poison(seed=seed, rounds=opts["rounds"], devices=opts["devices"])
    if name in CLUSTER_DRILLS:  # its own NATS cluster
        return run_cluster_drill(name, tmp, kills=opts["kills"], rounds=opts["rounds"],
                                 devices=opts["devices"], seed=seed, ack_wait=ack_wait,
                                 gaussian=gaussian)
    if name == "burst":
        from burst import run_burst  # a Mosquitto per shipped config

        return run_burst(tmp, devices=opts["devices"], rounds=opts["rounds"], seed=seed)
    if name == "kill9_aggregator":
        with MosquittoBroker(default_config_dir() / "dev.conf") as broker:
            drill = (DpDrill(broker_config(broker), tmp, devices=opts["devices"],
                             rounds=opts["rounds"], strategy=strategy,
                             noise_multiplier=noise_multiplier) if noise_multiplier
                     else SecAggDrill(broker_config(broker), tmp, devices=opts["devices"],
                                      rounds=opts["rounds"], strategy=strategy) if secure
                     else Drill(broker_config(broker), tmp, devices=opts["devices"],
                                rounds=opts["rounds"], strategy=strategy))
            result: dict[str, Any] = dict(drill.run(kills=opts["kills"], rng=rng, timeout=900))
            result["rounds_expected"] = opts["rounds"]
            result["strategy"] = strategy
            result["secure_aggregation"] = secure
            return result
    if name == "soak":
        with MosquittoBroker(default_config_dir() / "dev.conf") as broker:
            drill = Drill(broker_config(broker), tmp, devices=opts["devices"],
                          rounds=opts["rounds"], layers=SOAK_LAYERS, max_rounds=0, burst=True)
            return drill.soak(sample_round=5, timeout=3600)
    if name == "restart_broker":
        with PersistentMosquitto(tmp / "broker", keep_dir=keep) as pbroker:
            restart = RestartBrokerDrill(broker_config(pbroker), tmp / "drill",
                                         devices=opts["devices"], rounds=opts["rounds"],
                                         seed=seed)
            return restart.run(pbroker, kills=opts["kills"], rng=rng, timeout=1800)
    with MosquittoBroker(default_config_dir() / "dev.conf") as broker:
        drop = DropDevicesDrill(broker_config(broker), tmp / "drill", devices=opts["devices"],
                                rounds=opts["rounds"], weights=[1] * opts["devices"],
                                min_updates=3, grace_s=1.0, seed=seed)
        return drop.run(drops=opts["drops"], rng=rng, timeout=1800)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/faults", description=__doc__,
                                epilog="defaults: " + json.dumps(DEFAULTS),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(DEFAULTS))
    p.add_argument("--kills", type=int, default=None,
                   help="kill9_aggregator, restart_broker, cluster_*: how many SIGKILLs")
    p.add_argument("--drops", type=int, default=None,
                   help="drop_devices: how many times a device vanishes")
    p.add_argument("--trials", type=int, default=None,
                   help="broker_ack_window: messages per case")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", choices=list(STRATEGY_DEFAULTS), default=None,
                   help="kill9_aggregator: the aggregator's [strategy] name (default fedavg)")
    p.add_argument("--noise-multiplier", type=float, default=0.0,
                   help="kill9_aggregator: differential privacy with this noise multiplier "
                        "(default 0: off)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="kill9_aggregator: [privacy] secure_aggregation on, devices masking")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="kill9_aggregator: sync rounds, or async buffers with stale updates")
    p.add_argument("--ack-wait", default=None,
                   help="cluster_*: the engine's MQTT ack_wait (e.g. 5s; default: the shipped "
                        "template's, nats-server's 30s)")
    p.add_argument("--gaussian-updates", action="store_true",
                   help="cluster_*: Gaussian updates instead of the exact 2**-10 grid (sums "
                        "then depend on the workers' fold order)")
    p.add_argument("--keep", type=Path, default=None,
                   help="run in this directory and keep it (logs, journals, state)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    opts = dict(DEFAULTS[args.name])
    for key in ("kills", "drops", "trials", "rounds", "devices"):
        value = getattr(args, key)
        if value is not None:
            if key not in opts:
                p.error(f"--{key} does not apply to {args.name}")
            opts[key] = value
    if args.strategy is not None and args.name != "kill9_aggregator":
        p.error(f"--strategy does not apply to {args.name}")
    strategy = args.strategy or "fedavg"
    if args.noise_multiplier and (args.name != "kill9_aggregator" or args.mode == "async"
                                  or not 0 < args.noise_multiplier <= 1e6):
        p.error("--noise-multiplier applies to kill9_aggregator in sync mode, in (0, 1e6]")
    if args.secure_aggregation and (args.name != "kill9_aggregator" or args.mode == "async"
                                    or args.noise_multiplier):
        p.error("--secure-aggregation applies to kill9_aggregator in sync mode, without noise")
    if (args.ack_wait is not None or args.gaussian_updates) and args.name not in CLUSTER_DRILLS:
        p.error(f"--ack-wait and --gaussian-updates do not apply to {args.name}")
    if args.mode == "async" and args.name != "kill9_aggregator":
        p.error(f"--mode does not apply to {args.name}")
    if args.mode == "async":  # async_drill.py: the fault-free run, then the killed one
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            result = kill9_async(opts, random.Random(args.seed), args.keep or Path(tmp))
    elif args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.name, opts, args.seed, args.keep, keep=True, strategy=strategy,
                     noise_multiplier=args.noise_multiplier, secure=args.secure_aggregation,
                     ack_wait=args.ack_wait, gaussian=args.gaussian_updates)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args.name, opts, args.seed, Path(tmp), strategy=strategy,
                         noise_multiplier=args.noise_multiplier,
                         secure=args.secure_aggregation, ack_wait=args.ack_wait,
                         gaussian=args.gaussian_updates)
    result = {"drill": args.name, **result}
    result["passed"] = passed(result)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
