"""`reddwarf`: the command line over the SDK. One resource prints as a Field | Value table (nothing cut,
the id and endpoint readable in 80 columns), several as a table whose ids are never cut. For scripts,
every printing command takes `--json` (or `-f json`), `-f value` and `-c FIELD` (repeatable):
`reddwarf instance show demo-db -f value -c id` prints just the id. Instances and backups are named by
id or display name; a name several share is an error listing their ids. Errors are one line
(`error: NOT_FOUND: instance ... (field: name)`) with a non-zero exit code.

Credentials come from the same places as the SDK's: REDDWARF_* environment (see demo-openrc.sh) or
~/.config/reddwarf/config.yaml, and `--token-file`. Secrets never go on the command line (other users see
it in ps, shells keep it in their history): tokens come from REDDWARF_TOKEN, the config file or
--token-file; passwords from --password-file, REDDWARF_PASSWORD or a prompt.
"""
from __future__ import annotations

import base64
import functools
import getpass
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from reddwarf.v1 import common_pb2

from .config import ConfigError
from .errors import ClientError
from .resources import DatabaseSpec, UserSpec
from .sdk import Client

app = typer.Typer(help="Red Dwarf: MySQL-compatible databases as a service.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
instance_app = typer.Typer(help="Instances.", no_args_is_help=True)
database_app = typer.Typer(help="Databases in an instance.", no_args_is_help=True)
user_app = typer.Typer(help="Users in an instance.", no_args_is_help=True)
root_app = typer.Typer(help="The root account of an instance.", no_args_is_help=True)
backup_app = typer.Typer(help="Backups.", no_args_is_help=True)
flavor_app = typer.Typer(help="Flavors (named limit sets).", no_args_is_help=True)
datastore_app = typer.Typer(help="Datastores.", no_args_is_help=True)
admin_app = typer.Typer(help="Operators: tenants, tokens, quotas, hosts, tasks, certificates.", no_args_is_help=True)
pki_app = typer.Typer(help="The deployment's certificate authority.", no_args_is_help=True)
host_app = typer.Typer(help="Container hosts: enroll over SSH, list, show, drain, delete.", no_args_is_help=True)
admin_app.add_typer(host_app, name="host")
admin_instance_app = typer.Typer(help="Instances, as an operator: migrate.", no_args_is_help=True)
admin_app.add_typer(admin_instance_app, name="instance")
admin_datastore_app = typer.Typer(help="Datastore versions, as an operator: patch.", no_args_is_help=True)
admin_app.add_typer(admin_datastore_app, name="datastore")
for sub, name in ((instance_app, "instance"), (database_app, "database"), (user_app, "user"), (root_app, "root"),
                  (backup_app, "backup"), (flavor_app, "flavor"), (datastore_app, "datastore"), (admin_app, "admin"),
                  (pki_app, "pki")):
    app.add_typer(sub, name=name)

out = Console()
err = Console(stderr=True)


class State:
    json = False
    # "table", "value" or "json"; columns: the -c selection (empty: all).
    format = "table"
    columns: list[str] = []
    endpoint: str | None = None
    token: str | None = None
    # Tests inject a factory; normally the SDK's configuration rules apply.
    factory: Callable[[], Client] | None = None


def client() -> Client:
    if State.factory is not None:
        return State.factory()
    kw = {k: v for k, v in (("endpoint", State.endpoint), ("token", State.token)) if v}
    return Client.from_env(**kw)


Column = tuple[str, Callable[[Any], Any]]
FORMATS = ("table", "value", "json")
SHORT = 12  # list cells up to this long are never folded
P = ParamSpec("P")
R = TypeVar("R")


def output_options(fn: Callable[P, R]) -> Callable[P, R]:
    """Adds --json, -f/--format (table, value, json) and repeatable -c/--column to a command that prints
    resources, as the openstack CLI has them: `-f value -c id` prints just the id."""
    extra = [
        inspect.Parameter("json_flag", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--json", help="Machine-readable output (= -f json).")),
        inspect.Parameter("output_format", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("", "-f", "--format", help="table (default), value or json.")),
        inspect.Parameter("column", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                          default=typer.Option([], "-c", "--column", help="Show only this field (repeatable).")),
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        json_flag, output_format = kwargs.pop("json_flag", False), kwargs.pop("output_format", "")
        columns = kwargs.pop("column", [])
        if output_format and output_format not in FORMATS:
            raise typer.BadParameter(f"-f must be one of {', '.join(FORMATS)}, not {output_format!r}")
        if json_flag or output_format:
            State.format = "json" if json_flag else output_format
            State.json = State.format == "json"
        State.columns = list(columns or [])
        return fn(*args, **kwargs)

    sig = inspect.signature(fn)
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]  # read by inspect.signature (typer)
        parameters=[*sig.parameters.values(), *extra])
    wrapper.__annotations__ = {**fn.__annotations__, **{p.name: p.annotation for p in extra}}
    return wrapper


def _key(title: str) -> str:
    return re.sub(r"[\s_-]+", "_", title.strip().lower())


def _select(columns: list[Column]) -> list[Column]:
    if not State.columns:
        return columns
    by_key = {_key(t): (t, fn) for t, fn in columns}
    unknown = [c for c in State.columns if _key(c) not in by_key]
    if unknown:
        raise typer.BadParameter(f"no column {', '.join(unknown)}; the columns are: "
                                 + ", ".join(_key(t) for t, _ in columns))
    return [by_key[_key(c)] for c in State.columns]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def emit(items: Iterable[Message] | Message, columns: list[Column]) -> None:
    """One message: a Field | Value table (one row per field, nothing cut). Several: a table with one row
    each, ids never cut (other columns wrap). -f value: bare values (one per line for one message, a line
    per row for several); -f json / --json: the messages as JSON (-c keeps those top-level keys)."""
    single = isinstance(items, Message)
    rows = [items] if isinstance(items, Message) else list(items)
    if State.format == "json" or State.json:
        data = [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in rows]
        if State.columns:
            wanted = {_key(c) for c in State.columns}
            data = [{k: v for k, v in d.items() if _key(k) in wanted} for d in data]
        typer.echo(json.dumps(data[0] if single else data, indent=2))
        return
    cols = _select(columns)
    if State.format == "value":
        for m in rows:
            values = [_text(fn(m)) for _, fn in cols]
            typer.echo("\n".join(values) if single else " ".join(values))
        return
    if single:
        table = Table(show_header=True, header_style="bold")
        table.add_column("Field", no_wrap=True)
        table.add_column("Value", overflow="fold")
        for title, fn in cols:
            table.add_row(title, _text(fn(rows[0])))
        out.print(table, markup=False, highlight=False)
        return
    # No vertical rules: more room for the values.
    table = Table(show_header=True, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    cells = [[_text(fn(m)) for _, fn in cols] for m in rows]
    widest = [max([len(v[n]) for v in cells] + [len(title) if _key(title) == "id" else 0])
              for n, (title, _) in enumerate(cols)]
    ids = [n for n, (title, _) in enumerate(cols) if _key(title) == "id"]
    # What is left of the terminal once the ids are whole (3 columns of padding and rule per column).
    budget = out.width - sum(widest[n] for n in ids) - 3 * len(cols)
    for n, (title, _) in enumerate(cols):
        if n in ids:
            # The id is what users copy: it keeps its full width, the other columns wrap around it.
            table.add_column(title, no_wrap=True, min_width=widest[n])
            continue
        # Short values (a status, a flavor) stay whole while there is room (leaving 4 for each later column);
        # long ones fold.
        later = sum(1 for m in range(n + 1, len(cols)) if m not in ids)
        keep = widest[n] if widest[n] <= SHORT and widest[n] <= budget - 4 * later else None
        budget -= keep or 4
        table.add_column(title, overflow="fold", min_width=keep)
    for v in cells:
        table.add_row(*v)
    out.print(table, markup=False, highlight=False)


def short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def enum_name(msg: Any, field: str) -> str:
    """An enum field's value without its enum's prefix (INSTANCE_STATUS_ACTIVE → ACTIVE)."""
    enum = msg.DESCRIPTOR.fields_by_name[field].enum_type
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    value = enum.values_by_number.get(getattr(msg, field))
    return str(value.name).removeprefix(prefix) if value is not None else str(getattr(msg, field))


def status_name(msg: Any) -> str:
    return enum_name(msg, "status")


def ts(msg: Any, field: str) -> str:
    return str(getattr(msg, field).ToJsonString()) if msg.HasField(field) else ""


def endpoints(i: Any) -> str:
    """MySQL's endpoint; an extra service's (memcached) is in the services field."""
    return ", ".join(f"{e.host}:{e.port}" for e in i.endpoints if e.service in ("", "mysql"))


def services(i: Any) -> str:
    """Extra services beside MySQL: name, endpoint and the state the guest reports ("memcached 10.0.0.2:11211
    RUNNING")."""
    out = []
    for name in i.services:
        where = " ".join(f"{e.host}:{e.port}" for e in i.endpoints if e.service == name)
        state = i.health.services.get(name)
        out.append(" ".join(x for x in (name, where, _service_state(state) if state else "") if x))
    return ", ".join(out)


def _service_state(value: common_pb2.ServiceState.ValueType) -> str:
    return common_pb2.ServiceState.Name(value).removeprefix("SERVICE_STATE_")


INSTANCE_COLS: list[Column] = [
    ("id", lambda i: i.id), ("name", lambda i: i.display_name), ("status", status_name),
    ("flavor", lambda i: short(i.flavor)), ("volume GB", lambda i: i.volume.size_gb), ("endpoint", endpoints),
]
# One instance (show, create, resize...): everything a user looks for.
INSTANCE_FIELDS: list[Column] = INSTANCE_COLS + [
    ("health", lambda i: enum_name(i.health, "service_state") if i.health.service_state else ""),
    ("volume used MB", lambda i: round(i.volume.used_bytes / 2**20, 1)),
    ("datastore", lambda i: i.datastore), ("datastore version", lambda i: i.datastore_version),
    ("created", lambda i: ts(i, "create_time")), ("updated", lambda i: ts(i, "update_time")),
    ("task", lambda i: i.task_step or ""), ("fault", lambda i: i.fault.message),
    ("restored from", lambda i: short(i.restored_from) if i.restored_from else ""),
    ("maintenance window", lambda i: _window_text(i.maintenance_window) if i.maintenance_window.weekday else ""),
    ("pending maintenance", lambda i: "; ".join(
        f"{m.kind} {m.state} at {m.apply_after.ToDatetime():%Y-%m-%d %H:%M} UTC" for m in i.pending_maintenance)),
    ("agent version", lambda i: i.agent_version),
    ("tags", lambda i: tag_text(i.tags)), ("deletion protection", lambda i: "on" if i.deletion_protection else "off"),
    ("configuration", lambda i: short(i.configuration) if i.configuration else ""),
    ("host", lambda i: short(i.host) if i.host else ""), ("volume driver", lambda i: i.volume.driver),
    ("services", services),
    ("last upgrade", lambda i: (f"{i.last_upgrade.from_version} -> {i.last_upgrade.to_version} "
                                f"{i.last_upgrade.outcome}, downtime {i.last_upgrade.downtime_seconds:.1f} s")
     if i.HasField("last_upgrade") else ""),
]


def tag_text(tags: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))


def parse_tags(items: list[str], option: str = "--tag") -> dict[str, str]:
    """["env=prod", "team=db"] -> {"env": "prod", "team": "db"} (the server validates keys and values)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{option} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


TAG_OPTION = typer.Option([], "--tag", help="KEY=VALUE tag (repeatable).")
TAG_FILTER = typer.Option([], "--tag", help="Only those with this tag: KEY=VALUE, or KEY for any value "
                          "(repeatable: all must match).")


def run(fn: Callable[[], None]) -> None:
    try:
        fn()
    except ClientError as e:
        err.print(f"error: {e.one_line()}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2 if e.code_name in ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS") else 1) from None
    except ConfigError as e:  # no endpoint, an unreadable config file: a line, not a traceback
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


# -- secrets: never from the command line ---------------------------------------------------------
PASSWORD_ENV = "REDDWARF_PASSWORD"
NO_SECRET_ARGS = ("secrets are not taken on the command line (visible in ps and shell history): ")


def _refuse_secret_arg(what: str, instead: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value:
            raise typer.BadParameter(f"{NO_SECRET_ARGS}give the {what} through {instead}")
        return value
    return check


def read_secret_file(path: Path, what: str) -> str:
    """The first line of a file (a trailing newline is not part of the secret)."""
    try:
        lines = path.expanduser().read_text().splitlines()
    except OSError as e:
        raise typer.BadParameter(f"cannot read the {what} file {path}: {e.strerror}") from None
    if not lines or not lines[0]:
        raise typer.BadParameter(f"the {what} file {path} is empty")
    return lines[0]


def secret(file: Path | None, env_var: str | None, what: str, confirm: bool = False) -> str:
    """A password from --password-file, else the environment, else a prompt on the terminal."""
    if file is not None:
        return read_secret_file(file, what)
    value = os.environ.get(env_var) if env_var else None
    if value:
        return value
    if not sys.stdin.isatty():
        raise typer.BadParameter(f"no {what}: give --password-file, set {PASSWORD_ENV}, or run in a terminal to "
                                 "be prompted")
    value = getpass.getpass(f"{what.capitalize()}: ")
    if confirm and getpass.getpass(f"Repeat the {what}: ") != value:
        raise typer.BadParameter(f"the two {what}s differ")
    if not value:
        raise typer.BadParameter(f"the {what} is empty")
    return value


PASSWORD_FILE = typer.Option(None, "--password-file", help=f"Read the password from this file's first line "
                             f"(else {PASSWORD_ENV}, else a prompt).")
# Kept hidden only to refuse it with a pointer to the safe ways.
PASSWORD_ARG = typer.Option(None, "--password", hidden=True,
                            callback=_refuse_secret_arg("password", f"--password-file, {PASSWORD_ENV} or the prompt"))


@app.callback()
def main_options(json_output: bool = typer.Option(False, "--json", help="Machine-readable output."),
                 endpoint: str = typer.Option(
                     None, "--endpoint", help="API host:port, or several comma-separated: calls are spread over "
                     "them and safe ones retried on another (or REDDWARF_ENDPOINT)."),
                 token_file: Path = typer.Option(None, "--token-file",
                                                 help="Read the token from this file (or REDDWARF_TOKEN)."),
                 _token: str = typer.Option(None, "--token", hidden=True, callback=_refuse_secret_arg(
                     "token", "REDDWARF_TOKEN, the config file or --token-file"))) -> None:
    State.json, State.endpoint = json_output, endpoint
    State.format, State.columns = ("json" if json_output else "table"), []
    State.token = read_secret_file(token_file, "token") if token_file is not None else None


# -- catalog ---------------------------------------------------------------------------------------
@flavor_app.command("list")
@output_options
def flavor_list() -> None:
    run(lambda: emit(client().list_flavors(), [
        ("id", lambda f: f.id), ("memory MB", lambda f: f.limits.memory_mb), ("cpu shares", lambda f: f.limits.cpu_shares),
        ("cpu cap (m)", lambda f: f.limits.cpu_limit_millicores or "-"), ("processes", lambda f: f.limits.max_processes),
        ("volume GB", lambda f: f.default_volume_gb)]))


@flavor_app.command("show")
@output_options
def flavor_show(flavor: str) -> None:
    run(lambda: emit(client().get_flavor(flavor), [
        ("id", lambda f: f.id), ("name", lambda f: f.display_name), ("memory MB", lambda f: f.limits.memory_mb),
        ("cpu shares", lambda f: f.limits.cpu_shares), ("cpu cap (m)", lambda f: f.limits.cpu_limit_millicores or "-"),
        ("processes", lambda f: f.limits.max_processes), ("volume GB", lambda f: f.default_volume_gb)]))


@datastore_app.command("list")
@output_options
def datastore_list() -> None:
    run(lambda: emit(client().list_datastores(), [
        ("id", lambda d: d.id), ("default", lambda d: d.default_version),
        ("versions", lambda d: ", ".join(v.version for v in d.versions))]))


# -- instances -------------------------------------------------------------------------------------
INSTANCE_ARG = typer.Argument(..., help="The instance's id or name.")
BACKUP_ARG = typer.Argument(..., help="The backup's id or name.")


def with_instance(call: Callable[[Client, str], R], instance: str) -> R:
    """call(client, id) for the instance with this id or name (an ambiguous name is an error naming the ids)."""
    c = client()
    return call(c, c.instance_id(instance))


def _progress_until(c: Client, name: str, status: str = "ACTIVE", timeout: float = 900) -> Any:
    """A live progress display driven by WatchInstance (the SDK falls back to polling)."""
    if State.json or not out.is_terminal:
        return c.wait_for(name, status, timeout=timeout)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=err, transient=True) as progress:
        task = progress.add_task("BUILD", total=100)

        def on_event(inst: Any) -> None:
            label = status_name(inst) + (f" · {inst.task_step}" if inst.task_step else "")
            progress.update(task, description=label, completed=inst.task_progress_percent)
        return c.wait_for(name, status, timeout=timeout, on_event=on_event)


@instance_app.command("create")
@output_options
def instance_create(name: str, flavor: str = typer.Option(..., "--flavor"), size: int = typer.Option(0, "--size",
                    help="Volume GB (default: the flavor's)."),
                    database: list[str] = typer.Option([], "--database", help="Initial database (repeatable)."),
                    user: list[str] = typer.Option([], "--user", help="user[=db,db] (repeatable); passwords "
                                                   "from --password-file (one line per --user), "
                                                   f"{PASSWORD_ENV} (one user) or a prompt."),
                    password_file: Path = PASSWORD_FILE, _password: str = PASSWORD_ARG,
                    restore_from: str = typer.Option(None, "--restore-from", help="Backup id to restore."),
                    allowed_cidr: list[str] = typer.Option([], "--allowed-cidr",
                                                           help="Network users may connect from (repeatable)."),
                    require_tls: bool = typer.Option(False, "--require-tls",
                                                     help="Refuse MySQL connections that are not TLS."),
                    service: list[str] = typer.Option([], "--service", help="Extra service beside MySQL in the "
                                                      "instance's container: memcached (repeatable)."),
                    memcached: bool = typer.Option(False, "--memcached", help="Same as --service memcached."),
                    tag: list[str] = TAG_OPTION,
                    deletion_protection: bool = typer.Option(False, "--deletion-protection",
                                                             help="Refuse deletes until it is turned off."),
                    configuration: str = typer.Option(None, "--configuration",
                                                      help="Configuration group (id or name) in effect from the "
                                                           "start."),
                    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until ACTIVE.")) -> None:
    tags = parse_tags(tag)
    specs = []
    for spec in user:
        if ":" in spec:  # the old user:password[:dbs] form: refused rather than read as something else
            raise typer.BadParameter(f"--user takes user[=db1,db2]; {NO_SECRET_ARGS}use --password-file, "
                                     f"{PASSWORD_ENV} or the prompt")
        uname, _, dbs = spec.partition("=")  # not `name`: that is the instance's
        specs.append((uname, tuple(d for d in dbs.split(",") if d)))
    passwords: list[str] = []
    if specs and password_file is not None:
        try:
            passwords = password_file.expanduser().read_text().splitlines()
        except OSError as e:
            raise typer.BadParameter(f"cannot read the password file {password_file}: {e.strerror}") from None
        if len(passwords) < len(specs) or not all(passwords[:len(specs)]):
            raise typer.BadParameter(f"--password-file needs one non-empty line per --user ({len(specs)})")
    elif len(specs) == 1 and os.environ.get(PASSWORD_ENV):
        passwords = [os.environ[PASSWORD_ENV]]
    elif specs:
        passwords = [secret(None, None, f"password for {n}", confirm=True) for n, _ in specs]
    users = [UserSpec(name=n, password=pw, databases=dbs) for (n, dbs), pw in zip(specs, passwords, strict=False)]

    def go() -> None:
        c = client()
        inst = c.create_instance(name, flavor, size, databases=[DatabaseSpec(name=d) for d in database], users=users,
                                 restore_from=c.backup_id(restore_from) if restore_from else None,
                                 allowed_cidrs=allowed_cidr, require_secure_transport=require_tls, tags=tags,
                                 deletion_protection=deletion_protection,
                                 configuration=c.configuration_id(configuration) if configuration else "",
                                 services=[*service, *(["memcached"] if memcached and "memcached" not in service
                                                       else [])])
        if wait:
            inst = _progress_until(c, inst.name)
        emit(inst, INSTANCE_FIELDS)
    run(go)


@instance_app.command("list")
@output_options
def instance_list(tag: list[str] = TAG_FILTER) -> None:
    run(lambda: emit(client().list_instances(tags=tag), INSTANCE_COLS))


@instance_app.command("show")
@output_options
def instance_show(instance: str = INSTANCE_ARG) -> None:
    run(lambda: emit(client().find_instance(instance), INSTANCE_FIELDS))


@instance_app.command("ca")
def instance_ca(instance: str = INSTANCE_ARG, output: Path | None = typer.Option(None, "--output", "-o",
                                                           help="Save the CA certificate (PEM) to this file.")) -> None:
    """The CA certificate to verify the instance's MySQL TLS with (e.g. mariadb --ssl-ca=FILE
    --ssl-verify-server-cert -h SERVER_NAME)."""
    def go() -> None:
        c = client()
        ca = c.get_instance_ca(c.instance_id(instance))
        if output is None:
            typer.echo(ca.ca_pem, nl=False)
            return
        output.write_text(ca.ca_pem)
        typer.echo(f"saved the MySQL CA of {instance} to {output}; verify the server name {ca.server_name}", err=True)
    run(go)


@instance_app.command("delete")
@output_options
def instance_delete(instance: str = INSTANCE_ARG,
                    final_backup: str = typer.Option(None, "--final-backup", help="Take a full backup of this "
                                                     "name first; delete only once it is COMPLETED."),
                    final_backup_tag: list[str] = typer.Option([], "--final-backup-tag",
                                                               help="KEY=VALUE tag of the final backup.")) -> None:
    tags = parse_tags(final_backup_tag, "--final-backup-tag")
    if tags and not final_backup:
        raise typer.BadParameter("--final-backup-tag needs --final-backup")
    run(lambda: emit(with_instance(lambda c, i: c.delete_instance(i, final_backup=final_backup,
                                                                  final_backup_tags=tags), instance), INSTANCE_FIELDS))


@instance_app.command("update")
@output_options
def instance_update(instance: str = INSTANCE_ARG, name: str | None = typer.Option(None, "--name", help="New name."),
                    deletion_protection: bool | None = typer.Option(
                        None, "--deletion-protection/--no-deletion-protection", help="Refuse deletes (or not)."),
                    tag: list[str] = typer.Option([], "--tag", help="Set KEY=VALUE (repeatable)."),
                    remove_tag: list[str] = typer.Option([], "--remove-tag", help="Remove KEY (repeatable)."),
                    clear_tags: bool = typer.Option(False, "--clear-tags",
                                                    help="Replace every tag with the --tag ones (none: no tags).")
                    ) -> None:
    """Renames an instance, turns deletion protection on or off, sets and removes tags."""
    tags = parse_tags(tag)
    if clear_tags and remove_tag:
        raise typer.BadParameter("--clear-tags already removes every tag; drop --remove-tag")
    if name is None and deletion_protection is None and not tags and not remove_tag and not clear_tags:
        raise typer.BadParameter("nothing to change: give --name, --deletion-protection/--no-deletion-protection, "
                                 "--tag, --remove-tag or --clear-tags")
    run(lambda: emit(with_instance(lambda c, i: c.update_instance(
        i, name=name, deletion_protection=deletion_protection, tags=tags if clear_tags else None,
        set_tags=None if clear_tags else tags, remove_tags=remove_tag), instance), INSTANCE_FIELDS))


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _window_text(w: Message) -> str:
    return f"{WEEKDAYS[w.weekday - 1]} {w.start_time} UTC, {w.duration_minutes} min"  # type: ignore[attr-defined]


@instance_app.command("maintenance-window")
@output_options
def instance_maintenance_window(instance: str = INSTANCE_ARG,
                                weekday: str = typer.Option(..., "--weekday", help="mon..sun or 1..7 (1 = Monday)."),
                                start: str = typer.Option(..., "--start", help="HH:MM in UTC."),
                                duration: int = typer.Option(60, "--duration", help="Minutes (30..1440).")) -> None:
    """Sets when the instance's pending maintenance runs (a weekly window in UTC)."""
    day = WEEKDAYS.index(weekday.lower()[:3]) + 1 if weekday.lower()[:3] in WEEKDAYS else \
        int(weekday) if weekday.isdigit() else 0  # 0: the server refuses it, naming the field
    run(lambda: emit(with_instance(lambda c, i: c.set_maintenance_window(i, day, start, duration), instance),
                     INSTANCE_FIELDS))


@instance_app.command("apply-pending")
@output_options
def instance_apply_pending(instance: str = INSTANCE_ARG,
                           kind: list[str] = typer.Option([], "--kind", help="Only this kind (restart, "
                                                          "agent_upgrade, upgrade, patch); repeatable.")) -> None:
    """Runs the instance's pending maintenance now instead of in its window."""
    run(lambda: emit(with_instance(lambda c, i: c.apply_pending_maintenance(i, kind), instance), INSTANCE_FIELDS))


@instance_app.command("upgrade-agent")
@output_options
def instance_upgrade_agent(instance: str = INSTANCE_ARG,
                           now: bool = typer.Option(False, "--now", help="Now instead of in the window.")) -> None:
    """Admins: upgrades the instance's guest agent to the server's build; mysqld keeps running."""
    run(lambda: emit(with_instance(lambda c, i: c.schedule_agent_upgrade(i, now), instance), INSTANCE_FIELDS))


@instance_app.command("stop")
@output_options
def instance_stop(instance: str = INSTANCE_ARG,
                  wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until SHUTDOWN.")) -> None:
    """Stops mysqld and the container; the data stays on the volume (`instance start` brings it back)."""
    def go() -> None:
        c = client()
        i = c.stop_instance(c.instance_id(instance))
        emit(_progress_until(c, i.name, "SHUTDOWN") if wait else i, INSTANCE_FIELDS)
    run(go)


@instance_app.command("start")
@output_options
def instance_start(instance: str = INSTANCE_ARG,
                   wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until ACTIVE.")) -> None:
    """Starts a stopped instance."""
    def go() -> None:
        c = client()
        i = c.start_instance(c.instance_id(instance))
        emit(_progress_until(c, i.name) if wait else i, INSTANCE_FIELDS)
    run(go)


@instance_app.command("restart")
@output_options
def instance_restart(instance: str = INSTANCE_ARG) -> None:
    run(lambda: emit(with_instance(lambda c, i: c.restart_instance(i), instance), INSTANCE_FIELDS))


@instance_app.command("resize")
@output_options
def instance_resize(instance: str = INSTANCE_ARG, flavor: str = typer.Option(..., "--flavor"),
                    wait: bool = typer.Option(True, "--wait/--no-wait")) -> None:
    def go() -> None:
        c = client()
        i = c.resize_flavor(c.instance_id(instance), flavor)
        emit(_progress_until(c, i.name) if wait else i, INSTANCE_FIELDS)
    run(go)


@instance_app.command("upgrade")
@output_options
def instance_upgrade(instance: str = INSTANCE_ARG, datastore_version: str = typer.Option(..., "--datastore-version"),
                     wait: bool = typer.Option(True, "--wait/--no-wait"),
                     in_window: bool = typer.Option(False, "--in-maintenance-window",
                                                    help="Check now, run in the instance's next window.")) -> None:
    """Moves the instance to a newer datastore version (a backup first; rolled back on failure)."""
    def go() -> None:
        c = client()
        i = c.upgrade_instance(c.instance_id(instance), datastore_version, in_maintenance_window=in_window)
        emit(_progress_until(c, i.name) if wait and not in_window else i, INSTANCE_FIELDS)
    run(go)


@instance_app.command("resize-volume")
@output_options
def instance_resize_volume(instance: str = INSTANCE_ARG, size: int = typer.Option(..., "--size")) -> None:
    run(lambda: emit(with_instance(lambda c, i: c.resize_volume(i, size), instance), INSTANCE_FIELDS))


@instance_app.command("watch")
@output_options
def instance_watch(instance: str = INSTANCE_ARG, timeout: float = typer.Option(600, "--timeout")) -> None:
    def go() -> None:
        c = client()
        for ev in c.watch_instance(c.instance_id(instance), timeout=timeout):
            i = ev.instance
            if State.json:
                out.print_json(json_format.MessageToJson(ev))
            else:
                out.print(f"{ev.change:8} {status_name(i):10} {i.task_step or '-':16} {i.task_progress_percent:3d}%")
    run(go)


# -- databases, users, root ------------------------------------------------------------------------
@database_app.command("create")
@output_options
def database_create(instance: str = INSTANCE_ARG, name: str = typer.Argument(...)) -> None:
    run(lambda: emit(with_instance(lambda c, i: c.create_database(i, name), instance),
                     [("database", lambda d: d.database)]))


@database_app.command("list")
@output_options
def database_list(instance: str = INSTANCE_ARG) -> None:
    run(lambda: emit(with_instance(lambda c, i: c.list_databases(i), instance),
                     [("database", lambda d: d.database), ("charset", lambda d: d.character_set),
                      ("collation", lambda d: d.collation)]))


@database_app.command("delete")
def database_delete(instance: str = INSTANCE_ARG, name: str = typer.Argument(...)) -> None:
    run(lambda: with_instance(lambda c, i: c.delete_database(i, name), instance))


USER_COLS: list[tuple[str, Callable[[Any], Any]]] = [("user", lambda u: u.user), ("host", lambda u: u.host or "%"),
                                                     ("databases", lambda u: ", ".join(u.databases))]


@user_app.command("create")
@output_options
def user_create(instance: str = INSTANCE_ARG, name: str = typer.Argument(...), password_file: Path = PASSWORD_FILE,
                _password: str = PASSWORD_ARG,
                host: str = typer.Option("%", "--host"), database: list[str] = typer.Option([], "--database")) -> None:
    password = secret(password_file, PASSWORD_ENV, "password", confirm=True)
    run(lambda: emit(with_instance(lambda c, i: c.create_user(i, name, password, host, databases=database),
                                   instance), USER_COLS))


@user_app.command("list")
@output_options
def user_list(instance: str = INSTANCE_ARG) -> None:
    run(lambda: emit(with_instance(lambda c, i: c.list_users(i), instance), USER_COLS))


@user_app.command("delete")
def user_delete(instance: str = INSTANCE_ARG, name: str = typer.Argument(...),
                host: str = typer.Option("%", "--host")) -> None:
    run(lambda: with_instance(lambda c, i: c.delete_user(i, name, host), instance))


@user_app.command("grant")
@output_options
def user_grant(instance: str = INSTANCE_ARG, name: str = typer.Argument(...), database: list[str] = typer.Argument(...),
               host: str = typer.Option("%", "--host")) -> None:
    run(lambda: emit(with_instance(lambda c, i: c.grant_access(i, name, database, host), instance), USER_COLS))


@user_app.command("revoke")
@output_options
def user_revoke(instance: str = INSTANCE_ARG, name: str = typer.Argument(...), database: str = typer.Argument(...),
                host: str = typer.Option("%", "--host")) -> None:
    run(lambda: emit(with_instance(lambda c, i: c.revoke_access(i, name, database, host), instance), USER_COLS))


@user_app.command("password")
@output_options
def user_password(instance: str = INSTANCE_ARG, name: str = typer.Argument(...), password_file: Path = PASSWORD_FILE,
                  _password: str = PASSWORD_ARG, host: str = typer.Option("%", "--host")) -> None:
    password = secret(password_file, PASSWORD_ENV, "new password", confirm=True)
    run(lambda: emit(with_instance(lambda c, i: c.change_password(i, name, password, host), instance), USER_COLS))


@root_app.command("enable")
@output_options
def root_enable(instance: str = INSTANCE_ARG) -> None:
    run(lambda: emit(with_instance(lambda c, i: c.enable_root(i), instance),
                     [("user", lambda r: r.user), ("password (shown once)", lambda r: r.password)]))


@root_app.command("disable")
def root_disable(instance: str = INSTANCE_ARG) -> None:
    run(lambda: with_instance(lambda c, i: c.disable_root(i), instance))


@root_app.command("status")
@output_options
def root_status(instance: str = INSTANCE_ARG) -> None:
    def go() -> None:
        enabled = with_instance(lambda c, i: c.root_enabled(i), instance)
        out.print_json(json.dumps({"root_enabled": enabled})) if State.json else out.print(
            "root enabled" if enabled else "root not enabled")
    run(go)


# -- backups ---------------------------------------------------------------------------------------
BACKUP_COLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("id", lambda b: b.id), ("name", lambda b: b.display_name), ("instance", lambda b: short(b.instance)),
    ("status", status_name), ("kind", lambda b: b.kind), ("size", lambda b: b.size_bytes),
    ("verify", lambda b: enum_name(b, "verify_status"))]
BACKUP_FIELDS: list[Column] = BACKUP_COLS + [
    ("description", lambda b: b.description), ("parent", lambda b: short(b.parent) if b.parent else ""),
    ("datastore", lambda b: b.datastore), ("datastore version", lambda b: b.datastore_version),
    ("created", lambda b: ts(b, "create_time")), ("updated", lambda b: ts(b, "update_time")),
    ("sha256", lambda b: b.sha256), ("fault", lambda b: b.fault.message), ("tags", lambda b: tag_text(b.tags))]


@backup_app.command("create")
@output_options
def backup_create(instance: str = INSTANCE_ARG, name: str = typer.Argument(...),
                  parent: str = typer.Option(None, "--parent", help="Incremental on this backup (id or name)."),
                  description: str = typer.Option("", "--description"), tag: list[str] = TAG_OPTION) -> None:
    tags = parse_tags(tag)

    def go() -> None:
        c = client()
        emit(c.create_backup(c.instance_id(instance), name, description, c.backup_id(parent) if parent else None,
                             tags=tags), BACKUP_FIELDS)
    run(go)


@backup_app.command("list")
@output_options
def backup_list(instance: str = typer.Option(None, "--instance", help="Only this instance's (id or name)."),
                tag: list[str] = TAG_FILTER) -> None:
    def go() -> None:
        c = client()
        emit(c.list_backups(c.instance_id(instance) if instance else None, tags=tag), BACKUP_COLS)
    run(go)


@backup_app.command("update")
@output_options
def backup_update(backup: str = BACKUP_ARG, name: str | None = typer.Option(None, "--name", help="New name."),
                  description: str | None = typer.Option(None, "--description"),
                  tag: list[str] = typer.Option([], "--tag", help="Set KEY=VALUE (repeatable)."),
                  remove_tag: list[str] = typer.Option([], "--remove-tag", help="Remove KEY (repeatable)."),
                  clear_tags: bool = typer.Option(False, "--clear-tags",
                                                  help="Replace every tag with the --tag ones (none: no tags).")
                  ) -> None:
    """Renames, describes or tags a backup."""
    tags = parse_tags(tag)
    if clear_tags and remove_tag:
        raise typer.BadParameter("--clear-tags already removes every tag; drop --remove-tag")
    if name is None and description is None and not tags and not remove_tag and not clear_tags:
        raise typer.BadParameter("nothing to change: give --name, --description, --tag, --remove-tag or --clear-tags")

    def go() -> None:
        c = client()
        emit(c.update_backup(c.backup_id(backup), name=name, description=description,
                             tags=tags if clear_tags else None, set_tags=None if clear_tags else tags,
                             remove_tags=remove_tag), BACKUP_FIELDS)
    run(go)


@backup_app.command("show")
@output_options
def backup_show(backup: str = BACKUP_ARG) -> None:
    run(lambda: emit(client().find_backup(backup), BACKUP_FIELDS))


@backup_app.command("delete")
def backup_delete(backup: str = BACKUP_ARG, cascade: bool = typer.Option(False, "--cascade")) -> None:
    def go() -> None:
        c = client()
        c.delete_backup(c.backup_id(backup), cascade)
    run(go)


@backup_app.command("verify")
@output_options
def backup_verify(backup: str = BACKUP_ARG) -> None:
    def go() -> None:
        c = client()
        emit(c.verify_backup(c.backup_id(backup)), BACKUP_FIELDS)
    run(go)


# -- admin -----------------------------------------------------------------------------------------
@admin_app.command("tenant-create")
@output_options
def tenant_create(tenant_id: str, display_name: str = typer.Option("", "--name")) -> None:
    run(lambda: emit(client().create_tenant(tenant_id, display_name), [("id", lambda t: t.id)]))


@admin_app.command("tenant-list")
@output_options
def tenant_list() -> None:
    run(lambda: emit(client().list_tenants(), [("id", lambda t: t.id), ("name", lambda t: t.display_name),
                                               ("instances", lambda t: t.quota.instances)]))


@admin_app.command("token-create")
@output_options
def token_create(tenant: str, admin: bool = typer.Option(False, "--admin"),
                 ttl: int = typer.Option(0, "--ttl", help="Seconds; 0 = the server's default (30 days unless "
                                         "configured otherwise).")) -> None:
    run(lambda: emit(client().create_token(tenant, admin=admin, ttl_seconds=ttl),
                     [("id", lambda t: t.id), ("secret (shown once)", lambda t: t.secret)]))


def ssh_target(user_at_addr: str, port: int | None) -> str:
    """user@ADDR[:port] as EnrollHost takes it (an IPv6 address bracketed)."""
    user, sep, addr = user_at_addr.rpartition("@")
    if not sep or not user or not addr:
        raise typer.BadParameter("--ssh must be user@address, e.g. root@10.0.0.5")
    if ":" in addr and not addr.startswith("["):
        addr = f"[{addr}]"
    return f"{user}@{addr}" + (f":{port}" if port else "")


def key_is_encrypted(data: bytes) -> bool:
    """A PEM key marked ENCRYPTED, or an OpenSSH key whose cipher is not "none"."""
    if b"ENCRYPTED" in data:
        return True
    body = b"".join(ln for ln in data.splitlines() if ln and not ln.startswith(b"-----"))
    try:
        raw = base64.b64decode(body)
    except ValueError:
        return False
    return raw.startswith(b"openssh-key-v1\0") and not raw[15:].startswith(b"\0\0\0\x04none")


def host_instances(h: Any) -> str:
    return ", ".join(short(i) for i in h.instances) or "-"


HOST_COLS: list[Column] = [
    ("id", lambda h: h.id), ("address", lambda h: h.address), ("mode", lambda h: h.mode),
    ("state", lambda h: enum_name(h, "state")), ("volume driver", lambda h: h.volume_driver),
    ("memory MB", lambda h: f"{h.capacity.memory_mb_allocated}/{h.capacity.memory_mb_total}"),
    ("storage GB", lambda h: f"{h.capacity.storage_gb_allocated}/{h.capacity.storage_gb_total}"),
    ("instances", lambda h: len(h.instances)), ("iscsi portal", lambda h: h.iscsi_portal)]
HOST_FIELDS: list[Column] = [
    ("id", lambda h: h.id), ("address", lambda h: h.address), ("mode", lambda h: h.mode),
    ("state", lambda h: enum_name(h, "state")),
    ("container driver", lambda h: h.container_driver), ("volume driver", lambda h: h.volume_driver),
    ("iscsi portal", lambda h: h.iscsi_portal), ("initiator iqn", lambda h: h.initiator_iqn),
    ("cpus", lambda h: h.capacity.cpus),
    ("memory MB (allocated/total)", lambda h: f"{h.capacity.memory_mb_allocated}/{h.capacity.memory_mb_total}"),
    ("storage GB (allocated/total)", lambda h: f"{h.capacity.storage_gb_allocated}/{h.capacity.storage_gb_total}"),
    ("storage GB free", lambda h: h.capacity.storage_gb_free), ("containers", lambda h: h.capacity.containers),
    ("memory overcommit", lambda h: h.memory_overcommit), ("storage overcommit", lambda h: h.storage_overcommit),
    ("last seen", lambda h: ts(h, "last_seen")), ("instances", host_instances)]
SSH_PASSWORD_ENV = "REDDWARF_SSH_PASSWORD"


@host_app.command("enroll")
@output_options
def host_enroll(host_id: str = typer.Argument(..., metavar="NAME", help="The new host's id."),
                ssh: str = typer.Option(..., "--ssh", help="user@address to log in as (e.g. root@10.0.0.5)."),
                port: int = typer.Option(None, "--port", help="SSH port (default 22)."),
                identity: Path | None = typer.Option(None, "--identity", help="Private key file on THIS machine; sent "
                                              "to the server over mTLS, used in memory for this call only."),
                server_identity: str = typer.Option("", "--server-identity",
                                                    help="Instead: a private key file ON THE SERVER (a deploy key)."),
                host_key: str = typer.Option(..., "--host-key", help="The host's SSH host key fingerprint, "
                                             "SHA256:... as `ssh-keygen -lf` prints it (no trust on first use)."),
                hostd_port: int = typer.Option(0, "--hostd-port", help="hostd's port there (default: the server's)."),
                password_file: Path | None = typer.Option(None, "--ssh-password-file", help="The key's passphrase, or the "
                                                   f"login password without a key (else {SSH_PASSWORD_ENV}, else a "
                                                   "prompt)."),
                _password: str = typer.Option(None, "--ssh-password", hidden=True, callback=_refuse_secret_arg(
                    "SSH password", f"--ssh-password-file, {SSH_PASSWORD_ENV} or the prompt"))) -> None:
    """Installs hostd on a machine over SSH, starts it and registers the host."""
    key = b""
    if identity is not None:
        try:
            key = identity.expanduser().read_bytes()
        except OSError as e:
            raise typer.BadParameter(f"cannot read the identity file {identity}: {e.strerror}") from None
    password = ""
    if (identity is None and not server_identity) or (key and key_is_encrypted(key)) or password_file is not None:
        what = "key passphrase" if key else "SSH password"
        if password_file is not None:
            password = read_secret_file(password_file, what)
        elif os.environ.get(SSH_PASSWORD_ENV):
            password = os.environ[SSH_PASSWORD_ENV]
        elif sys.stdin.isatty():
            password = getpass.getpass(f"{what.capitalize()}: ")
        else:
            raise typer.BadParameter(f"no {what}: give --ssh-password-file, set {SSH_PASSWORD_ENV}, or run in a "
                                     "terminal to be prompted")
    target = ssh_target(ssh, port)
    run(lambda: emit(client().enroll_host(host_id, target, host_key, private_key=key, ssh_key_path=server_identity,
                                          password=password, hostd_port=hostd_port), HOST_FIELDS))


@host_app.command("list")
@output_options
def host_list() -> None:
    """Every host: mode, state, memory and storage (allocated/total), how many instances it runs, and a SAN
    node's iSCSI portal."""
    run(lambda: emit(client().list_hosts(), HOST_COLS))


@host_app.command("show")
@output_options
def host_show(host: str = typer.Argument(..., help="Host id.")) -> None:
    run(lambda: emit(client().get_host(host), HOST_FIELDS))


@host_app.command("register")
@output_options
def host_register(host_id: str, address: str) -> None:
    """Registers a host whose hostd an operator installed and started (enroll does both)."""
    run(lambda: emit(client().register_host(host_id, address), HOST_FIELDS))


@host_app.command("drain")
@output_options
def host_drain(host: str, undo: bool = typer.Option(False, "--undo", help="Take new instances again.")) -> None:
    """Takes nothing new and migrates every instance on a SAN volume off the host (loop volumes stay)."""
    run(lambda: emit(client().drain_host(host, not undo), HOST_FIELDS))


TASK_FIELDS: list[Column] = [
    ("id", lambda t: t.id), ("kind", lambda t: t.kind), ("resource", lambda t: t.resource),
    ("state", lambda t: enum_name(t, "state")), ("step", lambda t: t.current_step)]


@host_app.command("evacuate")
@output_options
def host_evacuate(host: str = typer.Argument(..., metavar="NAME", help="Host id.")) -> None:
    """Treats a host as lost now: fences it (certificate revoked, initiator out of every LUN ACL), then moves
    its SAN-backed instances to hosts with room; instances on loop volumes go to ERROR saying why."""
    run(lambda: emit(client().evacuate_host(host), TASK_FIELDS))


@host_app.command("delete")
def host_delete(host: str) -> None:
    run(lambda: client().delete_host(host))


@admin_instance_app.command("migrate")
@output_options
def admin_instance_migrate(instance: str = typer.Argument(..., metavar="ID", help="The instance's id."),
                           host: str = typer.Option("", "--host", help="Target host id (default: the scheduler "
                                                    "picks an up host with room).")) -> None:
    """Moves an instance whose volume is on the SAN to another host; prints the migrate task."""
    run(lambda: emit(client().migrate_instance(instance, host), TASK_FIELDS))


PATCH_FIELDS: list[Column] = [
    ("datastore", lambda p: p.datastore), ("version", lambda p: p.version), ("revision", lambda p: p.revision),
    ("instances", lambda p: ", ".join(p.instances))]


@admin_datastore_app.command("patch")
@output_options
def admin_datastore_patch(version: str = typer.Argument(..., metavar="VERSION", help="e.g. 10.11."),
                          revision: int = typer.Option(..., "--revision", help="The new template revision "
                                                       "(newer than the version's current one)."),
                          datastore: str = typer.Option("mariadb", "--datastore"),
                          now: bool = typer.Option(False, "--now", help="Patch at once, not in each instance's "
                                                   "maintenance window.")) -> None:
    """Moves a datastore version onto a new template revision; its instances follow one at a time."""
    run(lambda: emit(client().patch_datastore_version(version, revision, datastore, now), PATCH_FIELDS))


# The flat spellings of earlier releases.
admin_app.command("host-register", hidden=True)(host_register)
admin_app.command("host-list", hidden=True)(host_list)


@admin_app.command("task-list")
@output_options
def task_list(resource: str = typer.Option("", "--resource")) -> None:
    run(lambda: emit(client().list_tasks(resource), [("id", lambda t: t.id), ("kind", lambda t: t.kind),
                                                     ("resource", lambda t: t.resource), ("state", lambda t: t.state),
                                                     ("step", lambda t: t.current_step)]))


@admin_app.command("quota")
@output_options
def quota_show(tenant: str) -> None:
    run(lambda: emit(client().get_quota(tenant), [("limit", lambda q: json_format.MessageToDict(q.limit)),
                                                  ("in use", lambda q: json_format.MessageToDict(q.in_use))]))


@admin_app.command("cert-list")
@output_options
def cert_list() -> None:
    run(lambda: emit(client().list_certificates(), [("identity", lambda c: c.identity), ("serial", lambda c: c.serial),
                                                    ("revoked", lambda c: c.revoked)]))


@admin_app.command("cert-revoke")
@output_options
def cert_revoke(serial: str, reason: str = typer.Option("", "--reason")) -> None:
    run(lambda: emit(client().revoke_certificate(serial, reason), [("identity", lambda c: c.identity),
                                                                   ("revoked", lambda c: c.revoked)]))


# -- pki -------------------------------------------------------------------------------------------
@pki_app.command("init")
def pki_init(directory: Path) -> None:
    """Makes a new CA in DIRECTORY (refuses to overwrite one)."""
    from reddwarf.common.errors import RedDwarfError
    from reddwarf.common.pki import CertificateAuthority
    try:
        ca = CertificateAuthority.init(directory)
    except RedDwarfError as e:
        err.print(f"error: {e.code.name}: {e.message}", markup=False)
        raise typer.Exit(2) from None
    out.print(f"CA created: {ca.dir / 'ca.pem'}")


@pki_app.command("issue")
def pki_issue(directory: Path, role: str, ident: str, out_dir: Path = typer.Option(..., "--out"),
              name: str = typer.Option("cert", "--name")) -> None:
    """Issues a certificate for ROLE/IDENT from the CA in DIRECTORY into --out."""
    from reddwarf.common.errors import RedDwarfError
    from reddwarf.common.pki import CertificateAuthority
    try:
        files = CertificateAuthority.load(directory).write_identity(out_dir, name, role, ident)
    except RedDwarfError as e:
        err.print(f"error: {e.code.name}: {e.message}" + (f" (field: {e.violations[0][0]})" if e.violations else ""),
                  markup=False)
        raise typer.Exit(2) from None
    out.print(f"issued spiffe://reddwarf/{role}/{ident}: {files.cert}")


# `reddwarf configuration ...` and `reddwarf datastore parameters` register themselves on the app.
# `instance log ...`, `instance top` and `event list` live in their own module and register themselves here.
from . import cli_configurations, cli_observe  # noqa: E402,F401 - imported for their commands; they import this module


def main() -> int:
    try:
        app()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    # `python -m` runs a second copy of this module as __main__; the configuration commands registered
    # themselves on the package's copy, so that is the one to run.
    from reddwarf.client import cli as _package_cli
    sys.exit(_package_cli.main())
