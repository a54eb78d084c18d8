"""The newest model ``(run, version)`` and round ``(run, round)`` a device that verifies
signatures accepted, kept in its ``state_dir`` so that after a restart an older signed model or
announcement (a replay) is refused as ``old_model`` / ``old_round`` although the device holds
nothing yet (docs/security.md, "Signed models")."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import BinaryIO

from fedmq.durable import atomic_write

__all__ = ["load_accepted", "save_accepted"]

log = logging.getLogger(__name__)

Key = tuple[int, int]


def save_accepted(path: Path, model: Key, round_: Key) -> None:
    """Write the record atomically (raises ``OSError`` when it cannot)."""
    data = json.dumps({"model": list(model), "round": list(round_)}).encode()

    def write(f: BinaryIO) -> None:
        f.write(data)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def load_accepted(path: Path | None) -> tuple[Key, Key] | None:
    """The (model, round) keys ``save_accepted`` wrote; None when there is no usable record."""
    if path is None:
        return None
    try:
        raw = json.loads(path.read_bytes())
        model, round_ = raw["model"], raw["round"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        # Damaged: start without a floor (what a device did before the record existed); the
        # signature check itself still refuses anything the federation's key did not sign.
        log.warning("ignoring the accepted-model record %s: %s", path, exc)
        return None
    if not all(isinstance(k, list) and len(k) == 2
               and all(isinstance(n, int) and not isinstance(n, bool) for n in k)
               for k in (model, round_)):
        log.warning("ignoring the accepted-model record %s: wrong types", path)
        return None
    return (model[0], model[1]), (round_[0], round_[1])
