"""The chaos figures: the full seeded random-kill run (tests/chaos/test_chaos_random.py, 24 rounds) with a
writer inserting known ids, summarised — rounds, what was killed during what, how each operation ended,
rows acknowledged and rows lost. Zero lost rows and convergence in every round are asserted by the test
itself; this module runs it and writes down what happened.

Run: `.venv/bin/python -m bench.chaos_bench [--seed N]` (as root; the seed defaults to a fixed one so the
figures are reproducible).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "tests/chaos/test_chaos_random.py", "-k", "seeded", "--chaos-full"],
                          cwd=root, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "REDDWARF_CHAOS_SEED": str(args.seed)})
    elapsed = time.monotonic() - started
    out = proc.stdout
    if proc.returncode != 0:
        print(out[-3000:], proc.stderr[-1500:], file=sys.stderr)
        return 1
    m = re.search(r"(\d+) rows acknowledged, (\d+) lost", out)
    if not m:
        print(out[-3000:], file=sys.stderr)
        return 1
    rounds = re.findall(r"round (\d+): (\w+), kill (\w+) after ([\d.]+)s", out)
    outcomes = re.findall(r"^\s+\S+ \s*(?:backup (\w+)|(\w+): (ACTIVE|ERROR))", out, re.M)
    ends: collections.Counter[str] = collections.Counter()
    for backup, _name, status in outcomes:
        ends[f"backup {backup}" if backup else f"instance {status}"] += 1
    pairs = collections.Counter((op, victim) for _, op, victim, _ in rounds)
    print("## Chaos: seeded random kills during create, backup, restore and resize\n")
    print(f"Seed {args.seed}, {len(rounds)} rounds in {elapsed:.0f} s: each round starts one operation and "
          "SIGKILLs one process after a random 0–3 s delay (the server and hostd are started again by the test; "
          "hostd restarts a dead guest, the agent a dead mysqld). After every round the system is checked to "
          "have converged (see tests/chaos/test_chaos_random.py).\n")
    print("| operation \\ killed | " + " | ".join(("server", "hostd", "agent", "mysqld")) + " |")
    print("|---|---:|---:|---:|---:|")
    for op in ("create", "backup", "restore", "resize"):
        print(f"| {op} | " + " | ".join(str(pairs[(op, v)]) for v in ("server", "hostd", "agent", "mysqld")) + " |")
    print()
    print("| outcome | count |")
    print("|---|---:|")
    for k in sorted(ends):
        print(f"| {k} | {ends[k]} |")
    print(f"| rows acknowledged by the writer | {int(m.group(1)):,} |")
    print(f"| acknowledged rows lost | {int(m.group(2))} (target 0) |")
    print("\nA FAILED backup carries its fault (e.g. the guest restarted while running it) and left nothing in "
          "the store; every restore in the run brought back exactly the rows of its backup.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
