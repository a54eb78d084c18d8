"""`fedmq report`: the model history the aggregator keeps, drawn into a PNG by the real command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from aggregator.history import ModelHistory
from fedmq.compression import encode_all
from fedmq.wire import GlobalModel, model_digest

FED = "reported"


def save_versions(directory: Path, versions: range, *, evaluated: bool = True,
                  traffic: bool = True) -> None:
    """Models as the aggregator saves them: train_* and participants (and bytes_in) from the
    round, eval_* once devices reported (the newest version not yet)."""
    history = ModelHistory(directory, keep=50)
    tensors = encode_all({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    for v in versions:
        metrics: dict[str, float] = {}
        if v:
            metrics = {"train_loss": 2.0 / (v + 1), "train_accuracy": min(0.5 + v / 20, 0.97),
                       "participants": float(2 + v % 3)}
            if traffic:
                metrics["bytes_in"] = 40_000.0 * (2 + v % 3)
        if evaluated and v < versions[-1]:
            metrics |= {"eval_loss": 2.2 / (v + 1), "eval_accuracy": 0.4 + v / 20,
                        "eval_examples": 300.0, "eval_devices": 3.0}
        history.save(GlobalModel(FED, v, v, tensors, model_digest(tensors), metrics=metrics,
                                 created=1.7e9 + v))


def fedmq(*args: str, block_matplotlib: bool = False) -> subprocess.CompletedProcess[str]:
    prelude = "import sys; sys.modules['matplotlib'] = None; " if block_matplotlib else ""
    code = f"{prelude}from fedmq.cli import main; sys.exit(main({list(args)!r}))"
    if not block_matplotlib:
        code = "import sys; " + code
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)


def test_report_draws_every_panel_into_a_png(tmp_path: Path) -> None:
    from matplotlib import image

    save_versions(tmp_path / "state" / "models", range(8))
    out = tmp_path / "out" / "report.png"
    # The aggregator's state_dir is accepted too: the history is its models/ directory.
    done = fedmq("report", "--history", str(tmp_path / "state"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out} (8 versions)"
    assert done.stderr == ""
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(out)
    assert pixels.shape[:2] == (800, 1200)
    rgb = np.round(pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    # Not blank: white background, black text and axes, and the series' colours.
    assert len(colours) > 50
    assert counts.max() < 0.9 * len(rgb)
    blue = ((rgb[:, 2] > 150) & (rgb[:, 0] < 80)).sum()  # tab:blue lines and bars
    orange = ((rgb[:, 0] > 200) & (rgb[:, 1] > 100) & (rgb[:, 1] < 160)
              & (rgb[:, 2] < 80)).sum()  # tab:orange: train lines and the bytes bars
    assert blue > 1000
    assert orange > 1000


def test_missing_metrics_are_panels_saying_no_data(tmp_path: Path) -> None:
    save_versions(tmp_path, range(3), evaluated=False, traffic=False)
    out = tmp_path / "r.png"
    done = fedmq("report", "--history", str(tmp_path), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "(3 versions)" in done.stdout
    assert out.stat().st_size > 10_000


def test_empty_history_and_missing_extra_are_one_line_exit_2(tmp_path: Path) -> None:
    done = fedmq("report", "--history", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "does not exist" in done.stderr
    assert "state_dir/models" in done.stderr
    assert not (Path.cwd() / "report.png").exists() or done.stdout == ""
    (tmp_path / "empty").mkdir()
    done = fedmq("report", "--history", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "x.png"))
    assert done.returncode == 2
    assert "holds no model versions" in done.stderr
    done = fedmq("report", "--history", str(tmp_path), block_matplotlib=True)
    assert done.returncode == 2
    assert done.stderr == "fedmq report needs the plot extra: pip install 'fedmq[plot]'\n"
