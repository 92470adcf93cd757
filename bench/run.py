"""`make bench`: runs every benchmark module in bench/ and writes their figures to docs/BENCHMARKS.md.

Each benchmark is a module runnable as `python -m bench.<name>` that prints a markdown section (a heading,
a table with our figure next to the baseline measured in the same run, and the target). This runner adds
the date, the machine and the exact command, so every figure in the file says how it was produced.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import sys

BENCHMARKS = [
    ("hostd_bench", "containers and volumes: hostd vs raw lxc-copy/lxc-start and truncate/mkfs/mount"),
    ("provision_bench", "create→ACTIVE vs the raw floor"),
    ("agent_streams", "1,000 agent streams on one server"),
    ("backup_bench", "backup/restore MB/s vs raw mariadb-backup"),
    ("compressor_bench", "compressors alone (no Python) vs raw mariadb-backup"),
    ("backup_store_bench", "backup store MiB/s: SeaweedFS (S3) vs the local folder"),
    ("api_bench", "unary API (GetFlavor, GetInstance) vs a bare grpc.aio server"),
    ("list_bench", "ListInstances paging over 10,000 instances on SQLite and MariaDB"),
    ("gateway_bench", "REST gateway overhead vs gRPC"),
    ("watch_bench", "create→ACTIVE with and without 1,000 WatchInstance watchers"),
    ("isolation_bench", "noisy neighbour and container vs bare"),
    ("chaos_bench", "seeded random kills: convergence and lost rows"),
    ("enroll_bench", "time to enroll a host over SSH"),
    ("metrics_bench", "/metrics scrape with 1,000 instances vs plain prometheus_client Gauges"),
    ("config_bench", "configuration change: API → visible in SHOW GLOBAL VARIABLES vs a direct SET GLOBAL"),
    ("san_bench", "MySQL on an iSCSI SAN volume vs a loop volume"),
    ("events_bench", "event history: create→ACTIVE with and without recording"),
    ("migrate_bench", "migration downtime (client-visible gap) vs an in-place restart"),
    ("upgrade_bench", "upgrade 10.11 → 11.8 downtime (client-visible gap) vs an in-place restart"),
    ("hostloss_bench", "host loss to ACTIVE elsewhere (1 and 5 SAN instances) vs MigrateInstance of the same"),
    ("reconnect_bench", "reconnect of 200 agents after a server dies vs their first connect"),
    ("ha_bench", "API throughput and create→ACTIVE: one control server vs two (PostgreSQL)"),
]


# In a section, everything from this line to the section's end was written by hand (what a profile showed,
# why a target is not met, earlier runs worth keeping): a re-run replaces the generated part above it only.
NOTES_MARK = "<!-- notes written by hand below: kept when the section is re-run -->"


def existing_sections(path: str) -> dict[str, str]:
    """The sections of an earlier BENCHMARKS.md by benchmark name (read from each section's Command line)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    out = {}
    for chunk in ("\n" + text).split("\n## ")[1:]:
        m = re.search(r"python -m bench\.(\w+)[^`]*`", chunk.split(NOTES_MARK)[0])
        if m:
            out[m.group(1)] = "## " + chunk.strip() + "\n"
    return out


def notes_of(section: str) -> str:
    """The hand-written tail of a section (from NOTES_MARK on), "" when it has none."""
    at = section.find(NOTES_MARK)
    return "" if at < 0 else "\n" + section[at:].strip() + "\n"


def main() -> int:
    """`python -m bench.run [name ...]`: all benchmarks, or only the named ones (the other sections of
    docs/BENCHMARKS.md are kept as they were, each with its own date and command)."""
    only = set(sys.argv[1:])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = os.cpu_count()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    sections = [
        "# Red Dwarf benchmarks\n",
        f"Produced by `make bench` on {now}; machine: {platform.platform()}, {cpu} CPUs, {mem_gb:.0f} GiB. "
        "Every figure sits next to a baseline measured in the same run, because these machines are noisy.\n",
    ]
    out_path = os.path.join(root, "docs", "BENCHMARKS.md")
    earlier = existing_sections(out_path)
    if only:
        sections[1] = (f"Produced by `make bench`; sections re-run on their own say so in their Command line (last: "
                       f"{now}); machine: {platform.platform()}, {cpu} CPUs, {mem_gb:.0f} GiB. Every figure sits "
                       "next to a baseline measured in the same run, because these machines are noisy.\n")
    failed = 0
    for name, what in BENCHMARKS:
        if only and name not in only:
            if name in earlier:
                sections.append(earlier[name])
            continue
        path = os.path.join(root, "bench", f"{name}.py")
        if not os.path.exists(path):
            sections.append(f"## {what}\n\nNot written yet (`bench/{name}.py` is missing).\n")
            continue
        cmd = [sys.executable, "-m", f"bench.{name}"]
        print(f"== {name}", flush=True)
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=3600)
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
        body = proc.stdout.strip() if proc.returncode == 0 else (
            f"## {what}\n\nFAILED (exit {proc.returncode}):\n\n```\n{proc.stderr.strip()[-1500:]}\n```")
        failed += proc.returncode != 0
        sections.append(f"{body}\n\nCommand: `.venv/bin/python -m bench.{name}` (run by `make bench`), {now}.\n"
                        + notes_of(earlier.get(name, "")))
    os.makedirs(os.path.join(root, "docs"), exist_ok=True)
    with open(out_path, "w") as f:
        f.write("\n".join(sections))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
