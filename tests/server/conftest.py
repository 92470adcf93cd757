from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.server import RunningServer, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(tmp_path_factory.mktemp("srv")) as s:
        yield s
