"""The kernels' JIT machinery: ``_jit`` (``njit(**FLAGS)``, falling back to no cache when no
cache directory is writable), exact binary16 to float64 conversion (``_half``: one instruction
where the CPU has it, integer arithmetic elsewhere), and the topk index check shared by folds and
checks.
"""

from __future__ import annotations

import functools
import logging
import platform
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
from llvmlite import binding as llvm_binding  # type: ignore[import-untyped]
from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.extending import intrinsic

from aggregator.kernel_args import U32
from aggregator.kernel_config import FLAGS, JitFlags

log = logging.getLogger("aggregator.kernels")

_F = TypeVar("_F", bound=Callable[..., Any])

# 2**-25: a binary16 value is (mantissa with its implicit bit) << exponent, times this.
_HALF_UNIT = 2.0**-25


@functools.cache
def _warn_no_cache() -> None:
    log.warning("no writable numba cache directory (set NUMBA_CACHE_DIR); compiling per process")


def _jit(fn: _F) -> _F:
    try:
        return cast(_F, njit(**FLAGS)(fn))
    except RuntimeError:
        # numba raises at decoration when no cache directory is writable (read-only install and
        # no writable HOME); compiling per process is better than failing to import.
        _warn_no_cache()
        uncached: JitFlags = {**FLAGS, "cache": False}
        return cast(_F, njit(**uncached)(fn))


@_jit
def _half_sw(bits: np.uint16) -> float:
    """The binary16 value with these bits, exactly, as float64, by integer arithmetic."""
    h = np.int64(bits)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    # Normal: (1024 + m) * 2**(e - 25); subnormal (e == 0): m * 2**-24 = (m << 1) * 2**-25.
    # The integer is below 2**41 and the scaling is a power of two, so every step is exact.
    sig = m + 0x400 if e != 0 else m
    shift = e if e != 0 else 1
    v = np.float64(sig << shift) * _HALF_UNIT
    if e == 0x1F:
        v = np.float64(np.inf) if m == 0 else np.float64(np.nan)
    return -v if h & 0x8000 else v


@intrinsic
def _half_hw(typingctx: object, bits: object) -> object:
    """The same in one instruction: LLVM's ``fpext half to double`` (vcvtph2pd / F16C on x86,
    fcvt on AArch64), which also vectorizes. Only used where the JIT target has it."""
    if bits != types.uint16:
        return None

    def codegen(context: object, builder: ir.IRBuilder, signature: object,
                args: list[ir.Value]) -> ir.Value:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())

    return types.float64(types.uint16), codegen


def _hardware_half() -> bool:
    """True when the JIT target converts binary16 in hardware (x86 with F16C, AArch64).

    Elsewhere LLVM would call a runtime helper numba does not link; a fixed ``NUMBA_CPU_NAME`` /
    ``NUMBA_CPU_FEATURES`` (portable caches) and ``NUMBA_DISABLE_JIT`` use the integer version too.
    """
    # (numba.config sets these attributes at import, from the environment.)
    if any(getattr(numba_config, k, None) for k in ("DISABLE_JIT", "CPU_NAME", "CPU_FEATURES")):
        return False
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine in ("x86_64", "amd64"):
        try:
            return "+f16c" in llvm_binding.get_host_cpu_features().flatten().split(",")
        except RuntimeError:
            return False
    return False


#: binary16 bits → exact float64, for the kernels (both versions give the same values).
_half: Callable[[np.uint16], float] = cast(
    Callable[[np.uint16], float], _half_hw if _hardware_half() else _half_sw)


@_jit
def _first_bad_index(idx: U32, span: int) -> int:
    """Position of the first index not above its predecessor or not below ``span``; -1 if none."""
    prev = np.int64(-1)
    for j in range(idx.size):
        i = np.int64(idx[j])
        if i <= prev or i >= span:
            return j
        prev = i
    return -1
