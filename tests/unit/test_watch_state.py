"""`fedmq watch`: the FleetView built from decoded messages (pure), and the screen drawn."""

from __future__ import annotations

import argparse

import pytest

from fedmq import codec
from fedmq.topics import Topics
from fedmq.watch import add_arguments, parse_broker, watched_topics
from fedmq.watch_render import ColumnChart, Link, ago, duration, size, snapshot
from fedmq.watch_state import FleetView
from fedmq.wire import (
    DeviceStatus,
    GlobalModel,
    ModelEvaluation,
    RoundAnnouncement,
    RoundProgress,
    RoundSummary,
)

FED = "fleet"
T = Topics(FED)
NOW = 1_700_000_000.0
RUN = 42


def announce(round_: int, *, base: int | None = None, deadline: float = NOW + 30,
             open_: bool = True, run: int = RUN) -> RoundAnnouncement:
    return RoundAnnouncement(FED, round_, round_ - 1 if base is None else base, "sha", deadline,
                             3, 5, open=open_, run=run)


def progress(round_: int, accepted: int, rejected: dict[str, int] | None = None, *,
             deadline: float = NOW + 30, run: int = RUN) -> RoundProgress:
    return RoundProgress(FED, round_, round_ - 1, accepted, 3, 5, deadline, rejected or {},
                         run=run)


def model(version: int, metrics: dict[str, float] | None = None, *, run: int = RUN
          ) -> GlobalModel:
    return GlobalModel(FED, version, version, (), "sha", metrics=metrics or {}, created=NOW,
                       run=run)


def summary(round_: int, rejected: dict[str, int] | None = None, **metrics: float
            ) -> RoundSummary:
    return RoundSummary(FED, round_, round_, 3, "max_updates", rejected=rejected or {},
                        bytes_in=1000 * round_, duration_s=2.5, metrics=metrics)


def evaluation(version: int, accuracy: float, loss: float = 1.0, devices: int = 4, *,
               run: int = RUN) -> ModelEvaluation:
    return ModelEvaluation(FED, version, devices, 100, {
        "eval_accuracy": accuracy, "eval_loss": loss, "eval_examples": 100.0,
        "eval_devices": float(devices)}, run=run)


def status(device: str, state: str, ts: float = 0.0) -> DeviceStatus:
    return DeviceStatus(FED, device, state, ts=ts)


@pytest.fixture
def view() -> FleetView:
    return FleetView(FED, now=NOW)


# ---------------------------------------------------------------- the round in progress


def test_round_comes_from_the_announcement_then_the_progress(view: FleetView) -> None:
    assert not view.has_data
    assert view.apply(T.round, announce(3), NOW)
    r = view.round
    assert r is not None
    assert (r.round, r.base_version, r.min_updates, r.max_updates, r.accepted) == (3, 2, 3, 5,
                                                                                    None)
    assert view.apply(T.progress, progress(3, 2, {"stale_round": 1}, deadline=NOW + 40), NOW)
    assert (r.accepted, r.rejected, r.deadline) == (2, {"stale_round": 1}, NOW + 40)
    assert view.seconds_left(NOW + 10) == 30
    assert view.has_data
    assert view.last_message == NOW


def test_progress_before_its_announcement_opens_the_round(view: FleetView) -> None:
    view.apply(T.progress, progress(4, 1), NOW)
    view.apply(T.round, announce(4, deadline=NOW + 99), NOW)
    assert view.round is not None
    assert (view.round.round, view.round.accepted, view.round.deadline) == (4, 1, NOW + 99)


def test_a_new_round_forgets_the_old_counts_and_old_rounds_are_ignored(
        view: FleetView) -> None:
    view.apply(T.round, announce(3), NOW)
    view.apply(T.progress, progress(3, 3, {"late": 2}), NOW)
    view.apply(T.round, announce(4), NOW)
    assert view.round is not None
    assert (view.round.round, view.round.accepted, view.round.rejected) == (4, None, {})
    assert not view.apply(T.progress, progress(3, 5), NOW)  # a late progress of round 3
    assert not view.apply(T.round, announce(2), NOW)
    assert view.round.round == 4
    assert view.round.accepted is None


def test_a_progress_without_deadline_keeps_the_announced_one(view: FleetView) -> None:
    view.apply(T.round, announce(2, deadline=NOW + 50), NOW)
    view.apply(T.progress, progress(2, 1, deadline=0.0), NOW)
    assert view.seconds_left(NOW) == 50
    fresh = FleetView(FED, now=NOW)
    fresh.apply(T.progress, progress(2, 1, deadline=0.0), NOW)
    assert fresh.seconds_left(NOW) is None
    text = snapshot(fresh, Link("b:1", True), NOW, width=80, height=24)
    assert "no deadline announced" in text


def test_an_ended_federation_has_no_deadline(view: FleetView) -> None:
    view.apply(T.round, announce(5), NOW)
    view.apply(T.round, announce(5, open_=False), NOW)
    assert view.round is not None
    assert not view.round.open
    assert view.seconds_left(NOW) is None


# ---------------------------------------------------------------- devices


def test_devices_live_status_uses_our_clock_retained_uses_its_ts(view: FleetView) -> None:
    view.apply(T.status("b"), status("b", "online", ts=NOW - 500), NOW, retained=True)
    view.apply(T.status("a"), status("a", "training", ts=NOW - 999), NOW + 5)
    view.apply(T.status("c"), status("c", "offline"), NOW, retained=True)
    assert view.devices["b"].last_seen == NOW - 500
    assert view.devices["a"].last_seen == NOW + 5  # a device's clock may be off
    assert view.devices["c"].last_seen is None  # no ts given
    assert [d.device_id for d in view.devices_ordered()] == ["a", "b", "c"]
    assert view.device_counts() == {"training": 1, "online": 1, "offline": 1}
    view.apply(T.status("a"), status("a", "offline"), NOW + 6)
    assert view.device_counts()["offline"] == 2


def test_a_device_status_counts_its_refused_forgeries(view: FleetView) -> None:
    counts = {"unsigned": 2, "bad_signature": 1, "wrong_part": 3, "old_model": 9,
              "not_selected": 4}
    view.handle(T.status("a"), codec.encode(DeviceStatus(FED, "a", "online", ignored=counts)),
                NOW)
    assert view.devices["a"].refused == 6  # old_model and not_selected are routine
    pytest.importorskip("rich")
    from fedmq.watch_render import _device_line

    assert _device_line(view.devices["a"], NOW)[1].plain == "online 6 refused"
    view.handle(T.status("b"), codec.encode(status("b", "online")), NOW)
    assert _device_line(view.devices["b"], NOW)[1].plain == "online"


def test_a_status_on_another_device_topic_is_ignored(view: FleetView) -> None:
    assert not view.apply(T.status("mallory"), status("alice", "online"), NOW)
    assert not view.devices
    assert view.ignored["wrong_topic"] == 1


def test_a_cleared_retained_status_removes_the_device(view: FleetView) -> None:
    view.handle(T.status("a"), codec.encode(status("a", "online")), NOW)
    assert "a" in view.devices
    assert view.handle(T.status("a"), b"", NOW)
    assert not view.devices


# ---------------------------------------------------------------- versions and metrics


def test_eval_metrics_win_over_train_and_say_so(view: FleetView) -> None:
    view.apply(T.model, model(1, {"train_accuracy": 0.7, "train_loss": 0.9,
                                  "participants": 3.0}), NOW)
    info = view.versions[1]
    assert info.metric("accuracy") == (0.7, "train")
    assert info.participants == 3
    view.apply(T.model_eval, evaluation(1, 0.65, 1.1, devices=2), NOW)
    assert info.metric("accuracy") == (0.65, "eval")
    assert info.metric("loss") == (1.1, "eval")
    assert info.eval_devices == 2
    view.apply(T.model_eval, evaluation(1, 0.66, 1.0, devices=5), NOW)  # more reports came in
    assert info.metric("accuracy") == (0.66, "eval")
    assert info.eval_devices == 5


def test_series_mix_sources_per_version(view: FleetView) -> None:
    for v in (0, 1, 2):
        view.apply(T.model, model(v, {"train_accuracy": 0.5 + v / 10} if v else {}), NOW)
    view.apply(T.model_eval, evaluation(0, 0.1), NOW)
    view.apply(T.model_eval, evaluation(1, 0.55), NOW)
    assert view.series("accuracy") == [(0, 0.1, "eval"), (1, 0.55, "eval"), (2, 0.7, "train")]
    assert view.series("loss") == [(0, 1.0, "eval"), (1, 1.0, "eval")]
    assert [i.version for i in view.latest_versions(2)] == [1, 2]
    assert view.latest_versions(0) == []


def test_a_model_carrying_eval_metrics_counts_as_evaluated(view: FleetView) -> None:
    view.apply(T.model, model(2, {"train_accuracy": 0.8, "eval_accuracy": 0.75,
                                  "eval_devices": 3.0, "bytes_in": 5000.0}), NOW)
    assert view.versions[2].metric("accuracy") == (0.75, "eval")
    assert view.versions[2].bytes_in == 5000
    assert "eval_accuracy" not in view.versions[2].train


def test_non_finite_metrics_are_skipped(view: FleetView) -> None:
    view.apply(T.model, model(1, {"train_accuracy": 0.5, "eval_accuracy": float("nan")}), NOW)
    assert view.versions[1].metric("accuracy") == (0.5, "train")


def test_summaries_fill_versions_and_count_rejections_once(view: FleetView) -> None:
    view.apply(T.metrics, summary(1, {"late": 2}, train_loss=0.4), NOW)
    assert not view.apply(T.metrics, summary(1, {"late": 2}), NOW)  # QoS 1 duplicate
    view.apply(T.metrics, summary(2, {"late": 1, "norm_too_large": 1}), NOW)
    info = view.versions[2]
    assert (info.round, info.participants, info.bytes_in, info.duration_s) == (2, 3, 2000, 2.5)
    assert view.versions[1].metric("loss") == (0.4, "train")
    assert view.rejected() == {"late": 3, "norm_too_large": 1}
    assert [s.round for s in view.summaries] == [1, 2]


def test_rejections_add_the_open_rounds_progress_until_its_summary(view: FleetView) -> None:
    view.apply(T.metrics, summary(1, {"late": 2}), NOW)
    view.apply(T.round, announce(2), NOW)
    view.apply(T.progress, progress(2, 1, {"late": 1, "malformed": 4}), NOW)
    assert view.rejected() == {"late": 3, "malformed": 4}
    # Round 2 closes: its summary holds the same counts, which must not be added twice.
    view.apply(T.metrics, summary(2, {"late": 1, "malformed": 4}), NOW)
    assert view.rejected() == {"late": 3, "malformed": 4}


def test_old_versions_are_dropped_beyond_keep() -> None:
    view = FleetView(FED, now=NOW, keep_versions=3)
    for v in range(6):
        view.apply(T.model, model(v), NOW)
    assert sorted(view.versions) == [3, 4, 5]


# ---------------------------------------------------------------- runs, federations, bytes


def test_a_newer_run_replaces_what_is_shown_and_older_runs_are_stale(view: FleetView) -> None:
    view.apply(T.model, model(7, {"train_accuracy": 0.9}), NOW)
    view.apply(T.round, announce(8), NOW)
    view.apply(T.metrics, summary(7), NOW)
    # A rollback: the aggregator starts a new run at version 0 and round 1.
    view.apply(T.round, announce(1, run=RUN + 1), NOW)
    assert view.run == RUN + 1
    assert view.new_runs == 1
    assert not view.versions
    assert not view.summaries
    assert view.round is not None
    assert view.round.round == 1
    assert not view.apply(T.model_eval, evaluation(7, 0.9), NOW)  # retained from the old run
    assert view.ignored["stale_run"] == 1
    assert view.apply(T.model, model(0, run=0), NOW)  # no run given: accepted as is


def test_foreign_federation_and_garbage_are_counted_not_applied(view: FleetView) -> None:
    other = RoundAnnouncement("other", 1, 0, "sha", NOW, 1, 1)
    assert not view.apply(T.round, other, NOW)
    assert not view.handle(T.round, b"\x93not msgpack", NOW)
    assert not view.apply(T.model, announce(1), NOW)  # the right federation, the wrong topic
    assert view.ignored == {"wrong_federation": 1, "undecodable": 1, "wrong_topic": 1}
    assert not view.has_data


def test_handle_decodes_what_the_aggregator_publishes(view: FleetView) -> None:
    assert view.handle(T.progress, codec.encode(progress(2, 1)), NOW)
    assert view.handle(T.model_eval, codec.encode(evaluation(1, 0.5)), NOW)
    assert view.round is not None
    assert view.round.accepted == 1
    assert view.versions[1].metric("accuracy") == (0.5, "eval")


# ---------------------------------------------------------------- command line


def test_broker_addresses() -> None:
    assert parse_broker("mqtt.example.com:8883") == ("mqtt.example.com", 8883)
    assert parse_broker("localhost") == ("localhost", 1883)
    assert parse_broker("[::1]:1884") == ("::1", 1884)
    for bad in ("host:", ":1883", "host:port", "host:70000", "[::1", "a:b:c"):
        with pytest.raises(ValueError, match="--broker"):
            parse_broker(bad)


def test_watch_reads_only_what_apps_may_read() -> None:
    topics = watched_topics(T)
    assert f"{T.base}/metrics/eval" in topics
    assert f"{T.base}/metrics/progress" in topics
    assert T.statuses in topics
    assert T.model in topics
    assert not any("update" in t or "part" in t or "#" in t for t in topics)


def test_credentials_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_USERNAME", "viewer")
    monkeypatch.setenv("FEDMQ_PASSWORD", "s3cret")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--federation", FED])
    assert (args.username, args.password, args.broker) == ("viewer", "s3cret", "127.0.0.1:1883")


# ---------------------------------------------------------------- the screen


def test_formatters() -> None:
    assert [ago(None), ago(3), ago(300), ago(7200), ago(3 * 86400)] == [
        "—", "3 s ago", "5 min ago", "2 h ago", "3 d ago"]
    assert [duration(12), duration(-185), duration(7260)] == ["12 s", "3 min 05 s",
                                                              "2 h 01 min"]
    assert [size(None), size(812), size(1234), size(987_600), size(3_400_000)] == [
        "—", "812 B", "1.2 kB", "988 kB", "3.4 MB"]


def test_column_chart_draws_eval_solid_and_train_shaded() -> None:
    chart = ColumnChart([(1, 0.0, "eval"), (2, 0.5, "eval"), (3, 1.0, "train")],
                        label=lambda v: f"{v:.0%}", lo=0.0, hi=1.0, empty="none")
    lines = chart.text(width=20, height=5).plain.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("100%┤")
    assert lines[3].startswith("  0%┤")
    assert lines[-1].split() == ["v", "1", "2", "3"]
    # The full train bar is shaded in every row; the half eval bar fills the lower half.
    assert all("▒▒" in line for line in lines[:4])
    assert "██" in lines[3]
    assert "██" not in lines[0]
    assert ColumnChart([], label=str, lo=0, hi=1, empty="none").text(20, 5).plain == "none"


def test_column_chart_keeps_the_newest_versions_that_fit() -> None:
    points = [(v, 0.5, "eval") for v in range(100, 140)]
    chart = ColumnChart(points, label=lambda v: f"{v:.0%}", lo=0.0, hi=1.0,  # type: ignore[arg-type]
                        empty="")
    last = chart.text(width=35, height=4).plain.splitlines()[-1]
    assert "139" in last
    assert "100" not in last


def busy_view() -> FleetView:
    view = FleetView(FED, now=NOW - 60)
    for i in range(12):
        view.apply(T.status(f"dev-{i:02d}"), status(f"dev-{i:02d}", ("online", "training",
                                                                     "offline")[i % 3]), NOW)
    for v in range(1, 6):
        view.apply(T.model, model(v, {"train_accuracy": 0.5 + v / 20, "train_loss": 1 / v,
                                      "participants": 3.0}), NOW)
        view.apply(T.metrics, summary(v, {"late": 1}), NOW)
        if v < 5:
            view.apply(T.model_eval, evaluation(v, 0.4 + v / 10, 2 / v), NOW)
    view.apply(T.round, announce(6), NOW)
    view.apply(T.progress, progress(6, 2, {"malformed": 1}), NOW)
    return view


@pytest.mark.parametrize(("width", "height"), [(80, 24), (100, 30), (120, 40)])
def test_screen_shows_round_devices_and_accuracy(width: int, height: int) -> None:
    text = snapshot(busy_view(), Link("broker:1883", True, started=NOW - 60), NOW,
                    width=width, height=height)
    lines = text.splitlines()
    assert len(lines) == height
    assert max(len(line) for line in lines) <= width
    assert FED in lines[0]
    assert "broker:1883" in lines[0]
    assert "● connected" in lines[0]
    assert "Round 6" in text
    assert "2/3 updates" in text
    assert "deadline in 30 s" in text
    assert "rejected: malformed 1" in text
    assert "dev-01" in text
    assert "training" in text
    if height >= 40:  # the devices row grows with the fleet on a tall screen
        assert "○ dev-11" in text
    else:
        assert "more (" in text
    assert "80.0% █" in text  # v4, evaluated by the devices
    assert "75.0% ▒" in text  # v5, only its training accuracy so far
    assert "100%┤" in text
    assert "late" in text
    assert "malformed" in text
    assert "r5→v5" in text or "round 5 → v5" in text
    if width >= 110:
        assert "Loss" in text
        assert "bytes" in text
        assert "5.0 kB" in text


def test_waiting_screen_says_what_it_waits_for() -> None:
    view = FleetView(FED, now=NOW)
    refused = Link("127.0.0.1:1", False, error="cannot reach 127.0.0.1:1: connection refused",
                   log_line="waiting for the broker at 127.0.0.1:1 (connection refused); "
                            "retrying with back-off", log_time=NOW - 1, started=NOW - 2)
    text = snapshot(view, refused, NOW, width=100, height=20)
    assert f"waiting for fedmq/v1/{FED}/round on 127.0.0.1:1" in text
    assert "connection refused" in text
    assert "○ cannot reach" in text
    assert "waiting for the broker at 127.0.0.1:1" in text.splitlines()[-1]
    quiet = Link("127.0.0.1:1883", True, started=NOW - 10)
    text = snapshot(view, quiet, NOW, width=100, height=20)
    assert "is the aggregator running, and is the federation name right?" in text
