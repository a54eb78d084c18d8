"""fedmq.sharding and the NATS node configs, without a broker (the engine check is
tests/cluster/test_nats_engine.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.nats_cluster import NodeSpec, default_template, render_node_config, shard_mappings
from fedmq.sharding import mqtt_level_to_nats_token, shard_filter, shard_of, shard_topic


@pytest.mark.parametrize(
    ("device", "n", "expected"),
    # Read off a running nats-server 2.15.1 ({{partition(4,1)}}): '.' is hashed as '//'.
    [("dev1", 4, 3), ("dev-2", 4, 3), ("a_b", 4, 1), ("x.y", 4, 0), ("zz", 4, 1),
     ("off1", 4, 1), ("off2", 4, 0), ("q.r", 4, 0)],
)
def test_shard_of_matches_values_read_from_the_engine(device: str, n: int, expected: int) -> None:
    assert shard_of(device, n) == expected


def test_dots_are_hashed_as_the_gateway_spells_them() -> None:
    assert mqtt_level_to_nats_token("a.b.c") == "a//b//c"
    # FNV-1a of "x.y" mod 4 is 2; the engine routes x.y to shard 0, the hash of "x//y".
    assert shard_of("x.y", 4) == 0


def test_one_shard_takes_everything_and_zero_is_refused() -> None:
    assert {shard_of(f"d{i}", 1) for i in range(50)} == {0}
    with pytest.raises(ValueError, match=">= 1"):
        shard_of("d", 0)


def test_topics() -> None:
    assert shard_topic("digits", 3, "d.1") == "fedmq/v1/digits/shard/3/update/d.1"
    assert shard_filter("digits", 0) == "fedmq/v1/digits/shard/0/update/+"


def test_mappings_and_their_limits() -> None:
    assert shard_mappings({"digits": 4}) == {
        "fedmq.v1.digits.update.*":
            "fedmq.v1.digits.shard.{{partition(4,1)}}.update.{{wildcard(1)}}"}
    with pytest.raises(ValueError, match=r"cannot contain '\.'"):
        shard_mappings({"a.b": 2})
    with pytest.raises(ValueError, match=r"1\.\.1024"):
        shard_mappings({"digits": 0})


def test_a_rendered_node_config_has_no_placeholder_left(tmp_path: Path) -> None:
    node = NodeSpec("n1", "127.0.0.1", 4223, 6223, 8223, 1884, str(tmp_path / "store"))
    text = render_node_config(default_template(), node, ["127.0.0.1:6222", "127.0.0.1:6223"],
                              max_payload=8 * 1024 * 1024, mappings=shard_mappings({"f": 2}))
    assert "server_name: n1" in text
    assert "listen: 127.0.0.1:1884" in text
    assert "nats-route://127.0.0.1:6222" in text
    assert f'store_dir: "{tmp_path / "store"}"' in text
    assert '"fedmq.v1.f.update.*"' in text
    with pytest.raises(ValueError, match="64 MiB"):
        render_node_config(default_template(), node, [], max_payload=65 * 1024 * 1024)
