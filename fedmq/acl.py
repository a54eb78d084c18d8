"""The Mosquitto ACL of one federation, one block per identity (``fedmq provision`` writes it).

Every right is granted to a named user on a topic of the named federation: no ``pattern``
lines (they apply to every user, the operator and other federations' devices included) and no
``+`` at the federation level. Four roles:

- the aggregator: reads updates, evaluations, statuses and the presence topic; writes the
  round, the model (and its parts), the metrics topics, the result and its presence; with
  scale-out, its coordinator and workers share this identity and the topics between them;
- an operator (``fedmq watch``, dashboards): reads everything the aggregator publishes and the
  statuses, writes nothing. Only operators read ``metrics`` (each round's summary lists every
  accepted device and update id), ``result`` (a statistics result names its devices) and
  ``status/+`` (the fleet's roster);
- an app: reads the round, the model and the two metrics topics that carry counts only
  (``metrics/eval``, ``metrics/progress``), writes nothing;
- a device: reads the round and the model, writes only its own ``update``, ``status`` and
  ``eval`` topics (and its own secure aggregation topics). It reads no other device's topics
  and nothing of other federations.

Pure text: no files, no broker.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from fedmq.topics import Topics, check_name

__all__ = ["AGGREGATOR_READS", "AGGREGATOR_WRITES", "APP_READS", "DEVICE_READS",
           "OPERATOR_READS", "device_reads", "device_writes", "render_acl"]

#: Scale-out (docs/scaling.md): a coordinator and its workers run with the aggregator's
#: identity, so it reads and writes what passes between them (protocol.md 7d) and a worker
#: reads its shard of the updates; the model and round topics stay its alone to write.
SCALE_OUT = ("shard/+/update/+", "wprogress/+", "wresend/+", "partial/+", "collect",
             "estimate")
#: Topic suffixes under ``fedmq/v1/{federation}/``. ``secagg/...``: secure aggregation's
#: exchange (fedmq/secagg/messages.py): devices send keys, shares, masked updates and reveals on
#: their own topics; the aggregator publishes the roster, the unmask request and each device's
#: delivery of sealed shares, which only that device reads.
AGGREGATOR_READS = ("update/+", "eval/+", "status/+", "aggregator", "secagg/keys/+",
                    "secagg/shares/+", "secagg/masked/+", "secagg/reveal/+",
                    *SCALE_OUT)
AGGREGATOR_WRITES = ("round", "model", "model/part/+", "metrics", "metrics/eval",
                     "metrics/progress", "result", "aggregator", "secagg/roster",
                     "secagg/deliver/+", "secagg/unmask", *SCALE_OUT)
OPERATOR_READS = ("round", "model", "model/part/+", "metrics", "metrics/eval",
                  "metrics/progress", "result", "status/+", "aggregator")
APP_READS = ("round", "model", "model/part/+", "metrics/eval", "metrics/progress")
DEVICE_READS = ("round", "model", "model/part/+", "secagg/roster", "secagg/unmask")


def device_reads(device_id: str) -> tuple[str, ...]:
    """What a device may read: the federation's broadcasts and its own share delivery."""
    check_name(device_id, "device id")
    return (*DEVICE_READS, f"secagg/deliver/{device_id}")


def device_writes(device_id: str) -> tuple[str, ...]:
    """What a device may publish: its own topics only."""
    check_name(device_id, "device id")
    return (f"update/{device_id}", f"status/{device_id}", f"eval/{device_id}",
            *(f"secagg/{kind}/{device_id}" for kind in ("keys", "shares", "masked", "reveal")))


def _block(base: str, user: str, comment: str, reads: Iterable[str],
           writes: Iterable[str]) -> list[str]:
    check_name(user, "username")
    lines = [f"# {comment}", f"user {user}"]
    lines += [f"topic read {base}/{suffix}" for suffix in reads]
    lines += [f"topic write {base}/{suffix}" for suffix in writes]
    return [*lines, ""]


def render_acl(federation: str, *, aggregator: str, devices: Sequence[str],
               operators: Sequence[str] = (), apps: Sequence[str] = ()) -> str:
    """The ACL text for one federation. Usernames must be distinct across roles."""
    counts = Counter([aggregator, *operators, *apps, *devices])
    twice = sorted(name for name, n in counts.items() if n > 1)
    if twice:
        raise ValueError(f"username(s) {', '.join(twice)} given for more than one identity")
    base = Topics(federation).base
    out = [f"# fedmq ACL for federation {federation!r}, written by `fedmq provision`.",
           "# Mosquitto 2.0 does not check SUBSCRIBE against it: a client subscribing where it",
           "# may not read gets a SUBACK and then receives nothing. A refused PUBLISH is dropped",
           "# (MQTT 5 clients get reason code 0x87 in the PUBACK). Reload: kill -HUP <pid>.",
           ""]
    out += _block(base, aggregator, "the aggregator", AGGREGATOR_READS, AGGREGATOR_WRITES)
    for name in operators:
        out += _block(base, name, "an operator: read-only, round summaries with device ids",
                      OPERATOR_READS, ())
    for name in apps:
        out += _block(base, name, "an app: read-only, models and counts, no device ids",
                      APP_READS, ())
    for name in devices:
        out += _block(base, name, "a device", device_reads(name), device_writes(name))
    return "\n".join(out)
