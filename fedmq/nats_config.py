"""The NATS nodes' configs: the shipped template (``fedmq/broker_config/nats/``) rendered for
one node, the subject mapping that shards a federation's updates, and the docker compose cluster's
configs. Pure text: no processes (``fedmq.nats_cluster`` runs the nodes)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmq.topics import PREFIX, check_name

__all__ = ["DOCKER_NODES", "DOCKER_SHARDS", "NodeSpec", "default_template",
           "docker_node_configs", "render_node_config", "shard_mappings", "shard_subject"]

_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
_CLUSTER_BLOCK = re.compile(r"^cluster \{\n.*?^\}\n", re.MULTILINE | re.DOTALL)


def default_template() -> Path:
    """The shipped node template (package data)."""
    return Path(__file__).resolve().parent / "broker_config" / "nats" / "node.conf.template"


def shard_mappings(shards: Mapping[str, int]) -> dict[str, str]:
    """NATS subject mappings that deliver ``fedmq/v1/FED/update/DEV`` on
    ``fedmq/v1/FED/shard/K/update/DEV``, K = ``{{partition(N, 1)}}`` of the device token."""
    prefix = PREFIX.replace("/", ".")
    out: dict[str, str] = {}
    for federation, n in shards.items():
        check_name(federation, "federation")
        if "." in federation:
            # The gateway turns '.' into '//' in subjects; a mapping on such a name would have
            # to spell that, and nothing needs it.
            raise ValueError(f"a sharded federation's name cannot contain '.': {federation!r}")
        if not 1 <= n <= 1024:
            raise ValueError(f"shards for {federation!r} must be 1..1024, got {n}")
        out[f"{prefix}.{federation}.update.*"] = (
            f"{prefix}.{federation}.shard.{{{{partition({n},1)}}}}.update.{{{{wildcard(1)}}}}")
    return out


@dataclass(frozen=True)
class NodeSpec:
    """One node's name, addresses and store: everything that differs between nodes."""

    name: str
    host: str
    client_port: int
    cluster_port: int
    http_port: int
    mqtt_port: int
    store_dir: str
    #: Where MQTT listens, if not ``host`` (docker: every interface for MQTT).
    mqtt_host: str | None = None


def _quote(value: str) -> str:
    return json.dumps(value)  # a NATS config string is a JSON string


def render_node_config(
    template: Path,
    node: NodeSpec,
    routes: Sequence[str],
    *,
    max_payload: int,
    mappings: Mapping[str, str] | None = None,
) -> str:
    """The config of ``node``: ``template`` with its ``@NAME@`` placeholders filled in.

    ``routes`` are ``host:port`` of every node's cluster listener (this one's included); with
    fewer than two the node runs alone, without the cluster block.
    Raises ``ValueError`` if a placeholder is left over or ``max_payload`` is out of NATS's range.
    """
    if not 1 <= max_payload <= 64 * 1024 * 1024:
        raise ValueError(f"max_payload must be 1 B .. 64 MiB (NATS's limit), got {max_payload}")
    text = template.read_text(encoding="utf-8")
    values = {
        "SERVER_NAME": node.name,
        "HOST": node.host,
        "MQTT_HOST": node.mqtt_host or node.host,
        "CLIENT_PORT": str(node.client_port),
        "CLUSTER_PORT": str(node.cluster_port),
        "HTTP_PORT": str(node.http_port),
        "MQTT_PORT": str(node.mqtt_port),
        "STORE_DIR": node.store_dir.replace("\\", "/"),
        "MAX_PAYLOAD": str(max_payload),
        "ROUTES": "\n".join(f"    nats-route://{route}" for route in routes),
        "MAPPINGS": "\n".join(f"  {_quote(src)}: {_quote(dst)}"
                              for src, dst in (mappings or {}).items()),
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    if len(routes) < 2:
        # A lone node with a cluster block waits forever for peers to form its meta layer.
        text = _CLUSTER_BLOCK.sub("# (one node: no cluster block)\n", text)
    left = _PLACEHOLDER.findall("\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    if left:
        raise ValueError(f"{template}: unknown placeholders {sorted(set(left))}")
    return text


def shard_subject(federation: str, shard: int, device_id: str) -> str:
    """The NATS subject of a sharded update (``.`` of the device id as ``//``), for nats-py."""
    from fedmq.sharding import mqtt_level_to_nats_token

    return (f"{PREFIX.replace('/', '.')}.{federation}.shard.{shard}.update."
            f"{mqtt_level_to_nats_token(device_id)}")


#: docker/compose.yaml's cluster profile: service ``nats-{i}`` runs ``docker/nats/n{i}.conf``.
DOCKER_NODES = 3
DOCKER_SHARDS = {"cluster": 2}


def docker_node_configs(nodes: int = DOCKER_NODES,
                        shards: Mapping[str, int] | None = None) -> dict[str, str]:
    """The configs of the compose cluster (``n0.conf`` -> text): every listener on all of the
    container's interfaces at NATS's standard ports, routes by service name, the store in
    ``/data`` (a volume). ``docker/nats/`` holds them rendered; a test keeps them in step."""
    routes = [f"nats-{i}:6222" for i in range(nodes)]
    mappings = shard_mappings(DOCKER_SHARDS if shards is None else shards)
    return {
        f"n{i}.conf": render_node_config(
            default_template(),
            NodeSpec(name=f"n{i}", host="0.0.0.0", client_port=4222, cluster_port=6222,
                     http_port=8222, mqtt_port=1883, store_dir="/data"),
            routes, max_payload=8 * 1024 * 1024, mappings=mappings)
        for i in range(nodes)
    }
