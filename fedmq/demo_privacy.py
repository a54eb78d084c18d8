"""``fedmq demo --noise-multiplier Z``: the training demo with differential privacy
(docs/privacy.md): its options, the ``[privacy]`` section they make, and the lines it prints."""

from __future__ import annotations

import argparse
import math
from typing import Any

from fedmq.config import PrivacyConfig, RobustConfig

__all__ = ["DEMO_DP_CLIP", "add_arguments", "check_knobs", "privacy_sections", "report",
           "summary_line"]

#: The clip when ``--noise-multiplier`` is given without ``--clip-norm``: about the median L2
#: norm of the demo's honest updates after the first rounds (docs/privacy.md), so most updates
#: are clipped a little and the noise is calibrated to a bound the updates really reach.
DEMO_DP_CLIP = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The differential privacy options."""
    p.add_argument("--noise-multiplier", type=float, default=0.0, metavar="Z",
                   help="differential privacy (DP-FedAvg): Gaussian noise of sd Z x clip norm "
                        "on each round's sum of clipped updates; prints epsilon each round "
                        "(default 0: off; docs/privacy.md)")
    p.add_argument("--target-epsilon", type=float, default=None, metavar="E",
                   help="with --noise-multiplier: stop before a round would take epsilon "
                        "past E")
    p.add_argument("--delta", type=float, default=1e-5,
                   help="with --noise-multiplier: the delta of (epsilon, delta) "
                        "(default 1e-5)")


def check_knobs(args: argparse.Namespace) -> str:
    """The first out-of-range privacy option, said as the option name, or ''."""
    z = getattr(args, "noise_multiplier", 0.0)
    if not (math.isfinite(z) and 0.0 <= z <= 1e6):
        return f"--noise-multiplier {z} must be in [0, 1e6]"
    target, delta = getattr(args, "target_epsilon", None), getattr(args, "delta", 1e-5)
    if z == 0:
        return "--target-epsilon needs --noise-multiplier" if target is not None else ""
    if target is not None and not (math.isfinite(target) and 0 < target <= 1e6):
        return f"--target-epsilon {target} must be in (0, 1e6]"
    if not 0.0 < delta < 1.0:
        return f"--delta {delta} must be in (0, 1)"
    if getattr(args, "mode", "sync") != "sync":
        return "--noise-multiplier works with --mode sync only"
    return ""


def privacy_sections(args: argparse.Namespace) -> tuple[PrivacyConfig, RobustConfig]:
    """``[privacy]`` and ``[robust]`` for the demo: with noise ``--clip-norm`` (or
    ``DEMO_DP_CLIP``) is the privacy clip, and so the norm bound; without, the robust one."""
    z = getattr(args, "noise_multiplier", 0.0)
    clip = getattr(args, "clip_norm", None)
    if not z:
        return PrivacyConfig(), RobustConfig(clip_norm=clip)
    return (PrivacyConfig(noise_multiplier=z, clip_norm=clip or DEMO_DP_CLIP,
                          target_epsilon=getattr(args, "target_epsilon", None),
                          delta=getattr(args, "delta", 1e-5)), RobustConfig())


def summary_line(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> str:
    """What the run spent, and whether it stopped at ``--target-epsilon``; '' without DP."""
    z = getattr(args, "noise_multiplier", 0.0)
    if not z or not rounds:
        return ""
    eps = rounds[-1].get("epsilon")
    clip = getattr(args, "clip_norm", None) or DEMO_DP_CLIP
    text = (f"differential privacy: epsilon {eps:.3f} at delta {args.delta:g} after "
            f"{len(rounds)} rounds (noise multiplier {z:g}, clip norm {clip:g})")
    target = getattr(args, "target_epsilon", None)
    if target is not None and len(rounds) < args.rounds:
        text += (f"; stopped at --target-epsilon {target:g}: one more round would have "
                 "passed it")
    return text


def report(args: argparse.Namespace, result: Any) -> None:
    """Put the noise and the final epsilon into the demo's result and say what was spent."""
    result.noise_multiplier = getattr(args, "noise_multiplier", 0.0)
    result.final_epsilon = result.rounds[-1].get("epsilon") if result.rounds else None
    if line := summary_line(args, result.rounds):
        print(line)
