"""The screen of ``fedmq watch``: a ``FleetView`` drawn with rich (the ``watch`` extra).

Imported only by ``fedmq.watch.run`` once it has checked that rich is installed, so the core
package never needs it. ``render`` returns one renderable that fills the console: a header, the
round in progress beside the devices, accuracy and loss per version (text bar charts) beside a
table of the last versions, and the rejections beside the last rounds. Every panel sizes its
content to the space it gets, so the same screen works at 80x24 and at 120x40. Glyphs, not only
colours, carry the meaning, so a plain-text capture (``tmux capture-pane -p``) reads the same.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from rich.align import Align
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fedmq.watch_state import Device, FleetView, MetricName, Source

__all__ = ["ColumnChart", "Link", "ago", "duration", "full_screen", "print_screen", "render",
           "size", "snapshot"]

#: Partial blocks, in eighths of a cell, bottom-aligned.
_EIGHTHS = " ▁▂▃▄▅▆▇█"
#: A version the devices have not evaluated (yet) is drawn with the updates' training metric.
_TRAIN_GLYPH = "▒"
_STATE_STYLE = {"training": "bold cyan", "online": "green", "offline": "red"}
_STATE_DOT = {"training": "◆", "online": "●", "offline": "○"}
_BORDER = "grey50"


@dataclass(frozen=True)
class Link:
    """The connection as the watcher's transport reports it."""

    address: str
    connected: bool
    #: Why the last connection attempt failed (the transport's ``last_error``).
    error: str | None = None
    #: The last warning the transport logged, and when (unix time).
    log_line: str | None = None
    log_time: float | None = None
    #: When the watcher started (unix time).
    started: float = 0.0


# ---------------------------------------------------------------- small formatters


def ago(seconds: float | None) -> str:
    """``3 s ago``, ``4 min ago``, ``2 h ago``; ``—`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = max(seconds, 0.0)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 48 * 3600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


def duration(seconds: float) -> str:
    """``12 s``, ``3 min 05 s``, ``2 h 01 min``."""
    s = round(abs(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def size(n: int | None) -> str:
    """Bytes as ``812 B``, ``1.2 kB``, ``3.4 MB``."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # unreachable: the loop returns at GB


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _pct(v: float) -> str:
    return f"{v:.1%}"


# ---------------------------------------------------------------- a chart in text


class ColumnChart:
    """One bar per model version, as tall as the metric, in the space rich gives it.

    Evaluated versions are solid bars in eighths of a cell; versions known only by their
    training metric are shaded (``▒``). The newest versions that fit are shown.
    """

    def __init__(self, points: Sequence[tuple[int, float, Source]], *,
                 label: Callable[[float], str], lo: float, hi: float, empty: str) -> None:
        self.points = list(points)
        self.label = label
        self.lo = lo
        self.hi = hi if hi > lo else lo + 1.0
        self.empty = empty

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or 8
        yield self.text(options.max_width, height)

    def text(self, width: int, height: int) -> Text:
        """The chart drawn in ``width`` x ``height`` cells."""
        if not self.points:
            return Text(self.empty, style="dim")
        rows = max(height - 1, 2)  # the last line holds the version numbers
        marks = [self.label(self.hi), self.label((self.lo + self.hi) / 2), self.label(self.lo)]
        axis = max(len(m) for m in marks)
        # Bars two cells wide and a gap; one cell wide when that shows more versions.
        slot = 3 if len(self.points) <= (width - axis - 1) // 3 else 2
        fit = max((width - axis - 1) // slot, 1)
        points = self.points[-fit:]
        out = Text(no_wrap=True, overflow="crop")
        for i in range(rows):
            from_bottom = rows - 1 - i
            mark = {0: marks[0], rows // 2: marks[1], rows - 1: marks[2]}.get(i, "")
            out.append(f"{mark:>{axis}}", style="dim")
            out.append("┤" if mark else "│", style="dim")
            for _, value, source in points:
                out.append(self._cell(value, source, from_bottom, rows) * (slot - 1),
                           style="green" if source == "eval" else "yellow")
                out.append(" ")
            out.append("\n")
        out.append(" " * (axis - 1) + "v ", style="dim")
        out.append(self._version_labels([v for v, _, _ in points], slot), style="dim")
        return out

    def _cell(self, value: float, source: Source, from_bottom: int, rows: int) -> str:
        """One cell of a bar ``from_bottom`` rows above the axis."""
        frac = min(max((value - self.lo) / (self.hi - self.lo), 0.0), 1.0)
        eighths = round(frac * rows * 8)
        if value > self.lo and eighths == 0:
            eighths = 1  # a value above the axis never vanishes
        level = eighths - from_bottom * 8
        if source == "train":
            return _TRAIN_GLYPH if level >= 4 else " "
        return _EIGHTHS[min(max(level, 0), 8)]

    @staticmethod
    def _version_labels(versions: list[int], slot: int) -> str:
        """Each version under its bar, from the newest back, skipping those that would touch
        their right neighbour's label."""
        line = [" "] * (len(versions) * slot + 4)
        limit = len(line)
        for j in range(len(versions) - 1, -1, -1):
            label, at = str(versions[j]), j * slot
            if at + len(label) < limit:
                line[at:at + len(label)] = label
                limit = at
        return "".join(line).rstrip()


def _range(values: list[float], name: MetricName) -> tuple[float, float]:
    """Axis range: accuracy up to 100 % from a round tenth below the lowest value; loss from 0
    to a round value above the highest."""
    if name == "accuracy":
        lo = max(math.floor(min(values) * 10) / 10 - 0.1, 0.0) if values else 0.0
        return lo, 1.0
    top = max(values, default=1.0)
    if top <= 0:
        return 0.0, 1.0
    step = 10 ** math.floor(math.log10(top))
    for m in (1, 2, 2.5, 5, 10):
        if m * step >= top:
            return 0.0, m * step
    return 0.0, 10 * step  # unreachable: 10 * step > top


# ---------------------------------------------------------------- a renderable sized by rich


class _Fit:
    """Calls ``build(width, height)`` with the space rich gives (the height a Layout region
    or a Panel passes down), so lists can say "… and 12 more" instead of being cut off."""

    def __init__(self, build: Callable[[int, int], RenderableType]) -> None:
        self.build = build

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(options.max_width, options.height or 10)


def _panel(body: RenderableType, title: str | Text) -> Panel:
    return Panel(body, title=title, title_align="left", border_style=_BORDER, padding=(0, 1))


# ---------------------------------------------------------------- the panels


def _header(view: FleetView, link: Link, now: float, width: int) -> Text:
    left = Text.assemble(("fedmq watch", "bold"), " · ", (view.federation, "bold"),
                         f" · {link.address} · ")
    if link.connected:
        left.append("● connected", style="green")
    else:
        left.append("○ " + (link.error or "connecting"), style="bold red")
    right = Text()
    if view.last_message is not None:
        right.append(f"last message {ago(now - view.last_message)}  ", style="dim")
    right.append(clock(now), style="bold")
    if left.cell_len + right.cell_len + 2 > width:
        right = Text(clock(now), style="bold")
    left.truncate(max(width - right.cell_len - 1, 0), overflow="ellipsis")
    left.append(" " * (width - left.cell_len - right.cell_len))
    left.append_text(right)
    left.no_wrap = True
    return left


def _footer(view: FleetView, link: Link, now: float) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    recent = link.log_time is not None and now - link.log_time < 60
    if link.log_line and (recent or not link.connected):
        text.append(f"{clock(link.log_time or now)} {link.log_line}", style="yellow")
        return text
    text.append("Ctrl-C quits", style="dim")
    if view.new_runs:
        text.append(f" · the aggregator restarted its numbering {view.new_runs}x (new run)",
                    style="dim")
    if view.ignored:
        parts = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in sorted(view.ignored.items()))
        text.append(f" · ignored: {parts}", style="dim")
    return text


def _waiting(view: FleetView, link: Link, now: float) -> Panel:
    lines = Text(justify="center")
    lines.append(f"waiting for {view.topics.round} on {link.address} …\n\n", style="bold")
    if not link.connected:
        lines.append(f"{link.error or f'connecting to {link.address}'}; retrying\n",
                     style="bold red")
    elif now - link.started > 3:
        lines.append("connected, but nothing is retained for this federation yet:\n"
                     "is the aggregator running, and is the federation name right?\n",
                     style="yellow")
    else:
        lines.append("connected; reading the retained round, model and statuses\n",
                     style="green")
    lines.append(f"\nwatching {view.topics.base}/{{round,model,metrics,metrics/eval,"
                 "metrics/progress,status/+}", style="dim")
    return Panel(Align.center(lines, vertical="middle"), title="fedmq watch",
                 border_style=_BORDER)


def _bar(done: int, total: int, width: int) -> Text:
    width = max(width, 4)
    filled = min(round(width * done / total), width) if total > 0 else 0
    style = "green" if total and done >= total else "cyan"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "grey35"))


def _round_body(view: FleetView, now: float, width: int, height: int) -> RenderableType:
    r = view.round
    if r is None:
        return Text("no round announcement yet", style="dim")
    lines = Text()
    lines.append(f"Round {r.round}", style="bold")
    lines.append(f"  on model v{r.base_version}")
    lines.append("   open\n" if r.open else "   ended\n", style="green" if r.open else "yellow")
    if r.accepted is None:
        lines.append("updates in: not published yet (metrics/progress)\n", style="dim")
    else:
        bar = _bar(r.accepted, r.min_updates, min(width - 22, 30))
        lines.append_text(bar)
        lines.append(f" {r.accepted}/{r.min_updates} updates\n", style="bold")
    quorum = f"quorum {r.min_updates}, at most {r.max_updates}"
    if not r.open:
        lines.append(f"{quorum}\nno round open: the aggregator stopped announcing\n", style="dim")
    else:
        left = view.seconds_left(now)
        lines.append(f"{quorum}\n", style="dim")
        if left is None:
            lines.append("no deadline announced\n", style="dim")
        elif left >= 0:
            lines.append(f"deadline in {duration(left)}", style="bold")
            lines.append(f" ({clock(r.deadline)})\n", style="dim")
        else:
            lines.append(f"deadline passed {duration(left)} ago", style="bold yellow")
            lines.append(" (closing, or extended)\n", style="dim")
    if r.rejected:
        lines.append("rejected: " + ", ".join(f"{k} {n}" for k, n in sorted(r.rejected.items())),
                     style="red")
    elif r.accepted is not None:
        lines.append("rejected: none", style="dim")
    latest = view.latest_versions(1)
    if height >= 7 and latest:
        # Room to spare (a tall terminal): what the round starts from, in one line.
        info = latest[0]
        lines.append(f"\n\nlatest model v{info.version}", style="bold")
        for name, fmt in (("accuracy", _pct), ("loss", lambda v: f"{v:.3g}")):
            found = info.metric(name)  # type: ignore[arg-type]
            if found is not None:
                lines.append(f"  {name} ")
                lines.append_text(_sourced(found, fmt))
        by = f"  by {info.eval_devices} devices"
        if info.eval_devices and len(lines.plain.rsplit("\n", 1)[-1]) + len(by) <= width:
            lines.append(by, style="dim")
    lines.rstrip()
    return lines


def _device_line(d: Device, now: float) -> tuple[Text, Text, Text]:
    style = _STATE_STYLE.get(d.state, "magenta")
    seen = None if d.last_seen is None else now - d.last_seen
    state = Text(d.state, style=style)
    if d.refused:  # forged or altered models and announcements (docs/security.md)
        state.append(f" {d.refused} refused", style="bold red")
    return (Text(f"{_STATE_DOT.get(d.state, '?')} {d.device_id}", style=style),
            state, Text(ago(seen), style="dim"))


def _devices_body(view: FleetView, now: float, width: int, height: int) -> RenderableType:
    devices = view.devices_ordered()
    if not devices:
        return Text("no device status yet (status/+)", style="dim")
    table = Table.grid(padding=(0, 2), expand=True)
    table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    shown = devices if len(devices) <= height else devices[:max(height - 1, 0)]
    for d in shown:
        table.add_row(*_device_line(d, now))
    if len(shown) == len(devices):
        return table
    rest = devices[len(shown):]
    offline = sum(d.state == "offline" for d in rest)
    more = Text(f"… and {len(rest)} more ({offline} offline)", style="dim", no_wrap=True,
                overflow="ellipsis")
    return Group(table, more)


def _devices_title(view: FleetView, width: int) -> Text:
    """``Devices 3 online · 1 training · 2 offline``, or ``Devices ●3 ◆1 ○2`` when narrow."""
    counts = view.device_counts()
    states = ("online", "training", "offline")
    title = Text("Devices ", style="bold")
    full = " · ".join(f"{counts.get(s, 0)} {s}" for s in states)
    for i, state in enumerate(states):
        n = counts.get(state, 0)
        part = f"{n} {state}" if len(full) + 14 <= width else f"{_STATE_DOT[state]}{n}"
        title.append((" · " if i and len(full) + 14 <= width else " " if i else "") + part,
                     style=_STATE_STYLE[state])
    title.append(" ")
    return title


def _chart(view: FleetView, name: MetricName) -> Panel:
    points = view.series(name)
    lo, hi = _range([v for _, v, _ in points], name)
    label: Callable[[float], str] = (
        (lambda v: f"{v:.0%}") if name == "accuracy" else (lambda v: f"{v:.3g}"))
    sources = {s for _, _, s in points}
    legend = Text.assemble((f"{name.capitalize()} ", "bold"))
    if "eval" in sources:
        legend.append("█ eval ", style="green")
    if "train" in sources:
        legend.append(f"{_TRAIN_GLYPH} train ", style="yellow")
    empty = (f"no {name} yet: a model carries train_{name} once a round closes, "
             f"eval_{name} once devices evaluate it")
    return _panel(ColumnChart(points, label=label, lo=lo, hi=hi, empty=empty), legend)


def _versions_body(view: FleetView, width: int, height: int) -> RenderableType:
    versions = view.latest_versions(max(height - 1, 1))
    if not versions:
        return Text("no model version yet", style="dim")
    wide, narrow = width >= 50, width < 44
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold dim")
    table.add_column("ver", justify="right", no_wrap=True)
    table.add_column("rnd" if narrow else "round", justify="right", no_wrap=True)
    table.add_column("upd", justify="right", no_wrap=True)
    table.add_column("acc" if narrow else "accuracy", justify="right", no_wrap=True)
    table.add_column("loss", justify="right", no_wrap=True)
    if not narrow:
        table.add_column("evals", justify="right", no_wrap=True)
    if wide:
        table.add_column("bytes", justify="right", no_wrap=True)
    for info in reversed(versions):  # newest first
        acc, loss = info.metric("accuracy"), info.metric("loss")
        row: list[RenderableType] = [
            f"v{info.version}", "—" if info.round is None else str(info.round),
            "—" if info.participants is None else str(info.participants),
            _sourced(acc, _pct), _sourced(loss, lambda v: f"{v:.3g}")]
        if not narrow:
            row.append(Text(str(info.eval_devices) if info.eval_devices else "—", style="dim"))
        if wide:
            row.append(size(info.bytes_in))
        table.add_row(*row)
    return table


def _sourced(found: tuple[float, Source] | None, fmt: Callable[[float], str]) -> Text:
    """A value marked with its source's glyph, as in the charts (█ eval, ▒ train)."""
    if found is None:
        return Text("—", style="dim")
    value, source = found
    if source == "eval":
        return Text.assemble((fmt(value), "green"), (" █", "green"))
    return Text.assemble((fmt(value), "yellow"), (f" {_TRAIN_GLYPH}", "yellow"))


def _rejections_body(view: FleetView, height: int) -> RenderableType:
    total = view.rejected()
    if not total:
        return Text("none", style="dim")
    r = view.round
    current = r.rejected if r is not None else {}
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True, overflow="ellipsis")
    table.add_column(justify="right")
    table.add_column(style="dim")
    ranked = total.most_common()
    for reason, n in ranked[:height]:
        now_ = current.get(reason, 0)
        table.add_row(Text(reason, style="red"), str(n), f"+{now_} this round" if now_ else "")
    return table


def _rounds_body(view: FleetView, width: int, height: int) -> RenderableType:
    if not view.summaries:
        return Text("no round closed since the watch started", style="dim")
    wide = width >= 50
    lines = Text(no_wrap=True, overflow="ellipsis")
    for i, s in enumerate(list(view.summaries)[::-1][:height]):
        if i:
            lines.append("\n")
        gap = "  " if wide else " "
        lines.append(f"round {s.round} → v{s.version}" if wide else f"r{s.round}→v{s.version}",
                     style="bold")
        lines.append(f"{gap}{s.participants} {'updates' if wide else 'upd'}{gap}")
        lines.append(s.closed_by, style="cyan")
        lines.append(f"{gap}{size(s.bytes_in)}{gap}{duration(s.duration_s)}", style="dim")
    return lines


# ---------------------------------------------------------------- the whole screen


def _split(view: FleetView, height: int) -> tuple[int, int]:
    """Rows for (round and devices, charts); the rest goes to rejections and rounds.

    The top row grows with the fleet (up to 45 % of a tall screen, 32 % of a short one) and the
    bottom one with what it lists (up to 30 %); the charts take what is left, at least 9 rows.
    """
    body = max(height - 2, 18)  # header and footer
    round_rows = 9 if height >= 30 else 7  # with the latest model's line when tall
    top_cap = round(body * (0.45 if height >= 30 else 0.32))
    top = min(max(round_rows, len(view.devices) + 2), top_cap)
    listed = max(len(view.rejected()), min(len(view.summaries), 12), 1)
    bottom = min(max(listed + 2, 4), round(body * 0.30))
    short = top + bottom + 9 - body
    if short > 0:  # the charts keep 9 rows: the lists give way first
        cut = min(short, bottom - 4)
        bottom -= cut
        top -= min(short - cut, top - 6)
    return top, body - top - bottom


def render(view: FleetView, link: Link, now: float, *, width: int, height: int) -> Layout:
    """The whole screen for a console of ``width`` x ``height`` cells."""
    layout = Layout()
    header = Layout(_header(view, link, now, width), size=1)
    footer = Layout(_footer(view, link, now), size=1)
    if not view.has_data:
        layout.split_column(header, Layout(_waiting(view, link, now)), footer)
        return layout
    top_h, mid_h = _split(view, height)
    top, mid, bottom = Layout(size=top_h), Layout(size=mid_h), Layout()
    layout.split_column(header, top, mid, bottom, footer)
    top.split_row(
        Layout(_panel(_Fit(lambda w, h: _round_body(view, now, w, h)), Text("Round", "bold"))),
        Layout(_panel(_Fit(lambda w, h: _devices_body(view, now, w, h)),
                      _devices_title(view, width // 2))))
    table = _panel(_Fit(lambda w, h: _versions_body(view, w, h)), Text.assemble(
        ("Versions ", "bold"), ("█ eval on devices " if width >= 110 else "█ eval ", "green"),
        (f"{_TRAIN_GLYPH} train ", "yellow")))
    if width >= 110:
        mid.split_row(Layout(_chart(view, "accuracy"), ratio=3),
                      Layout(_chart(view, "loss"), ratio=3), Layout(table, ratio=5))
    else:
        mid.split_row(Layout(_chart(view, "accuracy")), Layout(table))
    bottom.split_row(
        Layout(_panel(_Fit(lambda w, h: _rejections_body(view, h)),
                      Text(f"Rejections since {clock(view.since)}", style="bold"))),
        Layout(_panel(_Fit(lambda w, h: _rounds_body(view, w, h)),
                      Text("Last rounds", style="bold"))))
    return layout


def print_screen(view: FleetView, link: Link, now: float) -> None:
    """Print the screen once, sized to the terminal (80x25 when not one: rich's default)."""
    console = Console()
    console.print(render(view, link, now, width=console.width, height=console.height))


@contextmanager
def full_screen() -> Iterator[Callable[[FleetView, Link, float], None]]:
    """The terminal's alternate screen, restored on exit; yields ``show(view, link, now)``,
    which redraws it at the terminal's current size (a resize takes effect at once)."""
    console = Console()
    with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
              redirect_stderr=False) as live:

        def show(view: FleetView, link: Link, now: float) -> None:
            live.update(render(view, link, now, width=console.width, height=console.height),
                        refresh=True)

        yield show


def snapshot(view: FleetView, link: Link, now: float, *, width: int, height: int,
             color: bool = False) -> str:
    """The screen as text (for ``--once`` into a pipe, and for tests)."""
    console = Console(width=width, height=height, record=True, force_terminal=color,
                      color_system="truecolor" if color else None, file=io.StringIO())
    console.print(render(view, link, now, width=width, height=height))
    return console.export_text(styles=color)

