"""What `reddwarf instance top` draws, with no I/O: each instance's status and sparklines of its queries per
second, connections and InnoDB buffer pool in use, from the guest health its WatchInstance stream carries.

Rates come from the counters' differences between two health reports (the guest measures them: `observed`);
a counter that went down (mysqld restarted) starts again from there instead of drawing a negative rate.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rich import box
from rich.table import Table
from rich.text import Text

from reddwarf.v1 import database_pb2 as pb

from . import resources as r

BARS = "▁▂▃▄▅▆▇█"
HISTORY = 60  # samples kept per instance


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values as bars scaled from 0 to their maximum (all bars lowest when all are 0)."""
    shown = list(values)[-width:] if width > 0 else []
    top = max(shown, default=0.0)
    if top <= 0:
        return BARS[0] * len(shown)
    return "".join(BARS[min(len(BARS) - 1, max(0, round(v / top * (len(BARS) - 1))))] for v in shown)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable: GiB ends the loop


@dataclass(frozen=True)
class Sample:
    observed: float  # seconds (the guest's clock)
    queries: int
    connections: int
    memory: int


@dataclass
class InstanceSeries:
    """One instance's latest status and its recent health samples."""
    id: str
    name: str
    status: str = ""
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=HISTORY))

    @classmethod
    def of(cls, inst: pb.Instance) -> InstanceSeries:
        s = cls(inst.id, inst.display_name)
        s.add(inst)
        return s

    def add(self, inst: pb.Instance) -> None:
        """Takes an instance as GetInstance or WatchInstance shows it; a health report already seen (same
        observed time) only updates the status."""
        self.status = r.status_name(inst.status)
        h = inst.health
        if not h.HasField("observed"):
            return
        t = h.observed.seconds + h.observed.nanos / 1e9
        if self.samples and t <= self.samples[-1].observed:
            return
        self.samples.append(Sample(t, h.queries, h.threads_connected, h.buffer_pool_bytes_data))

    def qps(self) -> list[float]:
        out = []
        pairs = list(self.samples)
        for a, b in zip(pairs, pairs[1:], strict=False):
            dt = b.observed - a.observed
            out.append((b.queries - a.queries) / dt if dt > 0 and b.queries >= a.queries else 0.0)
        return out

    def connections(self) -> list[float]:
        return [float(s.connections) for s in self.samples]

    def memory(self) -> list[float]:
        return [float(s.memory) for s in self.samples]


STATUS_STYLE = {"ACTIVE": "green", "HEALTHY": "green", "BUILD": "yellow", "RESTORING": "yellow", "REBOOT": "yellow",
                "RESIZE": "yellow", "BACKUP": "cyan", "SHUTDOWN": "red", "ERROR": "bold red", "FAILED": "bold red"}


def _cell(spark: str, last: str) -> Text:
    return Text.assemble((spark, "cyan"), " ", last) if spark else Text(last)


def render(series: Iterable[InstanceSeries], width: int = 20) -> Table:
    """The table `top` shows: one row per instance, in name order."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    table.add_column("instance", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("queries/s", no_wrap=True)
    table.add_column("connections", no_wrap=True)
    table.add_column("buffer pool", no_wrap=True)
    for s in sorted(series, key=lambda x: (x.name, x.id)):
        qps, conns, mem = s.qps(), s.connections(), s.memory()
        table.add_row(Text(s.name), Text(s.status, style=STATUS_STYLE.get(s.status, "")),
                      _cell(sparkline(qps, width), f"{qps[-1]:.1f}" if qps else "-"),
                      _cell(sparkline(conns, width), f"{conns[-1]:.0f}" if conns else "-"),
                      _cell(sparkline(mem, width), human_bytes(mem[-1]) if mem else "-"))
    return table
