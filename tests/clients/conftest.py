"""Client-test fixtures: a test CA, the in-process fake API over loopback mTLS, and clients bound to it."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reddwarf.client import Client, ClientConfig

from .certs import TestPki, make_pki
from .fake_api import TOKEN, FakeState, fake_api


@pytest.fixture(scope="session")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(Path(tmp_path_factory.mktemp("client-pki")))


@pytest.fixture
def api(client_pki: TestPki) -> Iterator[tuple[str, FakeState]]:
    with fake_api(client_pki) as served:
        yield served


@pytest.fixture
def client_config(api: tuple[str, FakeState], client_pki: TestPki) -> ClientConfig:
    return ClientConfig(endpoint=api[0], ca=str(client_pki.ca), cert=str(client_pki.client_cert),
                        key=str(client_pki.client_key), token=TOKEN, timeout=5)


@pytest.fixture
def client(client_config: ClientConfig) -> Iterator[Client]:
    with Client(client_config) as rd:
        yield rd
