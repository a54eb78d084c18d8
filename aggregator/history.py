"""A bounded history of published models on the aggregator's disk, so an operator can roll back.

One file per model version, ``model-000042.msgpack``: exactly the ``GlobalModel`` message the
aggregator publishes (``fedmq.codec.encode`` of the whole, unchunked model), so any msgpack reader
can decode it with docs/protocol.md. Each file is written durably (a temporary file, fsync,
``os.replace``, fsync of the directory) and the directory is then pruned to the newest ``keep``
versions. ``load`` decodes a version and checks its sha256; ``export_npz`` writes its weights as the
``.npz`` that ``[model] path`` in aggregator.toml loads, which is the rollback path
(docs/operations.md, "Model history and rollback").

A new line of models: when the aggregator saves version *v* while the directory already holds a
version >= *v* that is not an identical copy of this model (same version, same sha256), those files
come from an earlier run (a rollback restarted the numbering, or a fresh start). They are moved,
not deleted, to ``superseded-<UTC time>/`` (same layout, readable with ``--dir``); the newest
``keep_superseded`` such directories are kept. Saving an identical copy of a version (a restart
re-publishing the model it had) just rewrites it.

Pure file I/O and numpy: msgpack only through ``fedmq.codec``.

CLI: ``python -m aggregator.history list --dir DIR`` and
``python -m aggregator.history export --dir DIR [--version N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from fedmq import codec
from fedmq.compression import decode_all
from fedmq.durable import atomic_write, fsync_dir
from fedmq.errors import DecodeError, FedmqError
from fedmq.wire import GlobalModel, model_digest

log = logging.getLogger(__name__)

__all__ = ["HistoryError", "ModelHistory", "main"]

_MODEL_RE = re.compile(r"model-(\d+)\.msgpack")
_TMP_RE = re.compile(r"\.model-\d+\.msgpack\.\d+\.tmp")
_SUPERSEDED_PREFIX = "superseded-"

F32 = npt.NDArray[np.float32]



class HistoryError(FedmqError):
    """A model version is missing from the history or its file is damaged."""



def _write_durably(path: Path, data: bytes | None = None,
                   arrays: Mapping[str, F32] | None = None) -> None:
    """Write ``data`` (or an .npz of ``arrays``) to ``path`` atomically and durably."""

    def write(f: BinaryIO) -> None:
        if data is not None:
            f.write(data)
        if arrays is not None:
            _write_npz(f, arrays)

    atomic_write(path, write)


def _write_npz(f: BinaryIO, arrays: Mapping[str, F32]) -> None:
    """An .npz exactly like ``np.savez`` writes, in the order given, for any array names.

    ``np.savez(f, **arrays)`` would collide with its own keyword arguments (a tensor named
    ``file`` or ``allow_pickle``), so the zip members are written here directly.
    """
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(a), allow_pickle=False)


class ModelHistory:
    """The newest ``keep`` published models, one durable file per version, in ``directory``."""

    def __init__(self, directory: Path | str, keep: int, *, keep_superseded: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive number of versions; got {keep!r}")
        if isinstance(keep_superseded, bool) or not isinstance(keep_superseded, int) or (
                keep_superseded < 0):
            raise ValueError(f"keep_superseded must be >= 0; got {keep_superseded!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.keep_superseded = keep_superseded

    # ---------------------------------------------------------------- reading

    def path(self, version: int) -> Path:
        """The file that holds ``version`` (whether or not it exists)."""
        return self.directory / f"model-{version:06d}.msgpack"

    def eval_path(self, version: int) -> Path:
        """The small JSON file beside ``version`` with its federated evaluation (``eval_*``).

        Kept apart from the model file: the evaluation arrives after the version was published
        and is rewritten as reports come in, and a model file may be large.
        """
        return self.directory / f"model-{version:06d}.eval.json"

    def stored_eval(self, version: int) -> dict[str, float]:
        """``version``'s federated evaluation, or {} (none yet, or an unreadable file)."""
        try:
            raw = json.loads(self.eval_path(version).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.eval_path(version), exc)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): float(v) for k, v in raw.items()
                if isinstance(v, int | float) and not isinstance(v, bool)}

    def versions(self) -> list[int]:
        """The versions on disk, oldest first (temporary and unrelated files are ignored)."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            m = _MODEL_RE.fullmatch(entry.name)
            if m and entry.is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def load(self, version: int) -> GlobalModel:
        """Decode ``version`` and check it: raises ``HistoryError`` if missing or damaged."""
        path = self.path(version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            have = self.versions()
            held = (f"it holds versions {', '.join(map(str, have))}" if have
                    else "it holds no versions")
            raise HistoryError(
                f"model version {version} is not in the history at {self.directory} ({held}; "
                "older ones were pruned): choose one that `list` shows") from None
        except OSError as exc:
            raise HistoryError(f"cannot read {path}: {exc}") from None
        # Written by this aggregator, so sized by the file: a model may be larger than any
        # single MQTT message and hold more tensors than the network default allows.
        limits = codec.DecodeLimits(max_payload_bytes=max(len(data), 1), max_tensors=1 << 16,
                                    max_elements=1 << 40)
        try:
            model = codec.decode_as(data, GlobalModel, limits)
        except DecodeError as exc:
            raise HistoryError(f"{path} is damaged and cannot be decoded ({exc}): roll back to "
                               "another version") from None
        if model.chunks != 1 or model.chunk is not None:
            raise HistoryError(f"{path} holds one chunk of a model, not a whole model: roll "
                               "back to another version")
        if model.version != version:
            raise HistoryError(f"{path} holds model version {model.version}, not {version}: "
                               "the file was renamed or damaged; roll back to another version")
        digest = model_digest(model.tensors)
        if digest != model.sha256:
            raise HistoryError(f"{path} is damaged: its tensors hash to sha256 {digest[:16]}…, "
                               f"the model says {model.sha256[:16]}…; roll back to another "
                               "version")
        evaluated = self.stored_eval(version)
        # The metrics as published, plus the devices' evaluation of this version once known.
        return dataclasses.replace(model, metrics=dict(model.metrics) | evaluated)

    def export_npz(self, version: int, path: Path | str) -> Path:
        """Write ``version``'s weights to ``path`` as an .npz, tensors in order (float32).

        That file is what ``[model] path`` in aggregator.toml loads as the initial model.
        """
        model = self.load(version)
        try:
            weights = decode_all(model.tensors)
        except ValueError as exc:
            raise HistoryError(f"{self.path(version)}: cannot decode the tensors ({exc})") from None
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_durably(out, arrays={name: np.asarray(a, dtype=np.float32)
                                    for name, a in weights.items()})
        return out

    # ---------------------------------------------------------------- writing

    def save(self, model: GlobalModel) -> Path:
        """Write the whole ``model`` durably as its version's file, then prune; returns the file.

        Call it with the unchunked model (before ``split_model``). Raises ``ValueError`` for a
        chunk or a model whose sha256 does not match its tensors, ``OSError`` if the disk fails.
        """
        if model.chunks != 1 or model.chunk is not None:
            raise ValueError("save the whole model, not a chunk: call save before split_model")
        if model.version < 0:
            raise ValueError(f"model version must be >= 0; got {model.version}")
        if model_digest(model.tensors) != model.sha256:
            raise ValueError(f"model version {model.version}: sha256 does not match its tensors")
        data = codec.encode(model)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._supersede_newer(model)
        path = self.path(model.version)
        _write_durably(path, data)
        self._prune()
        return path

    def save_eval(self, version: int, metrics: Mapping[str, float]) -> bool:
        """Store ``version``'s federated evaluation beside it (durably); False if the version
        is not (or no longer) in the history."""
        if not self.path(version).is_file():
            return False
        _write_durably(self.eval_path(version), json.dumps(dict(metrics), sort_keys=True)
                       .encode())
        return True

    def _supersede_newer(self, model: GlobalModel) -> None:
        """Move files of an earlier line of models (versions >= this one) out of the way."""
        stale = [v for v in self.versions() if v >= model.version]
        if stale and stale[0] == model.version and self._same_model(model):
            stale.pop(0)  # a restart re-publishing the model it had: just rewrite it
        if not stale:
            return
        target = self._new_superseded_dir()
        for v in stale:
            os.replace(self.path(v), target / self.path(v).name)
            if self.eval_path(v).exists():
                os.replace(self.eval_path(v), target / self.eval_path(v).name)
        fsync_dir(target)
        fsync_dir(self.directory)
        log.warning("model history %s: saving version %d, but versions %s of an earlier run were "
                    "there (a rollback or a fresh start restarted the numbering); moved them to %s",
                    self.directory, model.version, ", ".join(map(str, stale)), target)
        old = self.superseded()
        for p in old[:max(len(old) - self.keep_superseded, 0)]:
            shutil.rmtree(p, ignore_errors=True)

    def _same_model(self, model: GlobalModel) -> bool:
        try:
            return self.load(model.version).sha256 == model.sha256
        except HistoryError:
            return False

    def superseded(self) -> list[Path]:
        """Directories holding the models of earlier runs, oldest first (same file layout)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.is_dir() and p.name.startswith(_SUPERSEDED_PREFIX))

    def _new_superseded_dir(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for i in range(1000):
            target = self.directory / f"{_SUPERSEDED_PREFIX}{stamp}{f'-{i}' if i else ''}"
            try:
                target.mkdir()
            except FileExistsError:
                continue
            return target
        raise OSError(f"cannot create a superseded-* directory in {self.directory}")

    def _prune(self) -> None:
        """Keep the newest ``keep`` versions; remove temporary files left by a crash."""
        removed = False
        for v in self.versions()[:-self.keep]:
            self.path(v).unlink(missing_ok=True)
            self.eval_path(v).unlink(missing_ok=True)
            removed = True
        for entry in self.directory.iterdir():
            # Only this aggregator writes here, and its own temporary file is renamed by now.
            if _TMP_RE.fullmatch(entry.name):
                entry.unlink(missing_ok=True)
                removed = True
        if removed:
            fsync_dir(self.directory)


# ---------------------------------------------------------------- CLI


def _cmd_list(history: ModelHistory) -> int:
    versions = history.versions()
    if not versions:
        print(f"no model versions in {history.directory}: is it the aggregator's history "
              "directory?", file=sys.stderr)
        return 1
    damaged = 0
    print(f"{'version':>8}  {'round':>6}  {'created (UTC)':<20}  {'sha256':<16}  "
          f"{'bytes':>10}  metrics")
    for v in versions:
        try:
            size = history.path(v).stat().st_size
        except FileNotFoundError:
            continue  # pruned by the running aggregator while listing
        try:
            m = history.load(v)
        except HistoryError as exc:
            damaged += 1
            print(f"{v:>8}  DAMAGED: {exc}")
            continue
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(m.created))
        metrics = " ".join(f"{k}={val:.4g}" for k, val in sorted(m.metrics.items()))
        print(f"{v:>8}  {m.round:>6}  {created:<20}  {m.sha256[:16]:<16}  {size:>10}  {metrics}")
    for p in history.superseded():
        print(f"(models of an earlier run, before the numbering restarted: --dir {p})")
    if damaged:
        print(f"{damaged} damaged version(s): do not roll back to those", file=sys.stderr)
        return 1
    return 0


def _cmd_export(history: ModelHistory, version: int | None, out: str | None) -> int:
    if version is None:
        versions = history.versions()
        if not versions:
            raise HistoryError(f"no model versions in {history.directory}: is it the "
                               "aggregator's history directory?")
        version = versions[-1]
    path = Path(out) if out else Path(f"model-{version:06d}.npz")
    written = history.export_npz(version, path)
    print(f"exported model version {version} to {written}; to roll back, stop the aggregator, "
          f"set `path = \"{written.resolve()}\"` under [model] in aggregator.toml and start it "
          "again (docs/operations.md)")
    return 0


DESCRIPTION = ("List the aggregator's saved models, or export one as an .npz for [model] path "
               "(rollback).")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m aggregator.history``."""
    p = argparse.ArgumentParser(prog="python -m aggregator.history", description=DESCRIPTION)
    add_commands(p)
    return p


def add_commands(p: argparse.ArgumentParser) -> None:
    """Add ``list`` and ``export`` to ``p`` (this module's parser, or ``fedmq history``)."""
    sub = p.add_subparsers(dest="history_command", metavar="{list,export}", required=True)
    ls = sub.add_parser("list", help="list the saved versions (checks each sha256)")
    ls.add_argument("--dir", required=True, help="the aggregator's model history directory")
    ex = sub.add_parser("export", help="write one version's weights as an .npz")
    ex.add_argument("--dir", required=True, help="the aggregator's model history directory")
    ex.add_argument("--version", type=int, default=None, help="version to export (default: newest)")
    ex.add_argument("--out", default=None,
                    help="the .npz to write (default: model-NNNNNN.npz here)")


def main(argv: Sequence[str] | None = None) -> int:
    """``list`` / ``export``; returns the exit status (0 ok, 1 nothing or damaged, 2 error)."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``list`` / ``export`` command (see ``main``)."""
    history = ModelHistory(Path(args.dir), keep=1)  # keep only matters to save
    try:
        if args.history_command == "list":
            return _cmd_list(history)
        return _cmd_export(history, args.version, args.out)
    except (FedmqError, OSError) as exc:
        print(f"history {args.history_command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
