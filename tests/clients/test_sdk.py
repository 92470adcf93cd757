"""The SDK against a loopback gRPC API: error mapping with field violations, paging, wait_for, config."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from reddwarf.client import (
    AsyncClient,
    Client,
    ClientConfig,
    ConfigError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
    load_config,
)
from reddwarf.client.errors import error_class

from .fake_api import TOKEN, FakeState


def test_every_status_code_but_ok_has_its_own_exception_class() -> None:
    classes = {error_class(code) for code in grpc.StatusCode if code != grpc.StatusCode.OK}
    assert len(classes) == len(grpc.StatusCode) - 1


def test_not_found_maps_to_not_found_with_the_field_the_server_named(client: Client) -> None:
    with pytest.raises(NotFound) as caught:
        client.get_flavor("nope")
    assert caught.value.field == "name"
    assert caught.value.one_line() == "NOT_FOUND: flavor flavors/nope not found (field: name)"


def test_invalid_argument_carries_field_violations(client: Client) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.create_instance("", "small", 1)
    assert [v.field for v in caught.value.field_violations] == ["instance.display_name"]


def test_missing_token_is_unauthenticated(client: Client) -> None:
    with pytest.raises(Unauthenticated):
        client.with_token(None).list_flavors()


def test_list_flavors_follows_every_page(client: Client, api: tuple[str, FakeState]) -> None:
    flavors = client.list_flavors(page_size=3)
    assert [f.id for f in flavors] == [f"f{i}" for i in range(7)]
    assert api[1].list_calls == 3


def test_bare_ids_and_full_names_are_both_accepted(client: Client) -> None:
    assert client.get_flavor("f2").id == client.get_flavor("flavors/f2").id == "f2"


def test_wait_for_follows_the_watch_until_active(client: Client) -> None:
    inst = client.create_instance("shop", "f1", 2, databases=["shop"])
    seen: list[int] = []
    done = client.wait_for(inst.id, "ACTIVE", timeout=10, on_event=lambda i: seen.append(i.status))
    assert done.status == 2 and seen[0] == 1  # BUILD first, then ACTIVE


def test_wait_for_polls_when_the_server_has_no_watch(client: Client, api: tuple[str, FakeState]) -> None:
    api[1].watch_implemented = False
    inst = client.create_instance("shop", "f1", 2)
    assert client.wait_for(inst.id, "ACTIVE", timeout=10, poll_interval=0.1).status == 2


def test_wait_for_times_out_with_wait_timeout(client: Client) -> None:
    inst = client.create_instance("shop", "f1", 2)
    with pytest.raises(WaitTimeout):
        client.wait_for(inst.id, "RESIZE", timeout=1)


async def test_async_client_maps_errors_and_pages_the_same(client_config: ClientConfig) -> None:
    rd = AsyncClient(client_config)
    try:
        assert len(await rd.list_flavors(page_size=2)) == 7
        with pytest.raises(NotFound) as caught:
            await rd.get_flavor("nope")
        assert caught.value.field == "name"
        inst = await rd.create_instance("a", "f0", 1)
        assert (await rd.wait_for(inst.id, "ACTIVE", timeout=10)).status == 2
    finally:
        await rd.close()


def test_config_precedence_is_file_then_env_then_arguments(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("endpoint: file:1\ntoken: t-file\nca: /ca.pem\nprofiles:\n  prod: {endpoint: prod:1}\n")
    assert load_config(path=path, env={}).endpoint == "file:1"
    assert load_config(path=path, env={}, profile="prod").endpoint == "prod:1"
    cfg = load_config(path=path, env={"REDDWARF_ENDPOINT": "env:1", "REDDWARF_TOKEN": "t-env"})
    assert (cfg.endpoint, cfg.token, cfg.ca) == ("env:1", "t-env", "/ca.pem")
    assert load_config(path=path, env={"REDDWARF_ENDPOINT": "env:1"}, endpoint="arg:1").endpoint == "arg:1"
    assert "t-env" not in repr(cfg)


def test_config_without_endpoint_or_with_unknown_keys_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no endpoint"):
        load_config(path=tmp_path / "absent.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoint: x:1\npasword: oops\n")
    with pytest.raises(ConfigError, match="pasword"):
        load_config(path=bad, env={})


def test_a_client_without_a_certificate_is_refused_by_the_mtls_port(client_config: ClientConfig) -> None:
    no_cert = ClientConfig(endpoint=client_config.endpoint, ca=client_config.ca, token=TOKEN, timeout=3)
    with Client(no_cert) as rd, pytest.raises(Unavailable):
        rd.list_flavors()


def test_sync_and_async_clients_offer_the_same_calls() -> None:
    public = {n for n in dir(Client) if not n.startswith("_")}
    assert public == {n for n in dir(AsyncClient) if not n.startswith("_")}
