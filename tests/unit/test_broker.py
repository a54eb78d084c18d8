"""Config rendering and broker selection: no broker process is started here."""

from __future__ import annotations

import socket
from pathlib import Path

import conftest
import pytest

import fedmq.broker
from fedmq.broker import (
    BrokerConfigNotFoundError,
    BrokerHandle,
    default_config_dir,
    find_free_port,
    parse_external,
    render_config,
    start_broker,
)
from fedmq.errors import BrokerError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "template.conf"
    path.write_text(text, encoding="utf-8")
    return path


def _directives(config: str, key: str) -> list[str]:
    return [line for line in config.splitlines() if line.split(maxsplit=1)[:1] == [key]]


def test_listener_rewritten_and_everything_else_kept(tmp_path: Path) -> None:
    template = _write(
        tmp_path,
        "# listener 1 in a comment is not a listener\n"
        "listener 1883 0.0.0.0\n"
        "cafile /etc/ca.crt\n"
        "allow_anonymous false\n",
    )
    rendered = render_config(template, 45678, host="127.0.0.2")
    assert rendered.splitlines() == [
        "# listener 1 in a comment is not a listener",
        "listener 45678 127.0.0.2",
        "cafile /etc/ca.crt",
        "allow_anonymous false",
    ]


def test_listener_without_address_gets_one(tmp_path: Path) -> None:
    rendered = render_config(_write(tmp_path, "  listener 8883\n"), 40001)
    assert _directives(rendered, "listener") == ["listener 40001 127.0.0.1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("allow_anonymous true\n", "found 0", id="no-listener"),
        pytest.param("listener 1883\nlistener 8883\n", "line 1, line 2", id="two-listeners"),
        pytest.param("port 1883\nlistener 8883\n", "legacy", id="legacy-port"),
        pytest.param("bind_address 0.0.0.0\nlistener 1\n", "legacy", id="legacy-bind-address"),
    ],
)
def test_templates_that_would_bind_other_ports_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_config(_write(tmp_path, text), 40000)


def test_data_dir_and_user_replace_existing_lines(tmp_path: Path) -> None:
    template = _write(
        tmp_path,
        "listener 1883\npersistence true\n"
        "persistence_location /var/lib/mosquitto/\nuser mosquitto\n",
    )
    rendered = render_config(template, 40000, data_dir=tmp_path / "data", user="alice")
    assert _directives(rendered, "persistence_location") == [
        f"persistence_location {(tmp_path / 'data').as_posix()}/"
    ]
    assert _directives(rendered, "user") == ["user alice"]
    assert _directives(rendered, "persistence") == ["persistence true"]


def test_without_data_dir_persistence_location_is_kept(tmp_path: Path) -> None:
    template = _write(tmp_path, "listener 1883\npersistence_location /srv/mq/\n")
    assert _directives(render_config(template, 1), "persistence_location") == [
        "persistence_location /srv/mq/"
    ]


def test_missing_template_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        render_config(tmp_path / "nope.conf", 40000)
    with pytest.raises(BrokerError):
        render_config(tmp_path / "nope.conf", 40000)


def test_config_dir_ships_the_documented_files() -> None:
    config_dir = default_config_dir()
    for name in ("dev.conf", "production.conf", "docker.conf", "acl.template", "README.md"):
        assert (config_dir / name).is_file(), name


@pytest.mark.parametrize("name", ["dev.conf", "production.conf", "docker.conf"])
def test_shipped_configs_render(name: str) -> None:
    rendered = render_config(default_config_dir() / name, 40000)
    assert _directives(rendered, "listener") == ["listener 40000 127.0.0.1"]


def test_dev_conf_is_loopback_anonymous_and_in_memory() -> None:
    text = (default_config_dir() / "dev.conf").read_text(encoding="utf-8")
    assert _directives(text, "listener") == ["listener 1883 127.0.0.1"]
    assert _directives(text, "allow_anonymous") == ["allow_anonymous true"]
    assert _directives(text, "persistence") == ["persistence false"]
    assert _directives(text, "log_dest") == ["log_dest stderr"]


def test_production_conf_is_tls_authenticated_and_persistent() -> None:
    text = (default_config_dir() / "production.conf").read_text(encoding="utf-8")
    assert _directives(text, "listener")[0].startswith("listener 8883")
    for key, value in [
        ("allow_anonymous", "false"),
        ("use_username_as_clientid", "true"),
        ("persistence", "true"),
    ]:
        assert _directives(text, key) == [f"{key} {value}"]
    for key in ("cafile", "certfile", "keyfile", "password_file", "acl_file", "max_packet_size"):
        assert len(_directives(text, key)) == 1, key


def test_config_dir_error_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the package data were missing: no broker_config/ inside the package.
    monkeypatch.setattr(fedmq.broker, "__file__", str(tmp_path / "fedmq" / "broker.py"))
    with pytest.raises(BrokerConfigNotFoundError,
                       match=str(tmp_path / "fedmq" / "broker_config")) as info:
        default_config_dir()
    assert isinstance(info.value, FileNotFoundError)


def test_find_free_port_can_be_bound() -> None:
    port = find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("localhost:1883", ("localhost", 1883)),
        ("10.0.0.5:8883", ("10.0.0.5", 8883)),
        ("[::1]:1884", ("::1", 1884)),
    ],
)
def test_parse_external(spec: str, expected: tuple[str, int]) -> None:
    assert parse_external(spec) == expected


@pytest.mark.parametrize("spec", ["localhost", ":1883", "host:", "host:http", "host:70000", "mqt"])
def test_parse_external_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_external(spec)


def test_external_spec_starts_nothing() -> None:
    with start_broker("broker.example:1883") as handle:
        assert handle == BrokerHandle("broker.example", 1883, "external", mqtt5=True)
        assert handle.address == "broker.example:1883"


def test_ipv6_address_is_bracketed() -> None:
    assert BrokerHandle("::1", 1883, "external", mqtt5=True).address == "[::1]:1883"


def test_missing_mosquitto_skips_locally_but_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conftest, "mosquitto_binary", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI never skips"):
        conftest.require_mosquitto()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install mosquitto"):
        conftest.require_mosquitto()
