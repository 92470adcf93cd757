"""Where a burst of creates spends its time, read from the server's and hostd's own logs (no profiler needed):
per create_instance step the p50/max duration and how many ran at once, the wait before a task's first
step (the task engine's queue), and per hostd mutation the time spent waiting for hostd's locks and running.

Used by bench.provision_bench (`--breakdown`); also runnable on kept logs:
`python -m bench.provision_breakdown SERVER_LOG HOSTD_LOG [SINCE_EPOCH]`.
"""
from __future__ import annotations

import calendar
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

_TS = re.compile(r"^ts=(\S+)")
_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def _epoch(ts: str) -> float:
    """ts=2026-11-26T23:41:02.123Z (UTC) as seconds since the epoch."""
    base, _, frac = ts.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


def _fields(line: str) -> dict[str, str]:
    return {k: v[1:-1] if v.startswith('"') else v for k, v in _KV.findall(line)}


@dataclass
class Breakdown:
    steps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    peak: dict[str, int] = field(default_factory=dict)        # step -> most tasks in it at once
    queued: list[float] = field(default_factory=list)        # burst start -> task's first step
    running_peak: int = 0                                     # most create tasks between first and last step
    host_waited: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    host_ran: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def markdown(self) -> str:
        def p50(xs: list[float]) -> float:
            return statistics.median(xs) if xs else 0.0

        out = ["| create step | n | p50 | max | most at once |", "|---|---|---|---|---|"]
        for step, xs in self.steps.items():
            out.append(f"| {step} | {len(xs)} | {p50(xs):.2f} s | {max(xs):.2f} s | {self.peak.get(step, 0)} |")
        if self.queued:
            out.append(f"\nqueued before the first step: p50 {p50(self.queued):.2f} s, max {max(self.queued):.2f} s; "
                       f"most create tasks running at once: {self.running_peak}\n")
        out += ["| hostd operation | n | waited p50 | waited max | ran p50 | ran max |", "|---|---|---|---|---|---|"]
        for op, xs in self.host_ran.items():
            ws = self.host_waited[op]
            out.append(f"| {op} | {len(xs)} | {p50(ws):.2f} s | {max(ws):.2f} s | {p50(xs):.2f} s | {max(xs):.2f} s |")
        return "\n".join(out)


def _peak(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def analyse(server_log: str, hostd_log: str, since: float) -> Breakdown:
    b = Breakdown()
    started: dict[tuple[str, str], float] = {}
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for line in server_log.splitlines():
        m = _TS.match(line)
        if not m or "task step" not in line:
            continue
        f = _fields(line)
        if f.get("kind") != "create_instance":
            continue
        t = _epoch(m.group(1))
        if t < since:
            continue
        event, step, task = f.get("event", ""), f.get("step", ""), f.get("task", "")
        if event.startswith("task step started"):
            step = step or event.rsplit("=", 1)[-1]
            started[(task, step)] = t
            first.setdefault(task, t)
        elif event.startswith("task step finished"):
            step = step or event.rsplit("=", 1)[-1]
            t0 = started.pop((task, step), None)
            if t0 is not None:
                b.steps[step].append(t - t0)
                spans[step].append((t0, t))
            last[task] = t
    for step, iv in spans.items():
        b.peak[step] = _peak(iv)
    b.queued = [t - since for t in first.values()]
    b.running_peak = _peak([(first[k], last[k]) for k in first if k in last])
    for line in hostd_log.splitlines():
        m = _TS.match(line)
        if not m or "host operation" not in line or _epoch(m.group(1)) < since:
            continue
        f = _fields(line)
        b.host_waited[f.get("op", "?")].append(int(f.get("waited_ms", "0")) / 1000)
        b.host_ran[f.get("op", "?")].append(int(f.get("ran_ms", "0")) / 1000)
    return b


def main(argv: list[str]) -> int:
    with open(argv[0], errors="replace") as s, open(argv[1], errors="replace") as h:
        print(analyse(s.read(), h.read(), float(argv[2]) if len(argv) > 2 else 0.0).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
