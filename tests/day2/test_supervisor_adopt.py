"""A supervised child started before the agent exec'd into a new build is adopted, not started twice: the
Supervisor finds its own running child with the same command line, watches it, restarts it when it dies and
stops it on request. Real processes (sleep), children of this test process as they would be of the agent."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

from reddwarf.agent.supervisor import Supervisor, child_exit, own_child
from reddwarf.common.states import ServiceState


def test_a_running_child_is_adopted_restarted_when_it_dies_and_stopped() -> None:
    argv = ["sleep", "300.123"]  # a command line nothing else on the machine runs
    first = subprocess.Popen(argv)
    try:
        assert own_child(argv) == first.pid
        assert own_child(["sleep", "300.456"]) is None

        async def go() -> None:
            sup = Supervisor("sleeper", argv, min_backoff=0.1)
            await sup.start(ready_timeout=5)
            assert sup.pid == first.pid and sup.state == ServiceState.RUNNING  # adopted, not a second one
            os.kill(first.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while sup.pid in (None, first.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            second = sup.pid
            assert second is not None and second != first.pid and sup.restarts == 1
            await sup.stop()
            assert sup.pid is None and child_exit(second) is not None
        asyncio.run(go())
    finally:
        if first.poll() is None:
            first.kill()
        first.returncode = 0  # reaped by child_exit; keeps Popen from warning


def test_an_adopted_child_is_stopped_on_request() -> None:
    argv = ["sleep", "300.789"]
    child = subprocess.Popen(argv)
    try:
        async def go() -> None:
            sup = Supervisor("sleeper", argv, stop_timeout=5)
            await sup.start(ready_timeout=5)
            assert sup.pid == child.pid
            await sup.stop()
            assert sup.pid is None and sup.state == ServiceState.SHUTDOWN
        asyncio.run(go())
        assert own_child(argv) is None and child_exit(child.pid) is not None
    finally:
        if child.poll() is None:
            child.kill()
        child.returncode = 0
