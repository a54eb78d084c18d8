"""fedmq.topics: name validation, topic strings, and device ids read back from (hostile) topics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.topics import PREFIX, Topics, check_name

NAMES = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)

VALID_NAMES = ["a", "demo", "sensor-07", "A.b_c-9", "x" * 64, "0", "-", "..", "_"]
INVALID_NAMES = [
    "", "x" * 65, "a/b", "/", "+", "#", "a+b", "sensor#1", "$SYS", "a b", " a", "a\tb", "\x00",
    "é", "名", "sensor\u200b07", "a\nb",
]
# A regex `$` would also match before a final newline: the pattern must match the whole name.
TRAILING_NEWLINE = pytest.param("dev\n", id="trailing-newline")


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert check_name(name, "device id") == name


@pytest.mark.parametrize("name", [*INVALID_NAMES, TRAILING_NEWLINE])
def test_invalid_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(ValueError, match="1-64 characters") as info:
        check_name(name, "device id")
    assert str(info.value).startswith("device id ")


@pytest.mark.parametrize("name", [*INVALID_NAMES, TRAILING_NEWLINE])
def test_invalid_names_cannot_become_topics(name: str) -> None:
    with pytest.raises(ValueError, match="federation"):
        Topics(name)
    topics = Topics("demo")
    with pytest.raises(ValueError, match="device id"):
        topics.update(name)
    with pytest.raises(ValueError, match="device id"):
        topics.status(name)


def test_topic_strings() -> None:
    t = Topics("demo")
    assert PREFIX == "fedmq/v1"
    assert t.base == "fedmq/v1/demo"
    assert t.round == "fedmq/v1/demo/round"
    assert t.model == "fedmq/v1/demo/model"
    assert t.metrics == "fedmq/v1/demo/metrics"
    assert t.updates == "fedmq/v1/demo/update/+"
    assert t.statuses == "fedmq/v1/demo/status/+"
    assert t.update("sensor-07") == "fedmq/v1/demo/update/sensor-07"
    assert t.status("sensor-07") == "fedmq/v1/demo/status/sensor-07"


@pytest.mark.parametrize("topic", [
    "fedmq/v1/demo/update/sensor-07",
    "fedmq/v1/demo/status/sensor-07",
])
def test_device_of_reads_update_and_status_topics(topic: str) -> None:
    assert Topics("demo").device_of(topic) == "sensor-07"


HOSTILE_TOPICS = [
    pytest.param("", id="empty"),
    pytest.param("fedmq/v1/demo/round", id="round-topic"),
    pytest.param("fedmq/v1/demo/model", id="model-topic"),
    pytest.param("fedmq/v1/demo/metrics", id="metrics-topic"),
    pytest.param("fedmq/v1/demo/partial/w1", id="partial-topic"),
    pytest.param("fedmq/v1/demo/update", id="no-device-level"),
    pytest.param("fedmq/v1/demo/Update/s1", id="wrong-case-kind"),
    pytest.param("fedmq/v1/demo/model/s1", id="device-under-model"),
    pytest.param("fedmq/v1/other/update/s1", id="other-federation"),
    pytest.param("fedmq/v1/demo-x/update/s1", id="federation-with-suffix"),
    pytest.param("fedmq/v1/dem/update/s1", id="federation-prefix"),
    pytest.param("fedmq/v1/DEMO/update/s1", id="federation-wrong-case"),
    pytest.param("fedmq/v2/demo/update/s1", id="other-version"),
    pytest.param("FEDMQ/v1/demo/update/s1", id="prefix-wrong-case"),
    pytest.param("/fedmq/v1/demo/update/s1", id="leading-slash"),
    pytest.param("fedmq/v1/demo/update/s1/", id="trailing-slash"),
    pytest.param("fedmq/v1/demo/update/s1/extra", id="extra-level"),
    pytest.param("fedmq/v1/demo/update/s1/../s2", id="dot-dot-levels"),
    pytest.param("fedmq/v1/demo//update/s1", id="empty-middle-level"),
    pytest.param("fedmq//v1/demo/update/s1", id="empty-prefix-level"),
    pytest.param("$share/fedmq/fedmq/v1/demo/update/s1", id="shared-subscription-filter"),
    pytest.param("fedmq/v1/demo/update/s1\x00/x", id="nul-then-level"),
    pytest.param("/".join(["fedmq", "v1", "demo", "update"] + ["s"] * 10_000), id="very-deep"),
]
# The device level must itself be a valid name (`update/+` also matches an empty level).
BAD_DEVICE_LEVEL = [
    pytest.param(topic, id=name)
    for name, topic in [
        ("empty-device", "fedmq/v1/demo/update/"),
        ("plus-wildcard", "fedmq/v1/demo/update/+"),
        ("hash-wildcard", "fedmq/v1/demo/status/#"),
        ("space", "fedmq/v1/demo/update/a b"),
        ("non-ascii", "fedmq/v1/demo/update/é"),
        ("nul", "fedmq/v1/demo/update/s1\x00"),
        ("too-long", "fedmq/v1/demo/update/" + "x" * 65),
    ]
]


@pytest.mark.parametrize("topic", [*HOSTILE_TOPICS, *BAD_DEVICE_LEVEL])
def test_device_of_refuses_other_topics(topic: str) -> None:
    assert Topics("demo").device_of(topic) is None


def test_federation_dot_is_not_a_pattern() -> None:
    assert Topics("a.b").device_of("fedmq/v1/aXb/update/s1") is None
    assert Topics("a.b").device_of("fedmq/v1/a.b/update/s1") == "s1"


@given(NAMES, NAMES)
def test_device_of_inverts_update_and_status(federation: str, device: str) -> None:
    t = Topics(federation)
    assert t.device_of(t.update(device)) == device
    assert t.device_of(t.status(device)) == device
    assert t.device_of(f"{t.base}/round/{device}") is None


@given(NAMES, NAMES, NAMES)
def test_device_of_ignores_other_federations(federation: str, other: str, device: str) -> None:
    if other != federation:
        assert Topics(federation).device_of(Topics(other).update(device)) is None
