"""Admission of one update message: decode, check against the model and the limits, measure.

No state of its own: ``admit`` turns a payload into an ``Admitted`` update (with the weight it
counts with and its squared L2 norm) or a rejection reason from docs/protocol.md. Everything a
device sends ends here as one or the other; nothing raises.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

from aggregator import kernels
from aggregator.spec import ModelSpec
from fedmq import codec
from fedmq.config import LimitsConfig
from fedmq.errors import DecodeError
from fedmq.wire import ModelUpdate, Tensor

__all__ = ["Admitted", "TaskCheck", "admit", "sq_norm"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admitted:
    """An update (or one chunk of it) that may be offered to the round."""

    update: ModelUpdate
    #: What it counts with: ``num_examples``, at most ``limits.max_examples``.
    weight: float
    #: Squared L2 norm of the decoded values (of this chunk only, for a chunked update).
    sq_norm: float


class TaskCheck(Protocol):
    """A task's own checks of an update in place of the model's (``aggregator.statistics``)."""

    def check(self, update: ModelUpdate) -> tuple[str, str]:
        """``("", "")`` when ``update`` is acceptable, else (reason, detail); never raises."""
        ...


def sq_norm(tensors: tuple[Tensor, ...] | list[Tensor]) -> float:
    """Sum of squares of every decoded value, in float64; NaN or inf when one is not finite.

    For dense codecs the norm doubles as the finiteness check (a NaN or inf value makes the sum
    NaN or inf; float32, binary16 and int8-times-scale values cannot overflow it), so an update
    is read once, not twice. ``topk`` is checked first: its indices must be valid before
    anything is read at them.
    """
    total = 0.0
    for t in tensors:
        k = kernels.KERNELS[t.codec]
        if t.codec == "topk" and not k.check(t):
            return math.nan
        try:
            total += k.sq_norm(t)
        except ValueError:  # byte lengths that do not match the declared shape
            return math.nan
    return total


def admit(payload: bytes, device: str, *, federation: str, spec: ModelSpec,
          limits: LimitsConfig, decode_limits: codec.DecodeLimits, task: TaskCheck | None = None
          ) -> tuple[Admitted | None, str, str]:
    """``(admitted, "", "")`` or ``(None, reason, what was wrong)`` for one update message.

    With a ``task`` (a statistics federation), its check replaces the model's (weight, shapes,
    norm): the update counts once, with weight 1 and no norm.
    """
    if len(payload) > limits.max_update_bytes:
        return None, "oversize", f"{len(payload)} bytes"
    try:
        update = codec.decode_as(payload, ModelUpdate, decode_limits)
    except DecodeError as exc:
        return None, exc.reason, str(exc)
    if update.federation != federation:
        return None, "wrong_federation", f"federation {update.federation!r}"
    if update.device_id != device:
        return None, "wrong_device", f"device id {update.device_id!r} on {device!r}'s topic"
    if task is not None:
        reason, detail = task.check(update)
        return (None, reason, detail) if reason else (Admitted(update, 1.0, 0.0), "", "")
    n = update.num_examples
    if n <= 0 or (n > limits.max_examples and limits.weight_mode == "reject"):
        return None, "invalid_weight", f"num_examples {n}"
    problem = (spec.check(update.tensors) if update.chunks == 1
               else spec.check_ranges(update.tensors))
    if problem is not None:
        return None, "wrong_shape", problem
    sq = sq_norm(update.tensors)
    if not math.isfinite(sq):
        return None, "non_finite", "NaN or inf values"
    return Admitted(update, float(min(n, limits.max_examples)), sq), "", ""
