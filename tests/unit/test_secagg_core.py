"""Secure aggregation's pure core: fixed point, Shamir, the graph, sealing, and whole rounds
with dropouts whose unmasked sum must equal the plain integer sum of the survivors exactly."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.secagg import shamir
from fedmq.secagg.client import SecAggClient, SecAggError, Setup
from fedmq.secagg.crypto import KeyPair, RoundContext, SealError, open_sealed, prg, seal
from fedmq.secagg.fixedpoint import U32, FixedPoint, ring_sum
from fedmq.secagg.graph import default_degree, default_threshold, neighbours
from fedmq.secagg.unmask import UnmaskError, unmask_sum

CTX = RoundContext("fed", 3, 7)


def seeded(seed: int) -> Callable[[int], bytes]:
    return np.random.default_rng(seed).bytes


# ---------------------------------------------------------------- fixed point


def test_fixed_point_headroom_rule() -> None:
    fp = FixedPoint.for_devices(100, clip=4.0, weight_cap=1.0)
    assert fp.frac_bits == 22
    assert fp.max_devices() >= 100
    assert FixedPoint(fp.frac_bits + 1, 4.0, 1.0).max_devices() < 100


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), clip=st.floats(0.01, 50.0), sign=st.sampled_from([-1.0, 1.0]))
def test_extreme_sum_does_not_wrap(n: int, clip: float, sign: float) -> None:
    fp = FixedPoint.for_devices(n, clip, weight_cap=10.0)
    worst = fp.encode(np.full(5, sign * 1e9), weight=1e9)  # clipped to +-clip, weight to 1
    total = ring_sum([worst] * n)
    sums, weights = fp.decode_sum(total)
    np.testing.assert_allclose(sums, sign * clip * n, rtol=1e-6)
    assert weights == pytest.approx(n, rel=1e-6)


def test_encode_weights_before_and_decodes_mean() -> None:
    rng = np.random.default_rng(0)
    fp = FixedPoint.for_devices(20, clip=4.0, weight_cap=100.0)
    xs = [rng.normal(0, 0.5, 50).astype(np.float32) for _ in range(20)]
    ws = rng.uniform(10, 100, 20)
    sums, wsum = fp.decode_sum(ring_sum([fp.encode(x, w) for x, w in zip(xs, ws, strict=True)]))
    ref = np.average(np.stack(xs).astype(np.float64), axis=0, weights=ws)
    np.testing.assert_allclose(sums / wsum, ref, atol=20 * 2.0**-fp.frac_bits)
    assert wsum == pytest.approx(ws.sum() / 100.0, abs=20 * 2.0**-fp.frac_bits)


def test_encode_maps_non_finite_and_bad_weight() -> None:
    fp = FixedPoint(10, 2.0, 1.0)
    v = fp.encode(np.array([np.nan, np.inf, -np.inf, 0.5]), weight=1.0)
    assert list(v[:4].view(np.int32)) == [0, 2048, -2048, 512]
    assert fp.encode(np.ones(2), weight=float("nan"))[-1] == 0
    with pytest.raises(ValueError, match="frac_bits"):
        FixedPoint(31, 1.0, 1.0)


# ---------------------------------------------------------------- Shamir


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 8), extra=st.integers(0, 6), seed=st.integers(0, 2**32 - 1))
def test_shamir_any_t_shares_rebuild(t: int, extra: int, seed: int) -> None:
    rnd = seeded(seed)
    secret = rnd(32)
    xs = list(range(3, 3 + t + extra))
    ys = shamir.split(secret, xs, t, rnd)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(xs), size=t, replace=False)
    assert shamir.combine([(xs[i], ys[i]) for i in pick], t) == secret
    for y in ys:
        assert shamir.from_bytes(shamir.to_bytes(y)) == y


def test_shamir_too_few_and_bad_inputs() -> None:
    ys = shamir.split(bytes(range(32)), [1, 2, 3], 3, seeded(1))
    with pytest.raises(shamir.ShamirError, match="threshold"):
        shamir.combine([(1, ys[0]), (2, ys[1])], 3)
    # two of three shares of a degree-2 polynomial give a random field element: not a
    # 32-byte secret, except with probability 2^-265
    with pytest.raises(shamir.ShamirError, match="32-byte"):
        shamir.combine([(1, ys[0]), (2, ys[1])], 2)
    with pytest.raises(shamir.ShamirError):
        shamir.split(b"short", [1, 2], 2)
    with pytest.raises(shamir.ShamirError):
        shamir.split(bytes(32), [1, 1], 2)
    with pytest.raises(shamir.ShamirError):
        shamir.from_bytes(b"\xff" * shamir.SHARE_BYTES)


# ---------------------------------------------------------------- graph and crypto


@pytest.mark.parametrize(("n", "k"), [(20, 10), (100, 20), (7, 4), (5, 10)])
def test_graph_regular_symmetric_deterministic(n: int, k: int) -> None:
    roster = [f"d{i:03d}" for i in range(n)]
    g = neighbours(roster, k, b"seed")
    want = min(k, n - 1)
    for d, near in g.items():
        assert len(near) == want
        assert d not in near
        assert all(d in g[v] for v in near)
    assert g == neighbours(list(reversed(roster)), k, b"seed")
    assert g != neighbours(roster, k, b"other") or want == n - 1


def test_default_degree_and_threshold() -> None:
    assert default_degree(20) == 14
    assert default_degree(100) == 20
    assert default_degree(3) == 2
    assert default_threshold(14) == 8


def test_key_agreement_prg_and_sealing() -> None:
    a, b = KeyPair.generate(seeded(1)), KeyPair.generate(seeded(2))
    assert a.mask_seed(b.public, CTX) == b.mask_seed(a.public, CTX)
    assert a.mask_seed(b.public, CTX) != a.seal_key(b.public, CTX)
    assert a.mask_seed(b.public, CTX) != a.mask_seed(b.public, RoundContext("fed", 3, 8))
    seed = a.mask_seed(b.public, CTX)
    assert np.array_equal(prg(seed, 1000)[:10], prg(seed, 10))
    key = a.seal_key(b.public, CTX)
    box = seal(key, CTX, "a", "b", b"payload")
    assert open_sealed(key, CTX, "a", "b", box) == b"payload"
    flipped = box[:-1] + bytes([box[-1] ^ 1])
    later = RoundContext("fed", 3, 8)
    cases = [(CTX, "a", "c", box), (CTX, "b", "a", box), (later, "a", "b", box),
             (CTX, "a", "b", flipped), (CTX, "a", "b", box[:20])]
    for ctx, sender, recipient, blob in cases:
        with pytest.raises(SealError):
            open_sealed(key, ctx, sender, recipient, blob)


# ---------------------------------------------------------------- whole rounds


def simulate(n: int, params: int, *, drop_before_share: int = 0, drop_before_mask: int = 0,
             drop_after_mask: int = 0, degree: int | None = None, threshold: int | None = None,
             seed: int = 0, tamper: Callable[[str, dict[str, bytes]], None] | None = None,
             ) -> tuple[U32, U32]:
    """(unmasked sum, plain ring sum of the survivors' vectors) of one simulated round."""
    rng = np.random.default_rng(seed)
    fp = FixedPoint.for_devices(n, clip=4.0, weight_cap=100.0)
    ids = [f"dev-{i:03d}" for i in range(n)]
    clients = {d: SecAggClient(d, CTX, seeded(seed * 1000 + i)) for i, d in enumerate(ids)}
    order = list(rng.permutation(ids))
    gone_share = set(order[:drop_before_share])
    gone_mask = set(order[drop_before_share:drop_before_share + drop_before_mask])
    gone_unmask = set(order[drop_before_share + drop_before_mask:
                            drop_before_share + drop_before_mask + drop_after_mask])
    roster = {d: c.advertise() for d, c in clients.items()}
    k = degree if degree is not None else default_degree(n)
    setup = Setup(CTX, roster, k, threshold or default_threshold(min(k, n - 1)), b"graph")
    inbox: dict[str, dict[str, bytes]] = {d: {} for d in ids}
    commitments = {}
    for d in ids:
        if d in gone_share:
            continue
        out, commitments[d] = clients[d].share(setup)
        for v, box in out.items():
            inbox[v][d] = box
    shared = set(commitments)
    if tamper is not None:
        for d in ids:
            tamper(d, inbox[d])
    masked_sum = np.zeros(params + 1, dtype=np.uint32)
    plain = []
    survivors = set()
    for d in ids:
        if d in gone_share or d in gone_mask:
            continue
        vec = fp.encode(rng.normal(0, 1, params), float(rng.uniform(1, 100)))
        masked = clients[d].mask(inbox[d], vec)
        assert not np.array_equal(masked, vec)
        masked_sum += masked
        plain.append(vec)
        survivors.add(d)
    b_shares: dict[str, list[tuple[int, int]]] = {}
    s_shares: dict[str, list[tuple[int, int]]] = {}
    xs = {d: i + 1 for i, d in enumerate(sorted(roster))}
    for d in sorted(survivors - gone_unmask):
        b_out, s_out = clients[d].unmask(survivors, shared - survivors)
        for u, y in b_out.items():
            b_shares.setdefault(u, []).append((xs[d], shamir.from_bytes(y)))
        for u, y in s_out.items():
            s_shares.setdefault(u, []).append((xs[d], shamir.from_bytes(y)))
    total = unmask_sum(masked_sum, setup, shared=shared, survivors=survivors,
                       commitments=commitments, b_shares=b_shares, s_shares=s_shares)
    return total, ring_sum(plain)


def test_acceptance_20_devices_3_drop_after_2_before() -> None:
    """Acceptance 2: 3 drop after sending their masked update, 2 before; exact integers."""
    total, plain = simulate(20, 500, drop_before_mask=2, drop_after_mask=3)
    assert np.array_equal(total, plain)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(3, 24), seed=st.integers(0, 10_000), data=st.data())
def test_any_dropouts_below_threshold_unmask_exactly(n: int, seed: int,
                                                     data: st.DataObject) -> None:
    k = default_degree(n)
    t = default_threshold(k)
    before_share = data.draw(st.integers(0, 1))
    before_mask = data.draw(st.integers(0, 1))
    # every device keeps at least t responding neighbours when at most k - t drop in total
    after = data.draw(st.integers(0, max(0, k - t - before_share - before_mask)))
    if n - before_share - before_mask - after < t or before_share + before_mask + after > k - t:
        return
    total, plain = simulate(n, 64, drop_before_share=before_share, drop_before_mask=before_mask,
                            drop_after_mask=after, seed=seed)
    assert np.array_equal(total, plain)


def test_complete_graph_is_the_original_protocol() -> None:
    total, plain = simulate(8, 40, drop_before_mask=1, drop_after_mask=1, degree=100)
    assert np.array_equal(total, plain)


def test_too_many_dropouts_name_the_device() -> None:
    with pytest.raises(UnmaskError, match="too_few_shares"):
        simulate(10, 8, drop_after_mask=7, degree=4, threshold=3)


def test_a_bad_seal_makes_the_device_drop_out() -> None:
    def tamper(d: str, inbox: dict[str, bytes]) -> None:
        if d == "dev-004" and inbox:
            u = sorted(inbox)[0]
            inbox[u] = inbox[u][:-1] + bytes([inbox[u][-1] ^ 1])

    with pytest.raises(SecAggError, match="bad_seal"):
        simulate(10, 8, tamper=tamper)


def test_device_refuses_to_reveal_both_secrets_of_one_device() -> None:
    ids = [f"d{i}" for i in range(6)]
    clients = {d: SecAggClient(d, CTX, seeded(i)) for i, d in enumerate(ids)}
    setup = Setup(CTX, {d: c.advertise() for d, c in clients.items()}, 5, 3, b"g")
    boxes = {d: c.share(setup)[0] for d, c in clients.items()}
    c0 = clients["d0"]
    c0.mask({u: boxes[u]["d0"] for u in ids[1:]}, np.zeros(4, dtype=np.uint32))
    with pytest.raises(SecAggError, match="conflicting_unmask"):
        c0.unmask({"d0", "d1", "d2"}, {"d2"})
    with pytest.raises(SecAggError, match="too_few_survivors"):
        c0.unmask({"d0", "d1"}, {"d2"})
    b_out, s_out = c0.unmask({"d0", "d1", "d2", "d3"}, {"d4", "d5"})
    assert set(b_out) == {"d1", "d2", "d3"}
    assert set(s_out) == {"d4", "d5"}
    with pytest.raises(SecAggError, match="conflicting_unmask"):
        c0.unmask({"d0", "d1", "d2", "d3", "d4"}, {"d5"})
    assert c0.unmask({"d0", "d1", "d2", "d3"}, {"d4", "d5"}) == (b_out, s_out)


def test_steps_out_of_order_and_foreign_roster() -> None:
    c = SecAggClient("d0", CTX, seeded(0))
    with pytest.raises(SecAggError, match="out_of_order"):
        c.mask({}, np.zeros(2, dtype=np.uint32))
    other = SecAggClient("d1", CTX, seeded(1))
    setup = Setup(CTX, {"d0": other.advertise(), "d1": other.advertise()}, 1, 1, b"g")
    with pytest.raises(SecAggError, match="not_in_roster"):
        c.share(setup)
