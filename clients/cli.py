"""`reddwarf`: the command line over the SDK. Tables by default, `--json` for scripts, one-line errors
(`error: NOT_FOUND: instance ... (field: name)`) and a non-zero exit code on failure.

Credentials come from the same places as the SDK's: REDDWARF_* environment (see demo-openrc.sh) or
~/.config/reddwarf/config.yaml, and `--token-file`. Secrets never go on the command line (other users see
it in ps, shells keep it in their history): tokens come from REDDWARF_TOKEN, the config file or
--token-file; passwords from --password-file, REDDWARF_PASSWORD or a prompt.
"""
from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

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
for sub, name in ((instance_app, "instance"), (database_app, "database"), (user_app, "user"), (root_app, "root"),
                  (backup_app, "backup"), (flavor_app, "flavor"), (datastore_app, "datastore"), (admin_app, "admin"),
                  (pki_app, "pki")):
    app.add_typer(sub, name=name)

out = Console()
err = Console(stderr=True)


class State:
    json = False
    endpoint: str | None = None
    token: str | None = None
    # Tests inject a factory; normally the SDK's configuration rules apply.
    factory: Callable[[], Client] | None = None


def client() -> Client:
    if State.factory is not None:
        return State.factory()
    kw = {k: v for k, v in (("endpoint", State.endpoint), ("token", State.token)) if v}
    return Client.from_env(**kw)


def emit(items: Iterable[Message] | Message, columns: list[tuple[str, Callable[[Any], Any]]]) -> None:
    rows = [items] if isinstance(items, Message) else list(items)
    if State.json:
        data = [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in rows]
        out.print_json(json.dumps(data[0] if isinstance(items, Message) else data))
        return
    table = Table(show_header=True, header_style="bold")
    for title, _ in columns:
        table.add_column(title)
    for m in rows:
        table.add_row(*[str(fn(m)) for _, fn in columns])
    out.print(table)


def short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def status_name(msg: Any) -> str:
    return str(msg.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[msg.status].name)


INSTANCE_COLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("id", lambda i: i.id), ("name", lambda i: i.display_name), ("status", status_name),
    ("flavor", lambda i: short(i.flavor)), ("volume GB", lambda i: i.volume.size_gb),
    ("endpoint", lambda i: ", ".join(f"{e.host}:{e.port}" for e in i.endpoints)),
]


def run(fn: Callable[[], None]) -> None:
    try:
        fn()
    except ClientError as e:
        err.print(f"error: {e.one_line()}", markup=False, highlight=False)
        raise typer.Exit(2 if e.code_name in ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS") else 1) from None


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
                 endpoint: str = typer.Option(None, "--endpoint", help="API host:port (or REDDWARF_ENDPOINT)."),
                 token_file: Path = typer.Option(None, "--token-file",
                                                 help="Read the token from this file (or REDDWARF_TOKEN)."),
                 _token: str = typer.Option(None, "--token", hidden=True, callback=_refuse_secret_arg(
                     "token", "REDDWARF_TOKEN, the config file or --token-file"))) -> None:
    State.json, State.endpoint = json_output, endpoint
    State.token = read_secret_file(token_file, "token") if token_file is not None else None


# -- catalog ---------------------------------------------------------------------------------------
@flavor_app.command("list")
def flavor_list() -> None:
    run(lambda: emit(client().list_flavors(), [
        ("id", lambda f: f.id), ("memory MB", lambda f: f.limits.memory_mb), ("cpu shares", lambda f: f.limits.cpu_shares),
        ("cpu cap (m)", lambda f: f.limits.cpu_limit_millicores or "-"), ("processes", lambda f: f.limits.max_processes),
        ("volume GB", lambda f: f.default_volume_gb)]))


@flavor_app.command("show")
def flavor_show(flavor: str) -> None:
    run(lambda: emit(client().get_flavor(flavor), [("id", lambda f: f.id), ("memory MB", lambda f: f.limits.memory_mb)]))


@datastore_app.command("list")
def datastore_list() -> None:
    run(lambda: emit(client().list_datastores(), [
        ("id", lambda d: d.id), ("default", lambda d: d.default_version),
        ("versions", lambda d: ", ".join(v.version for v in d.versions))]))


# -- instances -------------------------------------------------------------------------------------
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
                    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until ACTIVE.")) -> None:
    specs = []
    for spec in user:
        if ":" in spec:  # the old user:password[:dbs] form: refused rather than read as something else
            raise typer.BadParameter(f"--user takes user[=db1,db2]; {NO_SECRET_ARGS}use --password-file, "
                                     f"{PASSWORD_ENV} or the prompt")
        name, _, dbs = spec.partition("=")
        specs.append((name, tuple(d for d in dbs.split(",") if d)))
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
                                 restore_from=restore_from, allowed_cidrs=allowed_cidr,
                                 require_secure_transport=require_tls)
        if wait:
            inst = _progress_until(c, inst.name)
        emit(inst, INSTANCE_COLS)
    run(go)


@instance_app.command("list")
def instance_list() -> None:
    run(lambda: emit(client().list_instances(), INSTANCE_COLS))


@instance_app.command("show")
def instance_show(instance: str) -> None:
    def go() -> None:
        i = client().get_instance(instance)
        emit(i, INSTANCE_COLS + [("task", lambda x: x.task_step or "-"), ("fault", lambda x: x.fault.message or "-")])
    run(go)


@instance_app.command("ca")
def instance_ca(instance: str, output: Path | None = typer.Option(None, "--output", "-o",
                                                           help="Save the CA certificate (PEM) to this file.")) -> None:
    """The CA certificate to verify the instance's MySQL TLS with (e.g. mariadb --ssl-ca=FILE
    --ssl-verify-server-cert -h SERVER_NAME)."""
    def go() -> None:
        ca = client().get_instance_ca(instance)
        if output is None:
            typer.echo(ca.ca_pem, nl=False)
            return
        output.write_text(ca.ca_pem)
        typer.echo(f"saved the MySQL CA of {instance} to {output}; verify the server name {ca.server_name}", err=True)
    run(go)


@instance_app.command("delete")
def instance_delete(instance: str) -> None:
    run(lambda: emit(client().delete_instance(instance), INSTANCE_COLS))


@instance_app.command("restart")
def instance_restart(instance: str) -> None:
    run(lambda: emit(client().restart_instance(instance), INSTANCE_COLS))


@instance_app.command("resize")
def instance_resize(instance: str, flavor: str = typer.Option(..., "--flavor"),
                    wait: bool = typer.Option(True, "--wait/--no-wait")) -> None:
    def go() -> None:
        c = client()
        i = c.resize_flavor(instance, flavor)
        emit(_progress_until(c, i.name) if wait else i, INSTANCE_COLS)
    run(go)


@instance_app.command("resize-volume")
def instance_resize_volume(instance: str, size: int = typer.Option(..., "--size")) -> None:
    run(lambda: emit(client().resize_volume(instance, size), INSTANCE_COLS))


@instance_app.command("watch")
def instance_watch(instance: str, timeout: float = typer.Option(600, "--timeout")) -> None:
    def go() -> None:
        for ev in client().watch_instance(instance, timeout=timeout):
            i = ev.instance
            if State.json:
                out.print_json(json_format.MessageToJson(ev))
            else:
                out.print(f"{ev.change:8} {status_name(i):10} {i.task_step or '-':16} {i.task_progress_percent:3d}%")
    run(go)


# -- databases, users, root ------------------------------------------------------------------------
@database_app.command("create")
def database_create(instance: str, name: str) -> None:
    run(lambda: emit(client().create_database(instance, name), [("database", lambda d: d.database)]))


@database_app.command("list")
def database_list(instance: str) -> None:
    run(lambda: emit(client().list_databases(instance), [("database", lambda d: d.database),
                                                          ("charset", lambda d: d.character_set)]))


@database_app.command("delete")
def database_delete(instance: str, name: str) -> None:
    run(lambda: client().delete_database(instance, name))


USER_COLS: list[tuple[str, Callable[[Any], Any]]] = [("user", lambda u: u.user), ("host", lambda u: u.host or "%"),
                                                     ("databases", lambda u: ", ".join(u.databases))]


@user_app.command("create")
def user_create(instance: str, name: str, password_file: Path = PASSWORD_FILE, _password: str = PASSWORD_ARG,
                host: str = typer.Option("%", "--host"), database: list[str] = typer.Option([], "--database")) -> None:
    password = secret(password_file, PASSWORD_ENV, "password", confirm=True)
    run(lambda: emit(client().create_user(instance, name, password, host, databases=database), USER_COLS))


@user_app.command("list")
def user_list(instance: str) -> None:
    run(lambda: emit(client().list_users(instance), USER_COLS))


@user_app.command("delete")
def user_delete(instance: str, name: str, host: str = typer.Option("%", "--host")) -> None:
    run(lambda: client().delete_user(instance, name, host))


@user_app.command("grant")
def user_grant(instance: str, name: str, database: list[str] = typer.Argument(...),
               host: str = typer.Option("%", "--host")) -> None:
    run(lambda: emit(client().grant_access(instance, name, database, host), USER_COLS))


@user_app.command("revoke")
def user_revoke(instance: str, name: str, database: str, host: str = typer.Option("%", "--host")) -> None:
    run(lambda: emit(client().revoke_access(instance, name, database, host), USER_COLS))


@user_app.command("password")
def user_password(instance: str, name: str, password_file: Path = PASSWORD_FILE, _password: str = PASSWORD_ARG,
                  host: str = typer.Option("%", "--host")) -> None:
    password = secret(password_file, PASSWORD_ENV, "new password", confirm=True)
    run(lambda: emit(client().change_password(instance, name, password, host), USER_COLS))


@root_app.command("enable")
def root_enable(instance: str) -> None:
    run(lambda: emit(client().enable_root(instance), [("user", lambda r: r.user), ("password (shown once)",
                                                                                  lambda r: r.password)]))


@root_app.command("disable")
def root_disable(instance: str) -> None:
    run(lambda: client().disable_root(instance))


@root_app.command("status")
def root_status(instance: str) -> None:
    def go() -> None:
        enabled = client().root_enabled(instance)
        out.print_json(json.dumps({"root_enabled": enabled})) if State.json else out.print(
            "root enabled" if enabled else "root not enabled")
    run(go)


# -- backups ---------------------------------------------------------------------------------------
BACKUP_COLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("id", lambda b: b.id), ("name", lambda b: b.display_name), ("instance", lambda b: short(b.instance)),
    ("status", status_name), ("kind", lambda b: b.kind), ("size", lambda b: b.size_bytes),
    ("verify", lambda b: b.DESCRIPTOR.fields_by_name["verify_status"].enum_type.values_by_number[b.verify_status].name)]


@backup_app.command("create")
def backup_create(instance: str, name: str, parent: str = typer.Option(None, "--parent", help="Incremental on this."),
                  description: str = typer.Option("", "--description")) -> None:
    run(lambda: emit(client().create_backup(instance, name, description, parent), BACKUP_COLS))


@backup_app.command("list")
def backup_list(instance: str = typer.Option(None, "--instance")) -> None:
    run(lambda: emit(client().list_backups(instance), BACKUP_COLS))


@backup_app.command("show")
def backup_show(backup: str) -> None:
    run(lambda: emit(client().get_backup(backup), BACKUP_COLS + [("sha256", lambda b: b.sha256)]))


@backup_app.command("delete")
def backup_delete(backup: str, cascade: bool = typer.Option(False, "--cascade")) -> None:
    run(lambda: client().delete_backup(backup, cascade))


@backup_app.command("verify")
def backup_verify(backup: str) -> None:
    run(lambda: emit(client().verify_backup(backup), BACKUP_COLS))


# -- admin -----------------------------------------------------------------------------------------
@admin_app.command("tenant-create")
def tenant_create(tenant_id: str, display_name: str = typer.Option("", "--name")) -> None:
    run(lambda: emit(client().create_tenant(tenant_id, display_name), [("id", lambda t: t.id)]))


@admin_app.command("tenant-list")
def tenant_list() -> None:
    run(lambda: emit(client().list_tenants(), [("id", lambda t: t.id), ("name", lambda t: t.display_name),
                                               ("instances", lambda t: t.quota.instances)]))


@admin_app.command("token-create")
def token_create(tenant: str, admin: bool = typer.Option(False, "--admin"),
                 ttl: int = typer.Option(0, "--ttl", help="Seconds; 0 = the server's default (30 days unless "
                                         "configured otherwise).")) -> None:
    run(lambda: emit(client().create_token(tenant, admin=admin, ttl_seconds=ttl),
                     [("id", lambda t: t.id), ("secret (shown once)", lambda t: t.secret)]))


@admin_app.command("host-register")
def host_register(host_id: str, address: str) -> None:
    run(lambda: emit(client().register_host(host_id, address), [("id", lambda h: h.id), ("address", lambda h: h.address)]))


@admin_app.command("host-list")
def host_list() -> None:
    run(lambda: emit(client().list_hosts(), [("id", lambda h: h.id), ("address", lambda h: h.address),
                                             ("memory MB", lambda h: h.capacity.memory_mb_total),
                                             ("containers", lambda h: h.capacity.containers)]))


@admin_app.command("task-list")
def task_list(resource: str = typer.Option("", "--resource")) -> None:
    run(lambda: emit(client().list_tasks(resource), [("id", lambda t: t.id), ("kind", lambda t: t.kind),
                                                     ("resource", lambda t: t.resource), ("state", lambda t: t.state),
                                                     ("step", lambda t: t.current_step)]))


@admin_app.command("quota")
def quota_show(tenant: str) -> None:
    run(lambda: emit(client().get_quota(tenant), [("limit", lambda q: json_format.MessageToDict(q.limit)),
                                                  ("in use", lambda q: json_format.MessageToDict(q.in_use))]))


@admin_app.command("cert-list")
def cert_list() -> None:
    run(lambda: emit(client().list_certificates(), [("identity", lambda c: c.identity), ("serial", lambda c: c.serial),
                                                    ("revoked", lambda c: c.revoked)]))


@admin_app.command("cert-revoke")
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


def main() -> int:
    try:
        app()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
