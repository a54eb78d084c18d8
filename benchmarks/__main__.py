"""``python -m benchmarks NAME [--quick] [--json PATH]`` (what ``scripts/bench`` runs)."""

from __future__ import annotations

import importlib
import sys

NAMES = ("kernels", "peer", "e2e", "wire", "learning", "secagg", "scale")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in (*NAMES, "all"):
        print(f"usage: scripts/bench {{{'|'.join(NAMES)}|all}} [--quick] [--json PATH]"
              " (learning also: [--plot PATH])", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        for n in NAMES:
            print(f"== {n}", flush=True)
            code: int = importlib.import_module(f"benchmarks.bench_{n}").main(
                [a.replace("{name}", n) for a in rest])
            if code:
                return code
        return 0
    code = importlib.import_module(f"benchmarks.bench_{name}").main(rest)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
