"""docker/: what can be checked without a Docker engine.

The compose file parses and wires the services to files that exist; the images install what
the design says (the agent never gets Numba); the mounted configs point at the compose broker.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _service(name: str) -> dict[str, Any]:
    service = _compose()["services"][name]
    assert isinstance(service, dict)
    return service


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (resolved against docker/) of each bind mount."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = (DOCKER / source).resolve()
    return mounts


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = (DOCKER / dockerfile).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def _pip_installs(dockerfile: str) -> list[str]:
    """The arguments of every `pip install` in the Dockerfile's RUN lines."""
    found = []
    for instruction, arguments in _instructions(dockerfile):
        if instruction == "RUN":
            for command in re.split(r"&&|;", arguments):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    found.extend(words[2:])
    return found


def test_compose_defines_the_four_services() -> None:
    default = {name for name, spec in _compose()["services"].items() if "profiles" not in spec}
    assert default == {"broker", "aggregator", "agent", "prometheus"}


# ---- profile `cluster`: 3 NATS nodes, a coordinator, two workers, agents (docs/scaling.md)

CLUSTER_SERVICES = {"nats-0", "nats-1", "nats-2", "coordinator", "worker-0", "worker-1",
                    "cluster-agent"}


def test_the_cluster_profile_holds_the_scale_out_services() -> None:
    profiled = {name for name, spec in _compose()["services"].items()
                if "cluster" in spec.get("profiles", [])}
    assert profiled == CLUSTER_SERVICES


@pytest.mark.parametrize("node", [0, 1, 2])
def test_each_nats_node_runs_its_rendered_config(node: int) -> None:
    from fedmq.nats_cluster import docker_node_configs

    spec = _service(f"nats-{node}")
    assert spec["command"] == ["nats-server", "--config", "/etc/nats/node.conf"]
    config = _mounts(spec)["/etc/nats/node.conf"]
    assert config == DOCKER / "nats" / f"n{node}.conf"
    # The file is the template rendered (behind a two-line header): re-render after editing it.
    body = config.read_text(encoding="utf-8").split("\n", 2)[2]
    assert body == docker_node_configs()[f"n{node}.conf"]
    assert "data" in " ".join(spec["volumes"])
    for port in spec["ports"]:
        assert str(port).startswith("127.0.0.1:"), port
        assert str(port).endswith(":1883"), port


def test_cluster_roles_load_and_fit_together() -> None:
    from fedmq.config import load_agent, load_aggregator
    from fedmq.nats_cluster import DOCKER_SHARDS

    nodes = {"nats-0", "nats-1", "nats-2"}
    mounted = {name: _mounts(_service(name))["/etc/fedmq/aggregator.toml"]
               for name in ("coordinator", "worker-0", "worker-1")}
    coordinator = load_aggregator(mounted["coordinator"])
    workers = [load_aggregator(mounted[f"worker-{k}"]) for k in (0, 1)]
    assert coordinator.cluster.role == "coordinator"
    assert coordinator.cluster.workers == [w.cluster.name for w in workers]
    assert {w.cluster.role for w in workers} == {"worker"}
    assert [w.cluster.shard for w in workers] == list(range(DOCKER_SHARDS["cluster"]))
    assert {w.cluster.shards for w in workers} == {DOCKER_SHARDS["cluster"]}
    agent = load_agent(_mounts(_service("cluster-agent"))["/etc/fedmq/agent.toml"],
                       device_id="d1")
    for federation, broker in [(c.federation, c.broker) for c in (coordinator, *workers)] + [
            (agent.federation, agent.broker)]:
        assert federation == "cluster"
        assert broker.host in nodes
        assert broker.port == 1883
        assert broker.mqtt5 is False  # NATS speaks MQTT 3.1.1 only
    for name in CLUSTER_SERVICES - nodes:
        assert set(_service(name)["depends_on"]) == nodes
    # Durable roles: the log and snapshots on a volume (a worker acknowledges after its log).
    for name, cfg in zip(mounted, (coordinator, *workers), strict=True):
        assert cfg.durability.state_dir == "/var/lib/fedmq/state"
        assert any(v.endswith("-state:/var/lib/fedmq") for v in _service(name)["volumes"])


@pytest.mark.parametrize(
    ("service", "words"),
    [("aggregator", ["fedmq", "aggregator"]), ("agent", ["fedmq", "agent"])],
)
def test_commands_run_fedmq_with_a_mounted_config(service: str, words: list[str]) -> None:
    spec = _service(service)
    command = spec["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[:2] == words
    config = command[command.index("--config") + 1]
    mounts = _mounts(spec)
    assert config in mounts, f"{config} is not mounted into {service}"
    assert mounts[config].is_file(), mounts[config]


@pytest.mark.parametrize("service", ["aggregator", "agent"])
def test_image_default_command_matches_compose(service: str) -> None:
    build = _service(service)["build"]
    # Compose resolves the context against the compose file's directory.
    assert (DOCKER / build["context"]).resolve() == REPO
    dockerfile = REPO / build["dockerfile"]
    assert dockerfile.is_file()
    cmd = [args for instruction, args in _instructions(dockerfile.name) if instruction == "CMD"]
    assert yaml.safe_load(cmd[-1]) == _service(service)["command"]


def test_agents_run_as_three_replicas() -> None:
    assert _service("agent")["deploy"]["replicas"] == 3


def test_broker_runs_mosquitto_2_with_the_docker_config() -> None:
    broker = _service("broker")
    assert broker["image"] == "eclipse-mosquitto:2"
    config = _mounts(broker)["/mosquitto/config/mosquitto.conf"]
    assert config == REPO / "fedmq" / "broker_config" / "docker.conf"
    # dev.conf would listen on the container's loopback, out of the other containers' reach
    listeners = [
        line.split() for line in config.read_text().splitlines() if line.startswith("listener")
    ]
    assert listeners == [["listener", "1883", "0.0.0.0"]]


@pytest.mark.parametrize("service", ["broker", "aggregator", "prometheus"])
def test_published_ports_stay_on_host_loopback(service: str) -> None:
    for port in _service(service).get("ports", []):
        assert str(port).startswith("127.0.0.1:"), port


def _metrics_port() -> int:
    """The port of the aggregator's ``[metrics] listen`` in docker/aggregator.toml."""
    host, _, port = _toml("aggregator.toml")["metrics"]["listen"].rpartition(":")
    assert host == "0.0.0.0", "other containers (prometheus) must reach the metrics port"
    return int(port)


def test_prometheus_scrapes_the_aggregators_metrics_port() -> None:
    prometheus = _service("prometheus")
    assert prometheus["image"].startswith("prom/prometheus:")
    config_path = _mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert config_path == DOCKER / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    targets = [target for job in config["scrape_configs"]
               for static in job["static_configs"] for target in static["targets"]]
    assert targets == [f"aggregator:{_metrics_port()}"]


def test_aggregator_health_check_gets_healthz_on_the_metrics_port() -> None:
    aggregator = _service("aggregator")
    test = aggregator["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]  # the image has Python, not curl
    assert f"http://127.0.0.1:{_metrics_port()}/healthz" in test[3]
    # The check is valid Python that fails (raises) on a 503.
    compile(test[3], "healthcheck", "exec")
    assert "urlopen" in test[3]
    published = [str(p).rsplit(":", 1)[-1] for p in aggregator.get("ports", [])]
    assert published == [str(_metrics_port())]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.aggregator", "Dockerfile.agent"])
def test_images_build_from_python_311_slim_and_copy_existing_files(dockerfile: str) -> None:
    instructions = _instructions(dockerfile)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    for instruction, arguments in instructions:
        if instruction == "COPY":
            *sources, _target = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile} copies missing {source}"
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users, f"{dockerfile} runs as root"
    assert users[-1] not in ("root", "0")


def test_aggregator_image_installs_the_aggregator_extra() -> None:
    assert ".[aggregator]" in _pip_installs("Dockerfile.aggregator")


def test_agent_image_installs_the_device_package_without_numba() -> None:
    installs = _pip_installs("Dockerfile.agent")
    assert "." in installs
    for requirement in installs:
        assert "[" not in requirement, f"agent image installs an extra: {requirement}"
        assert not requirement.lower().startswith("numba"), requirement


def test_pyproject_device_install_has_no_numba() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [dep for dep in project["dependencies"] if dep.lower().startswith("numba")]


def _toml(name: str) -> dict[str, Any]:
    return tomllib.loads((DOCKER / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["aggregator.toml", "agent.toml"])
def test_configs_point_at_the_compose_broker(name: str) -> None:
    config = _toml(name)
    assert config["broker"] == {"host": "broker", "port": 1883}
    assert config["federation"] == "demo"


def test_aggregator_quorum_fits_the_agent_count() -> None:
    rounds = _toml("aggregator.toml")["rounds"]
    replicas = _service("agent")["deploy"]["replicas"]
    assert 1 <= rounds["min_updates"] <= rounds["max_updates"] <= replicas


def test_agent_shards_cover_the_replicas() -> None:
    assert _toml("agent.toml")["data"]["num_shards"] == _service("agent")["deploy"]["replicas"]
