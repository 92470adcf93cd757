"""`reddwarf instance top`'s drawing, on recorded health samples: sparklines, rates from counters (a restart
resets instead of going negative), repeated reports counted once, rows in name order — exact output."""
from __future__ import annotations

from rich.console import Console

from reddwarf.client.top import InstanceSeries, human_bytes, render, sparkline
from reddwarf.v1 import common_pb2, database_pb2


def inst(name: str, status: int, t: float | None, queries: int = 0, conns: int = 0, pool: int = 0) -> database_pb2.Instance:
    i = database_pb2.Instance(id=f"id-{name}", name=f"instances/id-{name}", display_name=name, status=status)
    if t is not None:
        i.health.CopyFrom(common_pb2.GuestHealth(queries=queries, threads_connected=conns,
                                                 buffer_pool_bytes_data=pool))
        i.health.observed.FromNanoseconds(int(t * 1e9))
    return i


ACTIVE, BUILD = database_pb2.INSTANCE_STATUS_ACTIVE, database_pb2.INSTANCE_STATUS_BUILD


def recorded() -> list[InstanceSeries]:
    shop = InstanceSeries.of(inst("shop", ACTIVE, 100.0, queries=1000, conns=1, pool=16 << 20))
    for t, q, c, p in [(102, 1100, 2, 17 << 20), (104, 1300, 4, 18 << 20), (104, 1300, 4, 18 << 20),  # repeat
                       (106, 1300, 3, 18 << 20), (108, 20, 1, 8 << 20),  # mysqld restarted: counters reset
                       (110, 420, 2, 9 << 20)]:
        shop.add(inst("shop", ACTIVE, t, q, c, p))
    new = InstanceSeries.of(inst("analytics", BUILD, None))
    return [shop, new]


def test_sparkline_scales_to_the_maximum_and_keeps_the_last_values():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 0, 10], 2) == "▁█"
    assert sparkline([0, 0], 5) == "▁▁"
    assert sparkline([], 5) == ""
    assert human_bytes(512) == "512 B" and human_bytes(18 << 20) == "18.0 MiB" and human_bytes(3 << 40) == "3072.0 GiB"


def test_rates_come_from_counter_differences_and_a_reset_is_not_negative():
    shop = recorded()[0]
    assert len(shop.samples) == 6  # the repeated report was counted once
    assert shop.qps() == [50.0, 100.0, 0.0, 0.0, 200.0]
    assert shop.connections() == [1.0, 2.0, 4.0, 3.0, 1.0, 2.0]


def test_the_table_is_exactly_what_top_draws():
    console = Console(record=True, width=100, color_system=None, force_terminal=False)
    console.print(render(recorded(), width=8))
    assert console.export_text() == (
        "                                                                 \n"
        " instance    status   queries/s     connections   buffer pool    \n"
        " ─────────────────────────────────────────────────────────────── \n"
        " analytics   BUILD    -             -             -              \n"
        " shop        ACTIVE   ▃▅▁▁█ 200.0   ▃▅█▆▃▅ 2      ▇███▄▅ 9.0 MiB \n"
        "                                                                 \n"
    )
