"""The CLI's commands for seeing what the databases are doing: `reddwarf instance log ...` (guest logs),
`reddwarf event list` (the event history) and `reddwarf instance top` (a live view drawn by clients/top.py).
Registered on cli.py's apps when cli.py is imported."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from typing import Any

import typer
from rich.console import Console
from rich.live import Live

from .aio import AsyncClient
from .cli import (
    INSTANCE_ARG,
    Column,
    State,
    app,
    client,
    emit,
    instance_app,
    output_options,
    run,
    short,
    ts,
)
from .config import load_config
from .errors import WaitTimeout
from .top import InstanceSeries, render

log_app = typer.Typer(help="An instance's datastore logs: error, slow_query, general.", no_args_is_help=True)
event_app = typer.Typer(help="The event history: who changed what, and every status change.", no_args_is_help=True)
instance_app.add_typer(log_app, name="log")
app.add_typer(event_app, name="event")

LOG_ARG = typer.Argument(..., help="error, slow_query or general.")
LOG_COLS: list[Column] = [
    ("name", lambda g: g.log), ("type", lambda g: g.type), ("status", lambda g: g.status),
    ("size bytes", lambda g: g.size_bytes), ("max bytes", lambda g: g.max_bytes),
    ("long query time", lambda g: f"{g.long_query_time:g}" if g.log == "slow_query" else ""),
]
SAVED_FIELDS: list[Column] = [
    ("name", lambda s: s.name), ("object id", lambda s: s.object_id), ("location", lambda s: s.location),
    ("size bytes", lambda s: s.size_bytes), ("sha256", lambda s: s.sha256), ("created", lambda s: ts(s, "create_time")),
]
EVENT_COLS: list[Column] = [
    ("id", lambda e: e.id), ("time", lambda e: ts(e, "time")), ("kind", lambda e: e.kind),
    ("resource", lambda e: e.resource), ("what", lambda e: short(e.method) if e.kind == "api" else
                                           f"{e.previous_status or '-'} → {e.status}"),
    ("code", lambda e: e.code), ("actor", lambda e: e.actor.removeprefix("spiffe://reddwarf/")),
    ("request id", lambda e: e.request_id),
]


# -- guest logs ------------------------------------------------------------------------------------
@log_app.command("list")
@output_options
def log_list(instance: str = INSTANCE_ARG) -> None:
    def go() -> None:
        c = client()
        emit(c.list_logs(c.instance_id(instance)), LOG_COLS)
    run(go)


@log_app.command("show")
@output_options
def log_show(instance: str = INSTANCE_ARG, log: str = LOG_ARG) -> None:
    def go() -> None:
        c = client()
        emit(c.get_log(c.instance_id(instance), log), LOG_COLS)
    run(go)


@log_app.command("enable")
@output_options
def log_enable(instance: str = INSTANCE_ARG, log: str = LOG_ARG,
               long_query_time: float = typer.Option(0.0, "--long-query-time",
                                                     help="slow_query: log queries slower than this (seconds).")) -> None:
    def go() -> None:
        c = client()
        emit(c.enable_log(c.instance_id(instance), log, long_query_time), LOG_COLS)
    run(go)


@log_app.command("disable")
@output_options
def log_disable(instance: str = INSTANCE_ARG, log: str = LOG_ARG) -> None:
    def go() -> None:
        c = client()
        emit(c.disable_log(c.instance_id(instance), log), LOG_COLS)
    run(go)


@log_app.command("tail")
def log_tail(instance: str = INSTANCE_ARG, log: str = LOG_ARG,
             lines: int = typer.Option(50, "--lines", "-n", help="Start with the last N lines."),
             follow: bool = typer.Option(False, "--follow", "-F", help="Keep printing what is appended."),
             timeout: float | None = typer.Option(None, "--timeout", help="Stop following after this many seconds.")
             ) -> None:
    def go() -> None:
        c = client()
        iid = c.instance_id(instance)
        with contextlib.suppress(KeyboardInterrupt):
            with contextlib.suppress(WaitTimeout):  # a --timeout ending a follow is the way out, not an error
                for text in c.tail_log(iid, log, lines=lines, follow=follow, timeout=timeout):
                    typer.echo(text, nl=False)
    run(go)


@log_app.command("save")
@output_options
def log_save(instance: str = INSTANCE_ARG, log: str = LOG_ARG) -> None:
    """Copies the log into the backup store (encrypted under the tenant's key) and prints where."""
    def go() -> None:
        c = client()
        emit(c.save_log(c.instance_id(instance), log), SAVED_FIELDS)
    run(go)


# -- event history ---------------------------------------------------------------------------------
def _when(value: str, option: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{option} must be an ISO time such as 2026-11-26T17:00:00Z") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@event_app.command("list")
@output_options
def event_list(instance: str = typer.Option("", "--instance", help="Only this instance's events (id or name)."),
               resource: str = typer.Option("", "--resource", help="Only this resource's: instances/ID, backups/ID, "
                                            "hosts/ID."),
               kind: str = typer.Option("", "--kind", help="api or status."),
               since: str = typer.Option("", "--since", help="ISO time (UTC unless it says otherwise)."),
               until: str = typer.Option("", "--until", help="ISO time."),
               tenant: str = typer.Option("", "--tenant", help="Admins: only this tenant's."),
               limit: int = typer.Option(0, "--limit", help="At most this many (the newest); 0: all.")) -> None:
    def go() -> None:
        c = client()
        res = f"instances/{c.instance_id(instance)}" if instance else resource
        events = list(c.list_events(res, kind, _when(since, "--since"), _when(until, "--until"), tenant))
        emit(events[-limit:] if limit > 0 else events, EVENT_COLS)
    run(go)


# -- top -------------------------------------------------------------------------------------------
async def top_loop(rd: AsyncClient, wanted: list[str], interval: float, iterations: int, console: Console) -> int:
    """Follows every (wanted) instance's WatchInstance stream and redraws every `interval` seconds, `iterations`
    times (0: until interrupted). Returns how many frames it drew."""
    insts = [i async for i in rd.list_instances()]
    if wanted:
        ids = {await rd.instance_id(w) for w in wanted}
        insts = [i for i in insts if i.id in ids]
    series = {i.id: InstanceSeries.of(i) for i in insts}

    async def follow(iid: str) -> None:
        with contextlib.suppress(Exception):  # a deleted instance ends its stream; the row stays as last seen
            async for ev in rd.watch_instance(iid):
                series[iid].add(ev.instance)

    followers = [asyncio.create_task(follow(iid)) for iid in series]
    frames = 0
    try:
        live = Live(render(series.values()), console=console, auto_refresh=False) if console.is_terminal else None
        with live if live is not None else contextlib.nullcontext():
            while not iterations or frames < iterations:
                await asyncio.sleep(interval)
                table = render(series.values())
                if live is not None:
                    live.update(table, refresh=True)
                else:
                    console.print(table)
                frames += 1
    finally:
        for t in followers:
            t.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    return frames


@instance_app.command("top")
def instance_top(instances: list[str] = typer.Argument(None, help="Only these instances (ids or names)."),
                 interval: float = typer.Option(2.0, "--interval", help="Seconds between redraws."),
                 iterations: int = typer.Option(0, "--iterations", help="Stop after this many redraws (0: never)."),
                 once: bool = typer.Option(False, "--once", help="Draw one frame and stop (= --iterations 1).")) -> None:
    """A live view of the tenant's instances: status and sparklines of queries/s, connections and buffer pool."""
    if interval <= 0:
        raise typer.BadParameter("--interval must be more than 0")

    async def go_async() -> None:
        kw: dict[str, Any] = {k: v for k, v in (("endpoint", State.endpoint), ("token", State.token)) if v}
        async with AsyncClient(load_config(**kw)) as rd:
            await top_loop(rd, list(instances or []), interval, 1 if once else iterations, Console())

    def go() -> None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(go_async())
    run(go)
