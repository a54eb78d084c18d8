"""[privacy] secure_aggregation: what it cannot work with is one config line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.config import load_aggregator
from fedmq.errors import ConfigError

ON = "[privacy]\nsecure_aggregation = true\n"

REFUSED = [
    ('[rounds]\nmode = "async"\nmin_updates = 2\n' + ON, 'works with [rounds] mode = "sync"'),
    ("[rounds]\nmin_updates = 1\nmax_updates = 4\n" + ON, "needs [rounds] min_updates >= 2"),
    ('[task]\nkind = "statistics"\ncolumns = ["t"]\nbins = [0.0, 1.0, 4]\n[rounds]\n'
     "min_updates = 2\nmax_updates = 4\n" + ON, 'applies to [task] kind = "train" only'),
]


@pytest.mark.parametrize(("text", "says"), REFUSED)
def test_refused_in_one_line(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_aggregator(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "[privacy] secure_aggregation = true" in message
    assert says in message
    assert "\n" not in message


def test_turned_on(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text("[rounds]\nmin_updates = 4\nmax_updates = 8\n" + ON)
    assert load_aggregator(path).privacy.secure_aggregation is True
