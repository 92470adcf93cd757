"""Client-test fixtures: a test CA, the in-process fake API over loopback mTLS, and clients bound to it."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from reddwarf.client import Client, ClientConfig
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.gateway import start_gateway

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


@pytest.fixture(scope="package")
def lxc_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    """One real cluster (LXC hostd, loop volumes) and its Trove gateway for the package's end-to-end flows
    (CLI in a terminal, memcached, troveclient, openstack CLI), instead of one each: needs root."""
    with start_cluster(tmp_path_factory.mktemp("clients-lxc")) as c, \
            start_gateway(c.server.api, c.server.gateway_files) as base:
        yield c, base


@pytest.fixture
def flow(lxc_cluster: tuple[Cluster, str]) -> tuple[Cluster, str]:
    """The shared cluster seen as a tenant of the test's own: its lists, quotas and clean-ups cover only what
    this test made. Yields (cluster, gateway base URL)."""
    c, base = lxc_cluster
    tenant, token = c.new_tenant()
    return dataclasses.replace(c, tenant=tenant, token=token), base
