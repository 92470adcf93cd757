from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--chaos-full", action="store_true", default=False,
                     help="run the long chaos rounds (make chaos) instead of the bounded ones (make test)")


@pytest.fixture
def chaos_rounds(request: pytest.FixtureRequest) -> int:
    return 10 if request.config.getoption("--chaos-full") else 2
