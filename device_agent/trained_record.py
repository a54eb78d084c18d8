"""The record of the last round a device sent an update for, kept across restarts so that a
restarted agent does not train (and send) the same round again."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import BinaryIO

from fedmq.durable import atomic_write

__all__ = ["load_trained", "save_trained"]

log = logging.getLogger(__name__)


def save_trained(path: Path, round_: int, base_version: int, model_sha256: str,
                 deadline: float) -> None:
    """Write the record atomically (raises ``OSError`` when it cannot)."""
    data = json.dumps({"round": round_, "base_version": base_version,
                       "model_sha256": model_sha256, "deadline": deadline}).encode()

    def write(f: BinaryIO) -> None:
        f.write(data)

    atomic_write(path, write)


def load_trained(path: Path | None) -> tuple[int, int, str, float] | None:
    """The (round, base version, model digest, deadline) recorded by ``save_trained``."""
    if path is None:
        return None
    try:
        raw = json.loads(path.read_bytes())
        record = (raw["round"], raw["base_version"], raw["model_sha256"], raw["deadline"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:  # damaged: train as if new
        log.warning("ignoring the trained-round record %s: %s", path, exc)
        return None
    if not (isinstance(record[0], int) and isinstance(record[1], int)
            and isinstance(record[2], str) and isinstance(record[3], int | float)):
        log.warning("ignoring the trained-round record %s: wrong types", path)
        return None
    return record[0], record[1], record[2], float(record[3])
