"""Subordinate id ranges of root (/etc/subuid, /etc/subgid): the host ids a user namespace may map onto.

hostd's unprivileged containers (hostd/template.py) and the proof-restore sandbox (agent/sandbox.py) each
map their ids onto a range of their own; newuidmap/newgidmap (LXC, util-linux unshare) check them here.
"""
from __future__ import annotations

import fcntl
import logging

log = logging.getLogger("reddwarf.common.subids")


def ensure_subids(base: int, size: int, files: tuple[str, ...] = ("/etc/subuid", "/etc/subgid")) -> None:
    """Gives root the id range [base, base+size); idempotent (an existing root line covering the range is
    kept, nothing else in the files is touched)."""
    for path in files:
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # hostd and a sandbox may add their ranges at the same moment
            f.seek(0)
            text = f.read()
            lines = text.splitlines()
            covered = False
            for ln in lines:
                parts = ln.strip().split(":")
                if len(parts) == 3 and parts[0] in ("root", "0") and parts[1].isdigit() and parts[2].isdigit():
                    start, count = int(parts[1]), int(parts[2])
                    covered = covered or (start <= base and base + size <= start + count)
            if not covered:
                f.write(("\n" if text and not text.endswith("\n") else "") + f"root:{base}:{size}\n")
                log.info("subordinate ids given to root", extra={"file": path, "range": f"{base}:{size}"})
