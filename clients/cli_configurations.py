"""`reddwarf configuration ...` (configuration groups) and `reddwarf datastore parameters`: the CLI over the
SDK's configuration calls, registered on the `reddwarf` app by clients/cli.py. Groups are named by id or
display name. Values are `--set name=value` (repeatable) or `--values '{"name": value}'` (JSON)."""
from __future__ import annotations

import json
from typing import Any

import typer

from .cli import (
    INSTANCE_ARG,
    INSTANCE_FIELDS,
    Column,
    app,
    client,
    datastore_app,
    emit,
    output_options,
    run,
    short,
    ts,
)

configuration_app = typer.Typer(help="Configuration groups (named sets of MariaDB parameters).", no_args_is_help=True)
app.add_typer(configuration_app, name="configuration")

GROUP_ARG = typer.Argument(..., help="The configuration group's id or name.")
SET = typer.Option([], "--set", help="name=value (repeatable).")
VALUES = typer.Option(None, "--values", help='All values as a JSON object, e.g. \'{"max_connections": 200}\'.')

CONFIG_COLS: list[Column] = [
    ("id", lambda g: g.id), ("name", lambda g: g.display_name), ("datastore", lambda g: g.datastore),
    ("version", lambda g: g.datastore_version), ("instances", lambda g: g.instance_count),
]
CONFIG_FIELDS: list[Column] = CONFIG_COLS + [
    ("description", lambda g: g.description),
    ("values", lambda g: ", ".join(f"{k}={v}" for k, v in sorted(g.values.items()))),
    ("created", lambda g: ts(g, "create_time")), ("updated", lambda g: ts(g, "update_time")),
]
PARAM_COLS: list[Column] = [
    ("name", lambda p: p.parameter), ("type", lambda p: p.type),
    ("min", lambda p: _number(p.min) if p.HasField("min") else ""),
    ("max", lambda p: _number(p.max) if p.HasField("max") else ""),
    ("restart required", lambda p: "yes" if p.restart_required else "no"),
]
PARAM_FIELDS: list[Column] = PARAM_COLS + [
    ("allowed values", lambda p: ", ".join(p.allowed_values)), ("description", lambda p: p.description),
]


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def parse_values(pairs: list[str], values_json: str | None) -> dict[str, Any]:
    """--values JSON, then each --set name=value on top of it."""
    out: dict[str, Any] = {}
    if values_json:
        try:
            data = json.loads(values_json)
        except ValueError as e:
            raise typer.BadParameter(f"--values is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise typer.BadParameter("--values must be a JSON object of name: value")
        out.update(data)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"--set takes name=value, got {pair!r}")
        out[name.strip()] = value
    return out


@configuration_app.command("create")
@output_options
def configuration_create(name: str, set_: list[str] = SET, values: str = VALUES,
                         description: str = typer.Option("", "--description"),
                         datastore: str = typer.Option("", "--datastore"),
                         datastore_version: str = typer.Option("", "--datastore-version")) -> None:
    vals = parse_values(set_, values)
    run(lambda: emit(client().create_configuration(name, vals, description, datastore, datastore_version),
                     CONFIG_FIELDS))


@configuration_app.command("list")
@output_options
def configuration_list() -> None:
    run(lambda: emit(client().list_configurations(), CONFIG_COLS))


@configuration_app.command("show")
@output_options
def configuration_show(group: str = GROUP_ARG) -> None:
    run(lambda: emit(client().find_configuration(group), CONFIG_FIELDS))


@configuration_app.command("update")
@output_options
def configuration_update(group: str = GROUP_ARG, set_: list[str] = SET, values: str = VALUES,
                         unset: list[str] = typer.Option([], "--unset", help="Remove this parameter (repeatable)."),
                         replace: bool = typer.Option(False, "--replace",
                                                      help="The values replace all of the group's (Trove's PUT); "
                                                           "default: set on top of them (PATCH)."),
                         name: str = typer.Option(None, "--name"),
                         description: str = typer.Option(None, "--description")) -> None:
    vals = parse_values(set_, values)

    def go() -> None:
        c = client()
        emit(c.update_configuration(c.configuration_id(group), vals, merge=not replace, unset=unset, name=name,
                                    description=description), CONFIG_FIELDS)
    run(go)


@configuration_app.command("delete")
def configuration_delete(group: str = GROUP_ARG) -> None:
    def go() -> None:
        c = client()
        gid = c.configuration_id(group)
        c.delete_configuration(gid)
        typer.echo(f"deleted configuration {gid}", err=True)
    run(go)


@configuration_app.command("attach")
@output_options
def configuration_attach(instance: str = INSTANCE_ARG, group: str = GROUP_ARG) -> None:
    """Attach a group to an instance: dynamic values apply at once; static ones make it RESTART_REQUIRED."""
    def go() -> None:
        c = client()
        emit(c.attach_configuration(c.instance_id(instance), c.configuration_id(group)),
             INSTANCE_FIELDS + [("configuration", lambda i: short(i.configuration))])
    run(go)


@configuration_app.command("detach")
@output_options
def configuration_detach(instance: str = INSTANCE_ARG) -> None:
    def go() -> None:
        c = client()
        emit(c.detach_configuration(c.instance_id(instance)), INSTANCE_FIELDS)
    run(go)


@configuration_app.command("instances")
@output_options
def configuration_instances(group: str = GROUP_ARG) -> None:
    def go() -> None:
        c = client()
        emit(c.list_configuration_instances(c.configuration_id(group)), [
            ("id", lambda m: m.id), ("name", lambda m: m.display_name),
            ("restart required", lambda m: "yes" if m.restart_required else "no")])
    run(go)


@datastore_app.command("parameters")
@output_options
def datastore_parameters(datastore: str = typer.Argument("mariadb"), version: str = typer.Argument("10.11"),
                         parameter: str = typer.Option(None, "--parameter", "-p", help="Show this one only.")) -> None:
    """The parameters a configuration group may set on a datastore version, with their rules."""
    if parameter:
        run(lambda: emit(client().get_parameter(datastore, version, parameter), PARAM_FIELDS))
    else:
        run(lambda: emit(client().list_parameters(datastore, version), PARAM_COLS))
