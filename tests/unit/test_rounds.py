"""The round state machine, driven by a fake clock: ``now`` is a plain float, nothing sleeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.rounds import (
    AbandonRound,
    Accept,
    Action,
    CloseRound,
    Event,
    ExtendDeadline,
    OpenRound,
    Phase,
    Reject,
    RejectReason,
    RoundMachine,
    RoundRules,
    Tick,
    UpdateOffered,
)
from fedmq.errors import ProtocolError

# min 2, max 4, 60 s deadline, 5 s grace, extend forever.
RULES = RoundRules(min_updates=2, max_updates=4, deadline_s=60.0, grace_s=5.0)
REANNOUNCE = RoundRules(2, 4, 60.0, 5.0, below_quorum="reannounce")
TWO_EXTENSIONS = RoundRules(2, 4, 60.0, 5.0, max_extensions=2)
MIN_IS_MAX = RoundRules(2, 2, 60.0, 5.0)
ONE_NO_GRACE = RoundRules(1, 3, 60.0, 0.0)


def up(
    device: str, now: float, *, round: int = 1, base: int = 0, uid: str | None = None
) -> UpdateOffered:
    return UpdateOffered(device, round, base, uid or f"{device}-{round}", now)


def acc(device: str, *, round: int = 1, uid: str | None = None) -> Accept:
    return Accept(device, uid or f"{device}-{round}")


def rej(device: str, reason: RejectReason, *, round: int = 1, uid: str | None = None) -> Reject:
    return Reject(device, uid or f"{device}-{round}", reason)


def snapshot(m: RoundMachine) -> dict[str, Any]:
    """Every observable property of the machine."""
    return {
        name: getattr(m, name)
        for name in (
            "rules",
            "phase",
            "round",
            "base_version",
            "opened_at",
            "deadline",
            "close_at",
            "extensions",
            "accepted",
            "accepted_ids",
        )
    }


Step = tuple[Event, list[Action]]

SCENARIOS = [
    pytest.param(
        RULES,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 1.0), [acc("a")]),
            (Tick(9.0), []),
            (up("b", 10.0), [acc("b")]),
            (Tick(14.999), []),  # close_at is 15: not one tick early
            (Tick(15.0), [CloseRound(1, 0, 2, "grace")]),
            (Tick(16.0), []),
        ],
        {"phase": Phase.CLOSED, "accepted": 2, "close_at": None},
        id="quorum-then-grace-closes-on-time",
    ),
    pytest.param(
        RULES,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 1.0), [acc("a")]),
            (up("b", 2.0), [acc("b")]),
            (up("c", 3.0), [acc("c")]),
            (Tick(7.0), [CloseRound(1, 0, 3, "grace")]),
        ],
        {"phase": Phase.CLOSED, "accepted": 3},
        id="quorum-keeps-accepting-until-grace",
    ),
    pytest.param(
        RULES,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 1.0), [acc("a")]),
            (up("b", 1.5), [acc("b")]),
            (up("c", 2.0), [acc("c")]),
            (up("d", 2.5), [acc("d"), CloseRound(1, 0, 4, "max_updates")]),
            (up("e", 2.6), [rej("e", "round_closed")]),
            (Tick(100.0), []),
        ],
        {"phase": Phase.CLOSED, "accepted": 4, "close_at": None},
        id="max-updates-closes-at-once",
    ),
    pytest.param(
        MIN_IS_MAX,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 1.0), [acc("a")]),
            (up("b", 2.0), [acc("b"), CloseRound(1, 0, 2, "max_updates")]),
        ],
        {"phase": Phase.CLOSED},
        id="min-equals-max-closes-on-max",
    ),
    pytest.param(
        RULES,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 50.0), [acc("a")]),
            (up("b", 58.0), [acc("b")]),  # grace would end at 63, past the deadline at 60
            (Tick(59.999), []),
            (Tick(60.0), [CloseRound(1, 0, 2, "deadline")]),
        ],
        {"phase": Phase.CLOSED},
        id="deadline-cuts-grace-short",
    ),
    pytest.param(
        ONE_NO_GRACE,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 3.0), [acc("a")]),
            (Tick(3.0), [CloseRound(1, 0, 1, "grace")]),
        ],
        {"phase": Phase.CLOSED},
        id="zero-grace-closes-on-next-tick",
    ),
    pytest.param(
        RULES,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 1.0), [acc("a")]),
            (Tick(59.999), []),
            (Tick(60.0), [ExtendDeadline(1, 120.0, 1)]),
            (up("b", 70.0), [acc("b")]),
            (Tick(74.0), []),
            (Tick(75.0), [CloseRound(1, 0, 2, "grace")]),
        ],
        {"phase": Phase.CLOSED, "accepted_ids": (("a", "a-1"), ("b", "b-1"))},
        id="below-quorum-extends-and-keeps-updates",
    ),
    pytest.param(
        RULES,
        [
            (OpenRound(1, 0, 0.0), []),
            (Tick(60.0), [ExtendDeadline(1, 120.0, 1)]),
            (Tick(119.0), []),
            (
                Tick(130.0),
                [ExtendDeadline(1, 190.0, 2)],
            ),  # from the tick's now, not the old deadline
            (Tick(190.0), [ExtendDeadline(1, 250.0, 3)]),
        ],
        {"phase": Phase.OPEN, "deadline": 250.0, "extensions": 3},
        id="extend-is-unlimited-by-default",
    ),
    pytest.param(
        REANNOUNCE,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 1.0), [acc("a")]),
            (Tick(60.0), [AbandonRound(1, 0, 1)]),
            (up("b", 61.0), [rej("b", "round_closed")]),
            (OpenRound(2, 0, 62.0), []),
            (up("a", 63.0, round=2), [acc("a", round=2)]),
        ],
        {"phase": Phase.OPEN, "round": 2, "accepted_ids": (("a", "a-2"),), "deadline": 122.0},
        id="reannounce-abandons-and-next-round-starts-clean",
    ),
    pytest.param(
        TWO_EXTENSIONS,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 1.0), [acc("a")]),
            (Tick(60.0), [ExtendDeadline(1, 120.0, 1)]),
            (Tick(120.0), [ExtendDeadline(1, 180.0, 2)]),
            (Tick(179.0), []),
            (Tick(180.0), [AbandonRound(1, 0, 1)]),
            (Tick(240.0), []),
        ],
        {"phase": Phase.CLOSED, "extensions": 2},
        id="max-extensions-exhausted-abandons",
    ),
    pytest.param(
        TWO_EXTENSIONS,
        [
            (OpenRound(1, 0, 0.0), []),
            (Tick(60.0), [ExtendDeadline(1, 120.0, 1)]),
            (Tick(120.0), [ExtendDeadline(1, 180.0, 2)]),
            (Tick(180.0), [AbandonRound(1, 0, 0)]),
            (OpenRound(2, 0, 181.0), []),
            (Tick(241.0), [ExtendDeadline(2, 301.0, 1)]),  # each round gets its own extensions
        ],
        {"phase": Phase.OPEN, "extensions": 1},
        id="extensions-reset-by-next-round",
    ),
    pytest.param(
        RULES,
        [
            (up("a", 0.0), [rej("a", "round_closed")]),
            (Tick(1.0), []),
        ],
        {"phase": Phase.IDLE, "round": None},
        id="idle-rejects-updates-ignores-ticks",
    ),
    pytest.param(
        RULES,
        [
            (OpenRound(5, 3, 0.0), []),
            (up("a", 1.0, round=4, base=3), [rej("a", "stale", round=4)]),
            (up("b", 1.0, round=5, base=2), [rej("b", "stale", round=5)]),
            (up("c", 1.0, round=5, base=4), [rej("c", "stale", round=5)]),
            (up("d", 1.0, round=6, base=3), [rej("d", "unknown_round", round=6)]),
            (up("e", 1.0, round=5, base=3), [acc("e", round=5)]),
        ],
        {"phase": Phase.OPEN, "accepted": 1},
        id="stale-and-unknown-round",
    ),
    pytest.param(
        RULES,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 1.0, uid="u1"), [acc("a", uid="u1")]),
            (up("a", 2.0, uid="u2"), [rej("a", "duplicate", uid="u2")]),  # same device
            (up("b", 3.0, uid="u1"), [rej("b", "duplicate", uid="u1")]),  # same update id
            (up("b", 4.0, uid="u3"), [acc("b", uid="u3")]),
            (up("b", 5.0, uid="u3"), [rej("b", "duplicate", uid="u3")]),  # in QUORUM too
        ],
        {"phase": Phase.QUORUM, "accepted": 2, "close_at": 9.0},
        id="duplicates",
    ),
    pytest.param(
        RULES,
        [
            (OpenRound(3, 1, 0.0), []),
            (up("a", 1.0, round=3, base=1), [acc("a", round=3)]),
            (up("b", 2.0, round=3, base=1), [acc("b", round=3)]),
            (Tick(7.0), [CloseRound(3, 1, 2, "grace")]),
            (up("c", 8.0, round=3, base=1), [rej("c", "round_closed", round=3)]),
            (up("d", 8.0, round=2, base=1), [rej("d", "stale", round=2)]),
            (up("e", 8.0, round=4, base=1), [rej("e", "unknown_round", round=4)]),
            (OpenRound(4, 2, 9.0), []),
            (up("a", 10.0, round=4, base=2), [acc("a", round=4)]),  # dedupe memory was reset
            (up("f", 10.0, round=3, base=1), [rej("f", "stale", round=3)]),
        ],
        {"phase": Phase.OPEN, "round": 4, "base_version": 2, "opened_at": 9.0, "accepted": 1},
        id="closed-round-rejects-then-next-round",
    ),
    pytest.param(
        RULES,
        [
            (OpenRound(1, 0, 0.0), []),
            (up("a", 61.0), [acc("a")]),  # late, but no tick has noticed the deadline yet
            (up("b", 62.0), [acc("b")]),  # quorum past the deadline: close_at is the deadline
            (Tick(62.0), [CloseRound(1, 0, 2, "deadline")]),
        ],
        {"phase": Phase.CLOSED},
        id="time-closes-only-on-tick",
    ),
]


@pytest.mark.parametrize(("rules", "steps", "final"), SCENARIOS)
def test_scenario(rules: RoundRules, steps: Sequence[Step], final: dict[str, Any]) -> None:
    m = RoundMachine(rules)
    for i, (event, expected) in enumerate(steps):
        assert m.handle(event) == expected, f"step {i}: {event}"
        assert (m.close_at is None) == (m.phase is not Phase.QUORUM)
    state = snapshot(m)
    assert {key: state[key] for key in final} == final


def test_properties_through_a_round() -> None:
    m = RoundMachine(RULES)
    assert snapshot(m) == {
        "rules": RULES,
        "phase": Phase.IDLE,
        "round": None,
        "base_version": None,
        "opened_at": None,
        "deadline": None,
        "close_at": None,
        "extensions": 0,
        "accepted": 0,
        "accepted_ids": (),
    }
    m.handle(OpenRound(7, 3, 100.0))
    m.handle(up("a", 101.0, round=7, base=3))
    m.handle(up("b", 102.0, round=7, base=3))
    assert snapshot(m) == {
        "rules": RULES,
        "phase": Phase.QUORUM,
        "round": 7,
        "base_version": 3,
        "opened_at": 100.0,
        "deadline": 160.0,
        "close_at": 107.0,
        "extensions": 0,
        "accepted": 2,
        "accepted_ids": (("a", "a-7"), ("b", "b-7")),
    }


# --- illegal events -----------------------------------------------------------------------------

_QUORUM = [OpenRound(1, 0, 0.0), up("a", 1.0), up("b", 2.0)]
_CLOSED = [*_QUORUM, Tick(7.0)]
_ABANDONED = [OpenRound(1, 0, 0.0), Tick(60.0)]

ILLEGAL = [
    pytest.param(RULES, [OpenRound(1, 0, 0.0)], OpenRound(2, 0, 1.0), id="open-while-open"),
    pytest.param(RULES, _QUORUM, OpenRound(2, 0, 3.0), id="open-while-quorum"),
    pytest.param(RULES, [OpenRound(1, 0, 0.0)], OpenRound(1, 0, 1.0), id="reopen-same-while-open"),
    pytest.param(RULES, _CLOSED, OpenRound(1, 1, 8.0), id="open-same-number-after-close"),
    pytest.param(RULES, _CLOSED, OpenRound(0, 1, 8.0), id="open-lower-number-after-close"),
    pytest.param(REANNOUNCE, _ABANDONED, OpenRound(1, 0, 61.0), id="open-same-after-abandon"),
    pytest.param(RULES, [], "not an event", id="not-an-event-idle"),
    pytest.param(RULES, [OpenRound(1, 0, 0.0)], None, id="not-an-event-open"),
    pytest.param(RULES, _QUORUM, 3.0, id="not-an-event-quorum"),
    pytest.param(RULES, _CLOSED, Tick, id="not-an-event-closed"),
]


@pytest.mark.parametrize(("rules", "setup", "illegal"), ILLEGAL)
def test_illegal_event_raises_and_changes_nothing(
    rules: RoundRules, setup: list[Event], illegal: Any
) -> None:
    m, twin = RoundMachine(rules), RoundMachine(rules)
    for event in setup:
        m.handle(event)
        twin.handle(event)
    before = snapshot(m)
    with pytest.raises(ProtocolError):
        m.handle(illegal)
    assert snapshot(m) == before
    # And it behaves exactly like a machine that never saw the illegal event.
    probes: list[Event] = [
        up("z", 8.5),
        up("a", 8.5),
        Tick(8.6),
        Tick(1000.0),
        OpenRound(50, 9, 1001.0),
        up("a", 1002.0, round=50, base=9),
    ]
    for probe in probes:
        try:
            expected: list[Action] | type[ProtocolError] = twin.handle(probe)
        except ProtocolError:
            expected = ProtocolError
        if expected is ProtocolError:
            with pytest.raises(ProtocolError):
                m.handle(probe)
        else:
            assert m.handle(probe) == expected
        assert snapshot(m) == snapshot(twin)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"min_updates": 0}, "min_updates", id="min-zero"),
        pytest.param({"min_updates": 5, "max_updates": 4}, "max_updates", id="max-below-min"),
        pytest.param({"deadline_s": 0.0}, "deadline_s", id="deadline-zero"),
        pytest.param({"deadline_s": -1.0}, "deadline_s", id="deadline-negative"),
        pytest.param({"deadline_s": float("inf")}, "deadline_s", id="deadline-inf"),
        pytest.param({"grace_s": -0.1}, "grace_s", id="grace-negative"),
        pytest.param({"grace_s": float("nan")}, "grace_s", id="grace-nan"),
        pytest.param({"below_quorum": "wait"}, "below_quorum", id="unknown-policy"),
        pytest.param({"max_extensions": -1}, "max_extensions", id="extensions-negative"),
        pytest.param(
            {"below_quorum": "reannounce", "max_extensions": 2},
            "max_extensions",
            id="extensions-without-extend",
        ),
    ],
)
def test_rules_are_validated(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "min_updates": 2,
        "max_updates": 4,
        "deadline_s": 60.0,
        "grace_s": 5.0,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        RoundRules(**args)


@pytest.mark.parametrize("now", [float("nan"), float("inf"), float("-inf")])
def test_events_need_a_finite_time(now: float) -> None:
    with pytest.raises(ValueError, match="now"):
        Tick(now)
    with pytest.raises(ValueError, match="now"):
        OpenRound(1, 0, now)
    with pytest.raises(ValueError, match="now"):
        UpdateOffered("a", 1, 0, "u", now)


# --- properties ---------------------------------------------------------------------------------

_DEVICES = ["a", "b", "c", "d", "e"]
_UIDS = ["u1", "u2", "u3", "u4", "u5", "u6"]

rules_st = st.integers(1, 4).flatmap(
    lambda lo: (
        st.builds(
            RoundRules,
            min_updates=st.just(lo),
            max_updates=st.integers(lo, lo + 3),
            deadline_s=st.sampled_from([1.0, 5.0, 30.0]),
            grace_s=st.sampled_from([0.0, 0.5, 2.0, 50.0]),
            below_quorum=st.just("extend"),
            max_extensions=st.integers(0, 3),
        )
        | st.builds(
            RoundRules,
            min_updates=st.just(lo),
            max_updates=st.integers(lo, lo + 3),
            deadline_s=st.sampled_from([1.0, 5.0]),
            grace_s=st.sampled_from([0.0, 2.0]),
            below_quorum=st.just("reannounce"),
        )
    )
)

# (kind, device, round offset, base offset, update id, seconds since the previous event); the
# offsets are from the machine's current round and base, so most updates aim at the open round.
step_st = st.tuples(
    st.sampled_from(["open", "update", "update", "update", "tick"]),
    st.sampled_from(_DEVICES),
    st.sampled_from([0, 0, 0, 0, 1, -1, 2]),
    st.sampled_from([0, 0, 0, 1, -1]),
    st.sampled_from(_UIDS),
    st.sampled_from([0.0, 0.1, 1.0, 3.0, 40.0]),
)


@settings(max_examples=400, deadline=None)
@given(rules=rules_st, steps=st.lists(step_st, max_size=60))
def test_random_event_sequences_keep_the_invariants(
    rules: RoundRules, steps: list[tuple[str, str, int, int, str, float]]
) -> None:
    m = RoundMachine(rules)
    now = 0.0
    accepts = 0  # Accept actions since the last OpenRound
    extends = 0  # ExtendDeadline actions since the last OpenRound
    devices: set[str] = set()
    uids: set[str] = set()
    for kind, device, d_round, d_base, uid, dt in steps:
        now += dt
        # Opens mostly go to the next round; -1 still tries an illegal lower number.
        rnd = (m.round or 0) + (1 if kind == "open" and d_round == 0 else d_round)
        base = (m.base_version or 0) + d_base
        event: Event = (
            OpenRound(rnd, base, now)
            if kind == "open"
            else UpdateOffered(device, rnd, base, uid, now)
            if kind == "update"
            else Tick(now)
        )
        before = snapshot(m)
        try:
            actions = m.handle(event)
        except ProtocolError:
            assert isinstance(event, OpenRound)
            assert snapshot(m) == before
            continue
        if isinstance(event, OpenRound):
            assert before["phase"] in (Phase.IDLE, Phase.CLOSED)
            assert before["round"] is None or event.round > before["round"]
            accepts, extends, devices, uids = 0, 0, set(), set()
        if isinstance(event, UpdateOffered):
            # Exactly one verdict per update, maybe followed by the close it caused.
            assert actions[0] in (
                Accept(device, uid),
                *(
                    Reject(device, uid, r)
                    for r in ("stale", "unknown_round", "duplicate", "round_closed")
                ),
            )
        else:
            assert not any(isinstance(a, Accept | Reject) for a in actions)
        for action in actions:
            if isinstance(action, Accept):
                assert before["phase"] in (Phase.OPEN, Phase.QUORUM)
                assert action.device_id not in devices
                assert action.update_id not in uids
                devices.add(action.device_id)
                uids.add(action.update_id)
                accepts += 1
            elif isinstance(action, CloseRound | AbandonRound):
                assert action.accepted == accepts
                assert m.phase is Phase.CLOSED
                # A round closes only with a quorum and is abandoned only without one.
                assert (accepts >= rules.min_updates) == isinstance(action, CloseRound)
            elif isinstance(action, ExtendDeadline):
                extends += 1
                assert action.extensions == extends
                assert action.deadline == now + rules.deadline_s == m.deadline
                assert rules.max_extensions == 0 or extends <= rules.max_extensions
        assert m.accepted == accepts
        assert m.extensions == extends
        assert {d for d, _ in m.accepted_ids} == devices
        assert {u for _, u in m.accepted_ids} == uids
        _check_phase_invariants(m)


def _check_phase_invariants(m: RoundMachine) -> None:
    rules = m.rules
    assert m.accepted <= rules.max_updates
    assert (m.close_at is None) == (m.phase is not Phase.QUORUM)
    if m.phase is Phase.QUORUM:
        assert rules.min_updates <= m.accepted < rules.max_updates
    if m.phase is Phase.OPEN:
        assert m.accepted < rules.min_updates
