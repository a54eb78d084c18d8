"""aggregator.history: durable per-version files, pruning, damage detection, .npz export, CLI."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from aggregator.history import HistoryError, ModelHistory, main
from fedmq import codec
from fedmq.compression import decode_all, encode_all
from fedmq.wire import GlobalModel, model_digest

F32 = npt.NDArray[np.float32]


def weights(seed: int) -> dict[str, F32]:
    rng = np.random.default_rng(seed)
    return {
        "dense0.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "dense0.bias": rng.standard_normal(3).astype(np.float32),
        # A name np.savez(file, **arrays) would choke on: the export must not.
        "file": rng.standard_normal((2, 2, 2)).astype(np.float32),
    }


def make_model(version: int, seed: int | None = None, codec_name: str = "fp32",
               created: float = 1_700_000_000.0) -> GlobalModel:
    tensors = encode_all(weights(version if seed is None else seed), codec_name)
    return GlobalModel(federation="fed", version=version, round=version, tensors=tensors,
                       sha256=model_digest(tensors), metrics={"loss": 0.5, "participants": 3.0},
                       created=created)


def test_save_load_round_trip(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path / "hist", keep=5)
    model = make_model(42)
    path = h.save(model)
    assert path == tmp_path / "hist" / "model-000042.msgpack"
    assert path.read_bytes() == codec.encode(model)  # exactly the wire message
    assert h.versions() == [42]
    assert h.load(42) == model


def test_versions_of_missing_directory_is_empty(tmp_path: Path) -> None:
    assert ModelHistory(tmp_path / "nothing", keep=3).versions() == []


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=3)
    for v in range(1, 8):
        h.save(make_model(v))
    assert h.versions() == [5, 6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-000005.msgpack", "model-000006.msgpack", "model-000007.msgpack"]
    for v in (5, 6, 7):
        assert h.load(v) == make_model(v)


def test_versions_sort_numerically_past_six_digits(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=2)
    for v in (999_998, 999_999, 1_000_000):
        h.save(make_model(v))
    assert h.versions() == [999_999, 1_000_000]


def test_missing_version_is_a_clear_error(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=2)
    with pytest.raises(HistoryError, match="holds no versions"):
        h.load(1)
    h.save(make_model(1))
    h.save(make_model(2))
    with pytest.raises(HistoryError, match=r"version 7 is not in the history.*versions 1, 2"):
        h.load(7)


def test_flipped_byte_is_detected_by_sha256(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=2)
    model = make_model(3)
    path = h.save(model)
    data = bytearray(path.read_bytes())
    tail = model.tensors[-1].data[-4:]
    at = bytes(data).rindex(tail)
    data[at] ^= 0x40  # inside the last tensor's float32 data: still decodes
    path.write_bytes(bytes(data))
    with pytest.raises(HistoryError, match="damaged: its tensors hash to sha256"):
        h.load(3)


def test_truncated_file_is_detected_by_the_decoder(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=2)
    path = h.save(make_model(3))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(HistoryError, match="damaged and cannot be decoded"):
        h.load(3)


def test_renamed_file_is_detected(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=2)
    h.save(make_model(3)).rename(h.path(4))
    with pytest.raises(HistoryError, match="holds model version 3, not 4"):
        h.load(4)


def test_leftover_tmp_file_is_ignored_then_cleaned(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=3)
    h.save(make_model(1))
    tmp = tmp_path / ".model-000002.msgpack.12345.tmp"
    tmp.write_bytes(b"half a model")  # a crash in the middle of a save
    (tmp_path / "notes.txt").write_text("operator notes")
    assert h.versions() == [1]
    assert h.load(1) == make_model(1)
    h.save(make_model(2))
    assert not tmp.exists()
    assert (tmp_path / "notes.txt").exists()
    assert h.versions() == [1, 2]


def test_failed_write_leaves_no_tmp_and_the_old_versions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = ModelHistory(tmp_path, keep=3)
    h.save(make_model(1))

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        h.save(make_model(2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-000001.msgpack"]


def test_save_fsyncs_the_file_and_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                      else False)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ModelHistory(tmp_path, keep=2).save(make_model(1))
    assert len(synced) >= 2
    if os.path.exists("/proc/self/fd"):
        assert synced[0] is False  # the file's data first
        assert True in synced[1:]  # then the directory that holds the new name


def test_save_rejects_chunks_and_bad_digests(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=2)
    model = make_model(1)
    with pytest.raises(ValueError, match="not a chunk"):
        h.save(dataclasses.replace(model, chunks=2, chunk=0))
    with pytest.raises(ValueError, match="sha256 does not match"):
        h.save(dataclasses.replace(model, sha256="0" * 64))
    assert h.versions() == []


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be"):
        ModelHistory(tmp_path, keep=0)


def test_export_npz_loads_back_as_the_model_in_order(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path / "hist", keep=2)
    model = make_model(5)
    h.save(model)
    out = h.export_npz(5, tmp_path / "out" / "rollback.npz")
    assert out == tmp_path / "out" / "rollback.npz"
    # What aggregator.service.initial_weights does with [model] path:
    with np.load(out, allow_pickle=False) as data:
        loaded = {name: data[name] for name in data.files}
    assert list(loaded) == [t.name for t in model.tensors]
    for name, a in weights(5).items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], a)
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())


def test_exported_fp32_model_republishes_with_the_same_sha256(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=2)
    model = make_model(7)
    h.save(model)
    out = h.export_npz(7, tmp_path / "m.npz")
    with np.load(out, allow_pickle=False) as data:  # as initial_weights loads it
        loaded = {n: np.ascontiguousarray(data[n], dtype=np.float32) for n in data.files}
    assert model_digest(encode_all(loaded)) == model.sha256


def test_export_npz_decodes_lossy_codecs(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=2)
    model = make_model(1, codec_name="fp16")
    h.save(model)
    out = h.export_npz(1, tmp_path / "m.npz")
    with np.load(out, allow_pickle=False) as data:
        for name, a in decode_all(model.tensors).items():
            np.testing.assert_array_equal(data[name], a)


def test_identical_republish_rewrites_in_place(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=5)
    for v in (1, 2, 3):
        h.save(make_model(v))
    h.save(make_model(3, created=1_800_000_000.0))  # a restart re-publishing what it had
    h.save(make_model(2))  # a replay of an identical older version: the newer one moves aside
    assert h.versions() == [1, 2]
    assert len(h.superseded()) == 1
    assert ModelHistory(h.superseded()[0], keep=5).versions() == [3]


def test_restarted_numbering_moves_the_earlier_run_aside(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=3)
    for v in range(1, 6):
        h.save(make_model(v))
    rolled_back = make_model(0, seed=4)  # version 4's weights, published again as version 0
    h.save(rolled_back)
    assert h.versions() == [0]
    assert h.load(0) == rolled_back
    [old] = h.superseded()
    earlier = ModelHistory(old, keep=3)
    assert earlier.versions() == [3, 4, 5]
    assert earlier.load(4) == make_model(4)
    h.save(make_model(1, seed=99))
    assert h.versions() == [0, 1]


def test_superseded_directories_are_bounded(tmp_path: Path) -> None:
    h = ModelHistory(tmp_path, keep=2, keep_superseded=2)
    for run in range(4):
        h.save(make_model(1, seed=100 + run))
        h.save(make_model(2, seed=200 + run))
    assert len(h.superseded()) == 2
    assert h.load(2) == make_model(2, seed=203)


# ---------------------------------------------------------------- CLI


def test_cli_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = ModelHistory(tmp_path, keep=5)
    for v in (1, 2, 3):
        h.save(make_model(v))
    assert main(["list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert rows[2][3] == make_model(3).sha256[:16]
    assert "loss=0.5" in out


def test_cli_list_flags_damaged_versions(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    h = ModelHistory(tmp_path, keep=5)
    h.save(make_model(1))
    h.save(make_model(2)).write_bytes(b"\x00garbage")
    assert main(["list", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "2  DAMAGED" in captured.out
    assert "do not roll back" in captured.err


def test_cli_list_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--dir", str(tmp_path / "none")]) == 1
    assert "no model versions" in capsys.readouterr().err


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    hist = tmp_path / "hist"
    h = ModelHistory(hist, keep=5)
    for v in (1, 2, 3):
        h.save(make_model(v))
    out = tmp_path / "v2.npz"
    assert main(["export", "--dir", str(hist), "--version", "2", "--out", str(out)]) == 0
    assert "[model]" in capsys.readouterr().out
    with np.load(out) as data:
        np.testing.assert_array_equal(data["dense0.weight"], weights(2)["dense0.weight"])
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--dir", str(hist)]) == 0  # newest, into the working directory
    with np.load(tmp_path / "model-000003.npz") as data:
        np.testing.assert_array_equal(data["file"], weights(3)["file"])


def test_cli_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = ModelHistory(tmp_path, keep=5)
    assert main(["export", "--dir", str(tmp_path)]) == 2
    assert "no model versions" in capsys.readouterr().err
    h.save(make_model(1))
    assert main(["export", "--dir", str(tmp_path), "--version", "9",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "version 9 is not in the history" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
