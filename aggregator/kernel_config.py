"""The Numba JIT flags every aggregator kernel is compiled with, in one place so they cannot drift.

``aggregator.kernels`` applies them as ``njit(**FLAGS)``; this module itself does not import numba
so the flags can be read (and documented) without it. Why each one:

``nogil=True``
    A fold runs on a worker thread while paho's network thread keeps reading the socket; holding the
    GIL through a multi-megabyte fold starved that thread in the prototype (notes/mqtt.md).
``cache=True``
    Compiled code is written next to the source in ``__pycache__``; when that is not writable (a
    read-only install) numba silently uses the user cache (``~/.cache/numba``, or
    ``$NUMBA_CACHE_DIR``). When neither is writable numba does *not* fall back: decorating raises
    ``RuntimeError("cannot cache function ...")`` at import, so ``aggregator.kernels`` catches that
    and compiles that process without a cache. Cache entries are keyed by a hash of the source, so a
    stale cache is never used.
``fastmath=False``
    Every add and multiply stays an IEEE operation in program order (no reassociation, no fused
    multiply-add): the fold computes exactly ``acc + w * float64(x)``, element by element, the same
    bits as the numpy reference, and NaN/inf checks are not optimised away.
``boundscheck=False``
    The public wrappers check every length before calling a kernel; ``NUMBA_BOUNDSCHECK=1`` still
    turns checks on for debugging because the environment variable overrides this flag.
``error_model="numpy"``
    Division by zero yields inf/NaN like numpy instead of raising, so kernels carry no
    per-division zero check.

``parallel`` is left off on purpose: on the small machines this targets a multi-threaded fold fought
the broker and the publishers for the cores (notes/mqtt.md); scale-out is by worker processes
merging partial sums instead.
"""

from __future__ import annotations

from typing import Final, Literal, TypedDict


class JitFlags(TypedDict):
    """The keyword arguments given to ``numba.njit``, typed so ``njit(**FLAGS)`` type-checks."""

    nogil: bool
    cache: bool
    fastmath: bool
    boundscheck: bool
    error_model: Literal["python", "numpy"]


#: Read-only by convention: copy it (``{**FLAGS, ...}``) to vary a flag.
FLAGS: Final[JitFlags] = {
    "nogil": True,
    "cache": True,
    "fastmath": False,
    "boundscheck": False,
    "error_model": "numpy",
}
