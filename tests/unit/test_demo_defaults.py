"""The demo's defaults are the config's: what the demo shows is what a deployment gets."""

from __future__ import annotations

from fedmq.cli import build_parser
from fedmq.config import BrokerConfig, CompressionConfig
from fedmq.demo import demo_config


def test_the_demos_top_k_fraction_is_the_configs() -> None:
    args = build_parser().parse_args(["demo", "--codec", "topk"])
    config = demo_config(args, BrokerConfig(), layers=[64, 32, 10], shard_sizes=[100])
    assert config.compression.fraction == CompressionConfig().fraction
    assert config.compression.codec == "topk"
    # Given on the command line, it is the demo's own.
    args = build_parser().parse_args(["demo", "--codec", "topk", "--topk-fraction", "0.25"])
    config = demo_config(args, BrokerConfig(), layers=[64, 32, 10], shard_sizes=[100])
    assert config.compression.fraction == 0.25
