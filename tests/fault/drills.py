"""``scripts/faults NAME``: fault drills with a JSON report (``--json PATH``).

kill9_aggregator: SIGKILL the aggregator ``--kills`` times at random moments of a multi-round
run, restarting it each time; report updates sent, folded, lost, double counted, and the largest
difference between the final model and the fault-free reference.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fedmq.broker import MosquittoBroker, default_config_dir

from faultkit import Drill, broker_config


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/faults", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=["kill9_aggregator"])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--devices", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, \
            MosquittoBroker(default_config_dir() / "dev.conf") as broker:
        drill = Drill(broker_config(broker), Path(tmp), devices=args.devices,
                      rounds=args.rounds)
        result = drill.run(kills=args.kills, rng=random.Random(args.seed), timeout=900)
    result = {"drill": args.name, **result}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = (result["lost"] == 0 and result["double_counted"] == 0
          and result["max_abs_diff_vs_reference"] <= 1e-9)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
