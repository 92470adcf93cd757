"""common/names.py: every hostile identifier is refused with INVALID_ARGUMENT naming the field."""
from __future__ import annotations

import grpc
import pytest

from reddwarf.common import names
from reddwarf.common.errors import InvalidArgument

HOSTILE = [
    "", " db", "db ", "a'b", 'a"b', "a`b", "a;b", "a,b", "a/b", "a\\b", "a\x00b", "a\nb", "a\tb",
    "x`; DROP DATABASE mysql; --", "x'; DROP TABLE t; --", "a\u202eb", "a\u200bb",
    "a\uff07b",  # fullwidth apostrophe
    "a\uff1bb",  # fullwidth semicolon
    "a\u2028b",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_database_names_are_refused_naming_the_field(value: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        names.validate_database(value, "databases[0].database")
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.violations[0][0] == "databases[0].database"


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_user_names_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        names.validate_user(value, "users[2].user")
    assert exc.value.violations[0][0] == "users[2].user"


@pytest.mark.parametrize("value", ["mysql", "INFORMATION_SCHEMA", "performance_schema", "sys", "lost+found"])
def test_reserved_databases_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgument, match="reserved"):
        names.validate_database(value)


@pytest.mark.parametrize("value", ["root", "ROOT", "os_admin", "mariadb.sys"])
def test_reserved_users_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgument, match="reserved"):
        names.validate_user(value)


def test_length_limits_are_64_for_databases_and_80_for_users() -> None:
    assert names.validate_database("d" * 64) == "d" * 64
    with pytest.raises(InvalidArgument, match="64"):
        names.validate_database("d" * 65)
    assert names.validate_user("u" * 80) == "u" * 80
    with pytest.raises(InvalidArgument, match="80"):
        names.validate_user("u" * 81)


def test_ten_kilobyte_strings_are_refused_everywhere() -> None:
    big = "x" * 10_240
    for fn in (names.validate_database, names.validate_user, names.validate_host, names.validate_password):
        with pytest.raises(InvalidArgument):
            fn(big, "f")


def test_ordinary_unicode_names_are_accepted() -> None:
    assert names.validate_database("données_2024") == "données_2024"
    assert names.validate_user("jürgen-app") == "jürgen-app"


@pytest.mark.parametrize("host", ["%", "localhost", "10.0.0.%", "192.168.1.0/255.255.255.0", "::1", "db-1.example"])
def test_valid_hosts_are_accepted(host: str) -> None:
    assert names.validate_host(host) == host


def test_empty_host_means_any_host() -> None:
    assert names.validate_host("") == "%"


@pytest.mark.parametrize("host", ["a'b", "x; DROP", "a b", "h`", "a@b", "a\x00", "/24"])
def test_hostile_hosts_are_refused(host: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        names.validate_host(host, "users[0].host")
    assert exc.value.violations[0][0] == "users[0].host"


def test_passwords_with_quotes_are_allowed_but_control_characters_are_not() -> None:
    assert names.validate_password("p'a\"s`s;--") == "p'a\"s`s;--"
    with pytest.raises(InvalidArgument):
        names.validate_password("a\x00b")
    with pytest.raises(InvalidArgument):
        names.validate_password("")


def test_quote_ident_doubles_backticks() -> None:
    assert names.quote_ident("a`b") == "`a``b`"
    assert names.quote_ident("plain") == "`plain`"
