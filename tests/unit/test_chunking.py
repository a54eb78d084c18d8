"""Chunked updates and models: splitting, reassembly, and folding chunks as they arrive."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import numpy.typing as npt
import pytest

from aggregator.spec import ModelSpec
from aggregator.strategies import FedAvg
from fedmq import codec, compression
from fedmq.chunking import ModelAssembler, join_ranges, place, split_model, split_update
from fedmq.wire import GlobalModel, ModelUpdate, Tensor, model_digest

F32 = npt.NDArray[np.float32]
SHAPES = {"a": (120, 50), "b": (50,), "c": (50, 33)}


def _arrays(seed: int, scale: float = 1.0) -> dict[str, F32]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SHAPES.items()}


def _update(arrays: dict[str, F32], device: str = "d", n: int = 10) -> ModelUpdate:
    return ModelUpdate(federation="f", device_id=device, round=1, base_version=0,
                       update_id=f"{device}-u", num_examples=n,
                       tensors=compression.encode_all(arrays))


def _fp32(name: str, values: F32) -> Tensor:
    return compression.encode(name, values)


def test_small_update_is_not_split() -> None:
    u = _update(_arrays(0))
    assert split_update(u, _arrays(0), _fp32, max_bytes=1 << 20) == [u]


@pytest.mark.parametrize("max_bytes", [4096, 9000, 30_000])
def test_chunks_fit_and_tile_the_update(max_bytes: int) -> None:
    arrays = _arrays(1)
    chunks = split_update(_update(arrays), arrays, _fp32, max_bytes)
    assert len(chunks) > 1
    assert [c.chunk for c in chunks] == list(range(len(chunks)))
    assert {c.chunks for c in chunks} == {len(chunks)}
    for c in chunks:
        assert len(codec.encode(c)) <= max_bytes
        assert (c.update_id, c.num_examples, c.round) == ("d-u", 10, 1)
    # Every element exactly once, and the values survive.
    covered = {n: np.zeros(int(np.prod(s)), int) for n, s in SHAPES.items()}
    for c in chunks:
        for t in codec.decode_as(codec.encode(c), ModelUpdate).tensors:
            assert t.shape == SHAPES[t.name]
            covered[t.name][t.offset:t.offset + t.span] += 1
    assert all((v == 1).all() for v in covered.values())
    rebuilt = place(((t, compression.decode_range(t)) for c in chunks for t in c.tensors),
                    SHAPES)
    for n in SHAPES:
        np.testing.assert_array_equal(rebuilt[n], arrays[n])


def test_too_small_a_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="below the minimum"):
        split_update(_update(_arrays(0)), _arrays(0), _fp32, max_bytes=100)


def _model(version: int, seed: int) -> GlobalModel:
    tensors = compression.encode_all(_arrays(seed))
    return GlobalModel(federation="f", version=version, round=version, tensors=tensors,
                       sha256=model_digest(tensors))


def test_model_parts_reassemble_in_any_order() -> None:
    model = _model(3, 2)
    messages = split_model(model, max_bytes=8192)
    manifest, parts = messages[0], messages[1:]
    assert manifest.tensors == ()
    assert manifest.chunk is None
    assert manifest.chunks == len(parts) > 1
    assert all(len(codec.encode(m)) <= 8192 for m in messages)
    for order in ([manifest, *parts], [*parts[::-1], manifest], [parts[0], manifest, *parts[1:]]):
        assembler = ModelAssembler()
        results = [assembler.add(codec.decode_as(codec.encode(m), GlobalModel)) for m in order]
        assert all(r is None for r in results[:-1])
        whole = results[-1]
        assert whole is not None
        assert whole.tensors == model.tensors
        assert model_digest(whole.tensors) == model.sha256


def test_assembler_drops_older_versions_and_ignores_late_parts() -> None:
    old, new = split_model(_model(1, 3), 8192), split_model(_model(2, 4), 8192)
    assembler = ModelAssembler()
    for m in old[:2]:
        assert assembler.add(m) is None
    for m in new[:-1]:
        assert assembler.add(m) is None
    for m in old[2:]:  # parts of version 1 arriving late are ignored
        assert assembler.add(m) is None
    whole = assembler.add(new[-1])
    assert whole is not None
    assert whole.version == 2


def test_assembler_follows_a_new_run_whose_versions_start_again() -> None:
    old_run = split_model(dataclasses.replace(_model(7, 3), run=100), 8192)
    new_run = split_model(dataclasses.replace(_model(0, 4), run=200), 8192)
    assembler = ModelAssembler()
    for m in old_run[:2]:
        assert assembler.add(m) is None
    for m in new_run[:-1]:  # version 0 of a later run replaces version 7 of the earlier one
        assert assembler.add(m) is None
    for m in old_run[2:]:  # the earlier run's late parts are ignored
        assert assembler.add(m) is None
    whole = assembler.add(new_run[-1])
    assert whole is not None
    assert (whole.run, whole.version) == (200, 0)
    assert model_digest(whole.tensors) == whole.sha256


def test_join_ranges_refuses_gaps() -> None:
    t = compression.encode("x", np.arange(10, dtype=np.float32))
    first = dataclasses.replace(t, data=t.data[:16], count=4)
    last = dataclasses.replace(t, data=t.data[20:], offset=5, count=5)
    with pytest.raises(ValueError, match="gap or overlap"):
        join_ranges([first, last])


def _fold_whole(spec: ModelSpec, base: dict[str, F32],
                updates: list[tuple[dict[str, F32], int]]) -> dict[str, F32]:
    s = FedAvg(spec)
    s.init(base)
    for arrays, n in updates:
        s.fold(compression.encode_all(arrays), n)
    return s.finalize()


def test_chunked_updates_fold_to_the_same_model_in_any_order() -> None:
    base = _arrays(10)
    spec = ModelSpec.from_weights(base)
    updates = [(_arrays(20 + i, 0.1), 5 + 7 * i) for i in range(3)]
    expected = _fold_whole(spec, base, updates)
    pieces = []
    for i, (arrays, n) in enumerate(updates):
        for c in split_update(_update(arrays, f"d{i}", n), arrays, _fp32, 9000):
            pieces.append((f"d{i}", c))
    for perm in itertools.islice(itertools.permutations(range(len(pieces))), 0, 2000, 397):
        s = FedAvg(spec)
        s.init(base)
        seen: dict[str, int] = {}
        for j in perm:
            key, c = pieces[j]
            s.fold_part(key, c.tensors, c.num_examples)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] == c.chunks:
                s.settle(key)
        assert s.contributors == 3
        assert s.incomplete == 0
        got = s.finalize()
        for name in SHAPES:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)


def test_incomplete_update_counts_only_where_it_arrived() -> None:
    base = _arrays(30)
    spec = ModelSpec.from_weights(base)
    complete = [(_arrays(31, 0.1), 10), (_arrays(32, 0.1), 30)]
    partial_arrays, partial_n = _arrays(33, 0.1), 20
    s = FedAvg(spec)
    s.init(base)
    for arrays, n in complete:
        s.fold(compression.encode_all(arrays), n)
    chunks = split_update(_update(partial_arrays, "x", partial_n), partial_arrays, _fp32, 9000)
    delivered = chunks[:-1]  # the last chunk never arrives
    for c in delivered:
        s.fold_part("x", c.tensors, partial_n)
    assert (s.contributors, s.incomplete) == (2, 1)
    got = s.finalize()
    mask = {n: np.zeros(int(np.prod(sh)), bool) for n, sh in SHAPES.items()}
    for c in delivered:
        for t in c.tensors:
            mask[t.name][t.offset:t.offset + t.span] = True
    for name, shape in SHAPES.items():
        num = sum(arr[name].astype(np.float64) * w for arr, w in complete)
        den = sum(w for _, w in complete)
        m = mask[name].reshape(shape)
        with_x = (num + partial_arrays[name] * partial_n) / (den + partial_n)
        expected = base[name] + np.where(m, with_x, num / den)
        np.testing.assert_allclose(got[name], expected.astype(np.float32), rtol=1e-6,
                                   atol=1e-7)
    assert m.any()
    assert not m.all()


def test_settle_refuses_an_update_that_does_not_cover_the_model() -> None:
    base = _arrays(40)
    s = FedAvg(ModelSpec.from_weights(base))
    s.init(base)
    arrays = _arrays(41)
    chunks = split_update(_update(arrays), arrays, _fp32, 9000)
    s.fold_part("k", chunks[0].tensors, 10)
    with pytest.raises(ValueError, match="covers"):
        s.settle("k")
