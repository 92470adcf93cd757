"""Validation and quoting of the MySQL identifiers (databases, users, hosts) and passwords that tenants
choose: the server checks them before a task starts, the agent checks them again before any SQL runs.

Values reach SQL only as pymysql parameters; identifiers (which cannot be parameters) only through
`quote_ident` after one of the validators accepted them.
"""
from __future__ import annotations

import re
import unicodedata

from reddwarf.common.errors import InvalidArgument

MAX_DATABASE = 64
MAX_USER = 80
MAX_HOST = 255
MAX_PASSWORD = 512

RESERVED_DATABASES = frozenset({"mysql", "information_schema", "performance_schema", "sys", "lost+found"})
# The internal admin account the agent uses; tenants can neither see nor touch it.
ADMIN_USER = "os_admin"
RESERVED_USERS = frozenset({"root", ADMIN_USER, "mariadb.sys"})

# Characters that could end a quoted identifier or a statement, or split a list or a path.
_FORBIDDEN = frozenset("'\"`;,/\\")
# A host part: hostname/IP, wildcards % and _, a netmask "/", ":" for IPv6 — slash only in a netmask.
# Always fullmatch: "$" would also accept a trailing newline.
_HOST_RE = re.compile(r"[A-Za-z0-9._%:-]+(/[0-9.]+)?")
# MariaDB/MySQL read "#mysql50#<name>" as the pre-5.1 file name <name>, bypassing the encoding of
# identifiers into file names: refused, however it is cased.
MYSQL50_PREFIX = "#mysql50#"


def _check_common(value: str, field: str, what: str, max_len: int) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string", field=field)
    if not value:
        raise InvalidArgument(f"{what} is required", field=field)
    if len(value) > max_len:
        raise InvalidArgument(f"{what} is longer than {max_len} characters", field=field)
    if value != value.strip():
        raise InvalidArgument(f"{what} may not start or end with white space", field=field)
    for ch in value:
        if ch in _FORBIDDEN:
            raise InvalidArgument(f"{what} may not contain {ch!r}", field=field)
        # Cc: control (incl. NUL), Cf: format (zero-width, bidi overrides), Zl/Zp: line separators.
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            raise InvalidArgument(f"{what} may not contain control or invisible characters", field=field)
    # Full-width and other compatibility look-alikes of forbidden characters (e.g. U+FF07 for ')
    # are refused too: some client tools fold them to ASCII.
    folded = unicodedata.normalize("NFKC", value)
    if any(ch in _FORBIDDEN for ch in folded):
        raise InvalidArgument(f"{what} may not contain look-alikes of quotes, slashes or separators",
                              field=field)
    if folded != value:
        # Ligatures and full-width letters ("ﬀ", "ｍｙｓｑｌ") read as other names: only NFKC-stable text.
        raise InvalidArgument(f"{what} must be in Unicode NFKC form (no ligatures or full-width look-alikes)",
                              field=field)


def skeleton(value: str) -> str:
    """What a name looks like without case and accents: "Ṃysql" → "mysql" (for reserved-name checks)."""
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def validate_database(name: str, field: str = "database") -> str:
    _check_common(name, field, "database name", MAX_DATABASE)
    if name.lower() in RESERVED_DATABASES or skeleton(name) in RESERVED_DATABASES:
        raise InvalidArgument(f"database name {name!r} is reserved", field=field)
    if skeleton(name).startswith(MYSQL50_PREFIX):
        raise InvalidArgument(f"database name may not start with {MYSQL50_PREFIX!r} (the server's legacy "
                              "file-name escape)", field=field)
    return name


def validate_user(name: str, field: str = "user") -> str:
    _check_common(name, field, "user name", MAX_USER)
    if name.lower() in RESERVED_USERS or skeleton(name) in RESERVED_USERS:
        raise InvalidArgument(f"user name {name!r} is reserved", field=field)
    return name


def validate_host(host: str, field: str = "host") -> str:
    """The host part of user@host; "" means "%" (any host)."""
    if host == "":
        return "%"
    if not isinstance(host, str) or len(host) > MAX_HOST or not _HOST_RE.fullmatch(host):
        raise InvalidArgument("host must be a host name, an IP address, a netmask or a % pattern",
                              field=field)
    return host


def validate_password(password: str, field: str = "password") -> str:
    """Passwords reach SQL only as parameters; still refuse what no client could type or log safely."""
    if not isinstance(password, str) or not password:
        raise InvalidArgument("password is required", field=field)
    if len(password) > MAX_PASSWORD:
        raise InvalidArgument(f"password is longer than {MAX_PASSWORD} characters", field=field)
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in password):
        raise InvalidArgument("password may not contain control characters", field=field)
    return password


def validate_charset(name: str, field: str = "character_set") -> str:
    """Character set and collation names: plain words, checked against the server's list by the driver."""
    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", name or ""):
        raise InvalidArgument("must be a character set or collation name", field=field)
    return name


def quote_ident(name: str) -> str:
    """Backtick-quotes an identifier, doubling backticks (defence in depth: validators refuse them)."""
    if "\x00" in name:
        raise InvalidArgument("identifier may not contain NUL", field="identifier")
    return "`" + name.replace("`", "``") + "`"
