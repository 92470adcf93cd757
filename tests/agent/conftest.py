"""Fixtures shared by the agent's tests that run a real mariadbd through MysqlDriver."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from reddwarf.agent.mysql import MysqlDriver


@pytest.fixture
async def drivers() -> AsyncIterator[list[MysqlDriver]]:
    """A list a test appends its drivers to: every one is closed (its mysqld stopped) at the end."""
    made: list[MysqlDriver] = []
    try:
        yield made
    finally:
        for d in made:
            await d.close()
